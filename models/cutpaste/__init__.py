"""CutPaste (Li et al., CVPR 2021): self-supervised training on CutPaste copies + Gaussian density."""

from models.cutpaste.model import CutPasteModel, CutPasteOptions

__all__ = ["CutPasteModel", "CutPasteOptions"]
