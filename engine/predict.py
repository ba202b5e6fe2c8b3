"""Per-image prediction output shared by predict.py (dynamic/inference runtime) and infer.py."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from datasets import Preprocess, denormalize, read_image
from datasets.mvtec import IMAGE_SUFFIXES
from engine.errors import InputError
from engine.visualize import four_panel, save_png


def collect_images(inputs: Sequence[str]) -> list[Path]:
    """Image files named by ``inputs`` (files or folders; folders are listed, sorted, not recursed)."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.iterdir()
                           if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                           and not p.name.startswith("."))
            if not files:
                raise InputError(f"{path}: no images found in this folder")
            found.extend(files)
        elif path.is_file():
            found.append(path)
        else:
            raise InputError(f"{path}: no such file or folder")
    return found


def batches(paths: Sequence[Path], preprocess: Preprocess,
            batch_size: int) -> Iterator[tuple[list[Path], np.ndarray]]:
    """(paths, images (B, 3, S, S) float32) in batches, images read and preprocessed."""
    for start in range(0, len(paths), batch_size):
        chunk = list(paths[start:start + batch_size])
        yield chunk, np.stack([preprocess(read_image(p)) for p in chunk])


def output_names(paths: Sequence[Path]) -> list[str]:
    """PNG names for ``paths``: the file stem, prefixed by its folder where stems collide."""
    stems = [p.stem for p in paths]
    return [f"{p.parent.name}_{p.stem}.png" if stems.count(p.stem) > 1 else f"{p.stem}.png"
            for p in paths]


class Reporter:
    """Prints ``PATH score=S anomalous=yes|no``, writes the four-panel PNG and results.jsonl rows.

    Heat maps share one colour scale: 0 to 1.5 x threshold, so the threshold shows as orange.
    """

    def __init__(self, save_path: str, threshold: float, save_pic: bool = True) -> None:
        self.folder = Path(save_path)
        self.threshold = float(threshold)
        self.save_pic = save_pic
        self.records: list[dict[str, Any]] = []

    def add(self, path: Path, name: str, image: np.ndarray, amap: np.ndarray, score: float) -> None:
        """Report one image: ``image`` (3, S, S) normalised, ``amap`` (S, S), ``score``.

        Without ``save_pic`` no PNG is written and the record's ``image`` is None.
        """
        if not np.isfinite(score):
            raise InputError(f"{path}: the anomaly score is NaN or inf; check the image and model")
        anomalous = bool(score > self.threshold)
        flag = "yes" if anomalous else "no"
        if self.save_pic:
            title = f"score={score:.4f} threshold={self.threshold:.4f} anomalous={flag}"
            panel = four_panel(denormalize(image), amap, self.threshold, 0.0, 1.5 * self.threshold,
                               title=title)
            save_png(self.folder / name, panel)
        print(f"{path} score={score:.6f} anomalous={flag}")
        self.records.append({"path": str(path), "score": float(score),
                             "label": "anomalous" if anomalous else "normal",
                             "threshold": self.threshold,
                             "image": str(self.folder / name) if self.save_pic else None})

    def write_jsonl(self) -> Path:
        """Write results.jsonl (one JSON object per image) atomically and return its path."""
        target = self.folder / "results.jsonl"
        tmp = target.with_name(f".results.jsonl.tmp-{os.getpid()}")
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        os.replace(tmp, target)
        return target
