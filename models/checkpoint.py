"""Checkpoint files: one ``.npz`` holding a JSON metadata record and named float/int arrays.

Written to a temporary name and renamed, read with ``allow_pickle=False``: loading a checkpoint
never runs code from it.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.errors import CheckpointError
from core.io import cannot_write, remove_stale_temporaries, temp_path

FORMAT_VERSION = 1
SUFFIX = ".npz"
_META_KEY = "__meta__"


def write_npz(path: str, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Write ``meta`` and ``arrays`` to ``path`` atomically (temporary file, then rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_stale_temporaries(folder)
    tmp = temp_path(path)
    payload = dict(arrays)
    payload[_META_KEY] = np.array(json.dumps({"format_version": FORMAT_VERSION, **meta}))
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **payload)
        os.replace(tmp, path)
    except OSError as exc:
        raise CheckpointError(cannot_write(path, exc, "--save_path")) from exc
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_npz(path: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read a checkpoint written by :func:`write_npz`: (meta, arrays)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint not found; train one with train.py or fix --model_path")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
        meta = json.loads(str(arrays.pop(_META_KEY)))
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc}); "
            "it may be truncated or from another tool: train it again"
        ) from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: its metadata is not a JSON object; the file was changed or is "
                              "from another tool: train it again")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {meta.get('format_version')} but this version reads "
            f"{FORMAT_VERSION}; train it again with this version"
        )
    return meta, arrays


def check_identity(path: str, found: dict[str, Any], expected: dict[str, Any]) -> None:
    """Fail with one line if a checkpoint's method/arch/k/size differ from what was asked for."""
    wrong = {key: value for key, value in expected.items() if found.get(key) != value}
    if wrong:
        have = ", ".join(f"{key}={found.get(key)}" for key in expected)
        asked = ", ".join(f"{key}={value}" for key, value in expected.items())
        raise CheckpointError(
            f"{path}: checkpoint has {have} but {asked} was asked for; "
            "pass the matching arguments or the right --model_path"
        )


@dataclass(frozen=True)
class ArraySpec:
    """What a checkpoint array must be: its shape (None = any size along that axis) and the kind
    of its dtype ("f" float, "i" integer, "U" string). Float arrays must also be finite."""

    shape: tuple[int | None, ...]
    kind: str = "f"


def check_arrays(source: str, arrays: dict[str, np.ndarray], specs: dict[str, ArraySpec],
                 fix: str = "the file was changed or is damaged: train it again") -> None:
    """Raise a CheckpointError naming ``source`` and the first array of ``specs`` that is missing,
    of another shape or dtype kind, or (float) not finite; ``fix`` ends the message."""
    for name, spec in specs.items():
        if name not in arrays:
            raise CheckpointError(f"{source}: has no array {name}; {fix}")
        array = np.asarray(arrays[name])
        kind = "i" if array.dtype.kind == "u" else array.dtype.kind
        if kind != spec.kind:
            raise CheckpointError(f"{source}: array {name} has dtype {array.dtype}, expected "
                                  f"{_KINDS[spec.kind]}; {fix}")
        if len(array.shape) != len(spec.shape) or any(
            want is not None and have != want for have, want in zip(array.shape, spec.shape, strict=True)
        ):
            wanted = tuple("any" if n is None else n for n in spec.shape)
            raise CheckpointError(f"{source}: array {name} has shape {array.shape}, this "
                                  f"configuration needs {wanted}; {fix}")
        if kind == "f" and not np.isfinite(array.sum(dtype=np.float64)) and not np.isfinite(array).all():
            raise CheckpointError(f"{source}: array {name} contains NaN or inf; {fix}")


_KINDS = {"f": "a float type", "i": "an integer type", "U": "a string type"}
