"""Public helpers in one import: metrics, visualisation, preprocessing and checkpoint loading.

    from utils import roc_auc, pro_auc, four_panel, Preprocess, load_model
"""

from datasets import Preprocess, denormalize, read_image, read_mask
from deploy.visualize import colormap_jet, four_panel, mask_boundary, save_png
from engine.metrics import auc_midpoint, auc_trapezoid, pro_auc, roc_auc, roc_curve
from models import build_model, load_model

__all__ = [
    "Preprocess",
    "auc_midpoint",
    "auc_trapezoid",
    "build_model",
    "colormap_jet",
    "denormalize",
    "four_panel",
    "load_model",
    "mask_boundary",
    "pro_auc",
    "read_image",
    "read_mask",
    "roc_auc",
    "roc_curve",
    "save_png",
]
