"""``stats.npz`` of an unfused export: the statistics that finish the pipeline after the embedding.

Arrays: ``projection`` W (F, k) float32 (ortho) or ``channels`` (k,) int64 (padim), ``mean`` (P, k)
and ``inv_cov`` (P, k, k) float32 with P = h * w, and ``meta``: a 0-d string array holding JSON
(method, arch, k, category, image_size, resize, sigma, grid [h, w], features F, threshold).
Plain arrays only: it is read with ``allow_pickle=False``, so loading it never runs code.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import InputError
from deploy.manifest import MANIFEST, Manifest

STATS = "stats.npz"
_META = "meta"
_EMBEDDINGS = ("projection", "channels")


@dataclass
class Stats:
    """Contents of a stats file: ``meta`` (the JSON record) and the arrays by name."""

    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]


def write_stats(path: Path, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Write a stats file: ``meta`` as the JSON record and ``arrays`` (mean, inv_cov, projection or
    channels) as they are."""
    with open(path, "wb") as f:
        np.savez(f, **{_META: np.array(json.dumps(meta))}, **arrays)


def read_stats(path: Path, manifest: Manifest) -> Stats:
    """Read a stats file and check that it belongs to the model ``manifest`` describes."""
    if not path.is_file():
        raise InputError(f"{path}: stats file not found; an unfused export needs the stats.npz "
                         "written beside its model: pass --stats or export again")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
        meta = json.loads(str(arrays.pop(_META)))
        missing = [name for name in ("mean", "inv_cov") if name not in arrays]
        if not any(name in arrays for name in _EMBEDDINGS):
            missing.append(" or ".join(_EMBEDDINGS))
        if missing or not isinstance(meta, dict):
            raise ValueError(f"missing {', '.join(missing) or 'metadata'}")
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise InputError(f"{path}: not a stats.npz written by export_model.py ({exc}); "
                         "export again with --no-fuse") from exc
    wanted = manifest.identity()
    found = {key: meta.get(key) for key in wanted}
    if found != wanted:
        have = ", ".join(f"{key}={value}" for key, value in found.items())
        need = ", ".join(f"{key}={value}" for key, value in wanted.items())
        raise InputError(f"{path}: stats of {have} but {MANIFEST} describes {need}; pass the "
                         "stats.npz of the same export")
    return Stats(meta, arrays)
