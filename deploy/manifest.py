"""``deploy.json``: what an exported folder holds and how to feed it, written beside the model.

It names every file of the export with its SHA-256, so a model, params or stats file taken from
another export is refused with one line instead of silently giving wrong scores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import InputError
from core.io import atomic_write_text
from core.kernels import FACTOR_DTYPES, HALF_KERNELS

MANIFEST = "deploy.json"
FORMAT_VERSION = 1
HALF_FORMAT_VERSION = 2
"""The version of an export whose compiled head stores 16-bit statistics (``head_precision``): a
toolkit that reads only version 1 would build an operator that takes float32 only, so it refuses
the file with one line instead."""
SPLIT_FORMAT_VERSION = 3
"""The version of a split export (``head_file``): its ``model_file`` graph ends at the embedding,
so a toolkit that reads only versions 1 and 2 would take the embedding for the anomaly map; it
refuses the file with one line instead."""
VERSIONS = (FORMAT_VERSION, HALF_FORMAT_VERSION, SPLIT_FORMAT_VERSION)
HEAD = "head"
"""File stem of a split export's head graph (``head.json`` or ``head.pdmodel``) and params."""
HEAD_PARAMS = f"{HEAD}.pdiparams"
IDENTITY = ("method", "arch", "k", "category", "image_size", "resize")
"""Fields that a stats file must share with the manifest."""


@dataclass
class Manifest:
    """The contents of ``deploy.json`` (see docs/deploy.md for every field)."""

    method: str
    arch: str
    k: int
    category: str
    image_size: int
    resize: int
    mean: list[float]
    std: list[float]
    threshold: float | None
    fused: bool
    format: str
    model_file: str
    params_file: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    paddle_version: str
    batched: bool = False
    stats_file: str | None = None
    onnx_file: str | None = None
    kernels: list[str] = field(default_factory=list)
    """Compiled CPU operators (core.kernels) the graph holds; loaded before the predictor."""
    head_precision: str = "fp32"
    """How the compiled head stores its statistics (core.kernels.FACTOR_DTYPES); fp32 otherwise."""
    head_file: str | None = None
    """A split export's scoring graph (embedding -> anomaly map, image score), beside
    ``head.pdiparams``; ``model_file`` then maps images to the embedding (``--split``)."""
    files: dict[str, str] = field(default_factory=dict)
    verified: dict[str, float | None] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    score_min: float | None = None
    format_version: int = FORMAT_VERSION
    run_name: str = ""
    """The checkpoint folder's name, ``<method>_<arch>[_<k>]`` (models.base.ModelConfig.run_name)."""

    def __post_init__(self) -> None:
        if not self.run_name:  # a deploy.json written before run_name was recorded
            self.run_name = f"{self.method}_{self.arch}" + (f"_{self.k}" if self.k else "")

    def identity(self) -> dict[str, Any]:
        """The model's method/arch/k/category/sizes, compared against a stats file."""
        return {key: getattr(self, key) for key in IDENTITY}


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    """Write ``folder/deploy.json`` atomically and return its path."""
    target = folder / MANIFEST
    atomic_write_text(target, json.dumps(dataclasses.asdict(manifest), indent=2) + "\n")
    return target


def read_manifest(folder: Path) -> Manifest:
    """Read ``folder/deploy.json``; a missing, unreadable or foreign file is one InputError."""
    path = folder / MANIFEST
    if not path.is_file():
        raise InputError(
            f"{path}: not found; infer.py needs the deploy.json that export_model.py writes beside "
            "the model: pass a model file from an export folder or export again"
        )
    try:
        record = json.loads(path.read_text())
        if record.get("format_version") not in VERSIONS:
            raise ValueError(f"format_version {record.get('format_version')}, "
                             f"this version reads {', '.join(map(str, VERSIONS))}")
        known = {f.name for f in dataclasses.fields(Manifest)}
        manifest = Manifest(**{key: value for key, value in record.items() if key in known})
        if not isinstance(manifest.kernels, list) or not all(isinstance(n, str) for n in manifest.kernels):
            raise ValueError("kernels must be a list of operator names")
        if manifest.head_precision not in FACTOR_DTYPES:
            raise ValueError(f"head_precision {manifest.head_precision!r}, "
                             f"not one of {', '.join(FACTOR_DTYPES)}")
        if manifest.head_precision != "fp32" and not HALF_KERNELS & set(manifest.kernels):
            raise ValueError(f"head_precision {manifest.head_precision} without the compiled head "
                             f"({', '.join(sorted(HALF_KERNELS))}) in kernels")
        if manifest.head_file not in (None, f"{HEAD}.json", f"{HEAD}.pdmodel"):
            raise ValueError(f"head_file {manifest.head_file!r}, not {HEAD}.json or {HEAD}.pdmodel")
        if (manifest.head_file is None) != (manifest.format_version != SPLIT_FORMAT_VERSION):
            raise ValueError(f"format_version {manifest.format_version} with head_file "
                             f"{manifest.head_file!r}: a split export has both, others neither")
        return manifest
    except (OSError, UnicodeDecodeError, ValueError, TypeError, AttributeError) as exc:
        raise InputError(f"{path}: not a deploy.json of this toolkit ({exc}); export again "
                         "with export_model.py") from exc


def check_file(manifest: Manifest, folder: Path, path: Path, what: str) -> None:
    """Fail unless ``path`` is the file named ``path.name`` that the export in ``folder`` wrote."""
    if not path.is_file():
        raise InputError(f"{path}: {what} file not found; pass the {what} file of the export in "
                         f"{folder} or export again with export_model.py")
    expected = manifest.files.get(path.name)
    if expected is None:
        raise InputError(f"{path}: {folder / MANIFEST} lists no {what} file of this name "
                         f"(it lists {', '.join(sorted(manifest.files))}); pass one of those")
    if sha256_file(path) != expected:
        raise InputError(
            f"{path}: not the {what} file exported with {folder / MANIFEST} (its SHA-256 differs: "
            "it belongs to another model or export); use the files of one export_model.py run"
        )
