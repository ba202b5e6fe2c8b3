"""The gradio page: dataset or uploaded good images -> fit -> score test images -> export.

Every call into the toolkit goes through app.toolkit. Errors of the toolkit (bad folder, non-image
upload, ...) are shown on the page as one message.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home: the page is local only

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402

from app import toolkit  # noqa: E402

SIZES = (64, 128, 224, 256)
SHOWN = 256
"""Pictures smaller than this are enlarged (nearest neighbour, whole factor) for the page."""


def enlarge(rgb: np.ndarray) -> np.ndarray:
    """``rgb`` (S, S, 3) repeated ``max(1, SHOWN // S)`` times along both axes, so pixels stay sharp."""
    factor = max(1, SHOWN // max(rgb.shape[:2]))
    return np.repeat(np.repeat(rgb, factor, axis=0), factor, axis=1)
LOCAL_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]
LOCAL_MONO = ["ui-monospace", "monospace"]


def theme() -> gr.themes.Base:
    """gradio's default theme with system fonts (the default one loads web fonts from outside)."""
    return gr.themes.Default(font=LOCAL_FONTS, font_mono=LOCAL_MONO)


def _shown(action: Callable[..., Any]) -> Callable[..., Any]:
    """``action`` with toolkit errors turned into a message on the page (gr.Error)."""
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return action(*args, **kwargs)
        except toolkit.ToolkitError as exc:
            raise gr.Error(str(exc)) from exc
    run.__name__ = action.__name__
    run.__doc__ = action.__doc__
    return run


@_shown
def load_categories(root: str) -> tuple[Any, Any]:
    """Category choices of the dataset at ``root`` and the test images of the first."""
    names = toolkit.categories(root)
    return gr.update(choices=names, value=names[0]), list_tests(root, names[0])


@_shown
def make_demo() -> tuple[str, Any, Any]:
    """Generate the demo data and select it."""
    root = str(toolkit.demo_data())
    return (root, *load_categories(root))


def list_tests(root: str, category: str | None) -> Any:
    """Choices of the test images of ``root/category`` (label: defect/file name)."""
    if not root or not category:
        return gr.update(choices=[], value=None)
    paths = toolkit.test_images(root, category)
    choices = [(f"{p.parent.name}/{p.name}", str(p)) for p in paths]
    return gr.update(choices=choices, value=choices[-1][1] if choices else None)


@_shown
def run_fit(root: str, category: str | None, uploads: list[str] | None, method: str, arch: str, k: float,
            size: int, pretrained: str,
            progress: gr.Progress = gr.Progress()) -> tuple[Any, str]:  # noqa: B008 (gradio finds it so)
    """Fit on the uploaded good images if any, else on ``root/category``'s train/good."""
    if uploads:
        samples, name = toolkit.upload_samples(uploads), "uploaded"
    elif root and category:
        samples, name = toolkit.train_samples(root, category), category
    else:
        raise gr.Error("choose a dataset folder and category, or upload good images")
    settings = toolkit.FitSettings(method=method, arch=arch, k=int(k) if k else None,
                                   image_size=int(size), pretrained=pretrained.strip() or "imagenet")

    def report(done: int, total: int, note: str) -> None:
        progress((done, total), desc=f"fitting ({note})" if note else "fitting", unit="images")

    model = toolkit.fit(samples, settings, report, category=name)
    status = (f"Fitted **{model.config.run_name}** on {len(samples)} good images of "
              f"*{name}*; threshold {model.threshold:.4f}.")
    return model, status


@_shown
def run_score(model: Any, picked: str | None, upload: str | None) -> tuple[Any, Any, Any, str]:
    """Score the uploaded test image, else the picked one: image, heat map, outline, score text."""
    if model is None:
        raise gr.Error("fit a model first")
    path = upload or picked
    if not path:
        raise gr.Error("pick or upload a test image")
    result = toolkit.score_image(model, path)
    verdict = "ANOMALOUS" if result.anomalous else "normal"
    text = (f"**{verdict}** score={result.score:.4f} normalized={result.normalized:.3f} "
            f"(threshold {result.threshold:.4f} = 0.5) — {Path(path).name}")
    return enlarge(result.image), enlarge(result.heatmap), enlarge(result.outline), text


@_shown
def run_export(model: Any) -> str:
    """Export the model and return the zip to download."""
    if model is None:
        raise gr.Error("fit a model first")
    work = Path(tempfile.gettempdir()) / "orthoad-app"
    work.mkdir(exist_ok=True)
    return str(toolkit.export_zip(model, work))


def build(default_root: str = "", pretrained: str = "imagenet",
          image_size: int = 256) -> gr.Blocks:
    """The page (not launched), with these values preselected."""
    with gr.Blocks(title="OrthoAD-Paddle") as page:
        model = gr.State(None)
        gr.Markdown("## OrthoAD-Paddle: fit on good parts, look at the heat maps")
        with gr.Row():
            with gr.Column():
                gr.Markdown("**1. Good images**: a dataset folder in MVTec layout, or upload them")
                root = gr.Textbox(label="dataset folder", value=default_root, elem_id="root")
                with gr.Row():
                    load = gr.Button("Load folder", elem_id="load")
                    demo = gr.Button("Make demo data", elem_id="demo")
                category = gr.Dropdown(label="category", choices=[], elem_id="category")
                uploads = gr.File(label="or upload good images", file_count="multiple",
                                  file_types=["image"], elem_id="uploads")
            with gr.Column():
                gr.Markdown("**2. Model**")
                method = gr.Radio(list(toolkit.METHODS), value="ortho", label="method", elem_id="method")
                arch = gr.Dropdown(list(toolkit.ARCHS), value="resnet18", label="backbone")
                k = gr.Number(value=0, precision=0, label="k (0 = the method's default)", elem_id="k")
                size = gr.Dropdown(list(SIZES), value=image_size, label="image size")
                pretrained = gr.Textbox(value=pretrained, label="weights: imagenet, none or a .pdparams path",
                                        elem_id="pretrained")
                fit = gr.Button("Fit", variant="primary", elem_id="fit")
                status = gr.Markdown("No model yet.", elem_id="status")
        gr.Markdown("**3. Test images**")
        with gr.Row():
            picked = gr.Dropdown(label="pick a test image of the dataset", choices=[], elem_id="picked")
            upload = gr.File(label="or upload one", file_types=["image"], elem_id="upload")
            score = gr.Button("Score", variant="primary", elem_id="score")
        result = gr.Markdown(elem_id="result")
        with gr.Row():
            image = gr.Image(label="image", interactive=False, format="png", height=300,
                             elem_id="image")
            heatmap = gr.Image(label="heat map", interactive=False, format="png", height=300,
                               elem_id="heatmap")
            outline = gr.Image(label="outline (map > threshold)", interactive=False, format="png",
                               height=300, elem_id="outline")
        gr.Markdown("**4. Export** (a Paddle Inference folder as export_model.py writes it; "
                    "run it with infer.py)")
        with gr.Row():
            export = gr.Button("Export model", elem_id="export")
            download = gr.File(label="exported model (zip)", interactive=False, elem_id="download")

        load.click(load_categories, root, [category, picked])
        root.submit(load_categories, root, [category, picked])
        demo.click(make_demo, None, [root, category, picked])
        category.change(_shown(list_tests), [root, category], picked)
        fit.click(run_fit, [root, category, uploads, method, arch, k, size, pretrained], [model, status])
        score.click(run_score, [model, picked, upload], [image, heatmap, outline, result])
        export.click(run_export, model, download)
    return page
