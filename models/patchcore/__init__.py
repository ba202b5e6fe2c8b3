"""PatchCore: towards total recall in industrial anomaly detection (Roth et al. 2022)."""

from models.patchcore.model import PatchCoreModel

__all__ = ["PatchCoreModel"]
