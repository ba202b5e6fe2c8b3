"""PaDiM: a random subset of k feature channels (Defard et al. 2020)."""

from models.padim.model import PadimModel

__all__ = ["PadimModel"]
