"""EfficientAD (``--method efficientad``) and PUAD (``--method puad``); the teacher is distilled by
``python -m models.efficientad.distill``."""

from models.efficientad.model import EfficientADModel
from models.efficientad.puad import PuadModel

__all__ = ["EfficientADModel", "PuadModel"]
