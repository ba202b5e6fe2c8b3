"""A local web page to fit a model and look at its heat maps: ``python -m app`` (gradio)."""
