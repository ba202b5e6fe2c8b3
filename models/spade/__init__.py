"""SPADE: sub-image anomaly detection with deep pyramid correspondences (Cohen & Hoshen 2020)."""

from models.spade.model import SpadeModel

__all__ = ["SpadeModel"]
