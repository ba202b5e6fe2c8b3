"""OrthoAD: PaDiM with a random semi-orthogonal projection (Kim et al. 2021)."""

from models.ortho.model import OrthoModel, semi_orthogonal

__all__ = ["OrthoModel", "semi_orthogonal"]
