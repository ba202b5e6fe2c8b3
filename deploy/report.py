"""Per-image prediction output shared by predict.py (dynamic/inference runtime) and infer.py."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import InputError
from core.io import atomic_write_text
from core.scores import NO_MINIMUM_NOTE, normalized_score
from datasets import Preprocess, denormalize, read_image
from datasets.mvtec import IMAGE_SUFFIXES
from deploy.visualize import four_panel, save_png

SKIPPED_STATUS = 3  # exit status of a run that finished but skipped images (--skip_bad)


def collect_images(inputs: Sequence[str]) -> list[Path]:
    """Image files named by ``inputs`` (files or folders; folders are listed, sorted, not recursed).

    A file named twice (directly and through its folder, say) is listed once, where first named.
    """
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
    unique: dict[str, Path] = {}
    for path in found:
        unique.setdefault(os.path.abspath(path), path)
    return list(unique.values())


class BadInputs:
    """What to do with an image that cannot be scored: stop (default) or, with --skip_bad, skip it.

    Skipping prints ``skipped: <message>`` on stderr and remembers the path in ``skipped``.
    """

    def __init__(self, skip: bool) -> None:
        self.skip = skip
        self.skipped: list[Path] = []

    def __call__(self, path: Path, error: InputError) -> None:
        """Skip ``path`` (``error`` saying why), or raise ``error`` when not skipping."""
        if not self.skip:
            raise error
        print(f"skipped: {error}", file=sys.stderr)
        self.skipped.append(path)


def batches(paths: Sequence[Path], preprocess: Preprocess, batch_size: int,
            bad: BadInputs | None = None) -> Iterator[tuple[list[Path], np.ndarray]]:
    """(paths, images (B, 3, S, S) float32) in batches, images read and preprocessed.

    ``batch_size`` paths are read per batch; an unreadable one goes to ``bad`` (default: raise),
    so a batch may be smaller, and one whose images were all skipped is not yielded.
    """
    bad = bad or BadInputs(skip=False)
    for start in range(0, len(paths), batch_size):
        chunk, images = [], []
        for path in paths[start:start + batch_size]:
            try:
                images.append(preprocess(read_image(path)))
            except InputError as error:
                bad(path, error)
                continue
            chunk.append(path)
        if chunk:
            yield chunk, np.stack(images)


def _flat_name(parts: Sequence[str]) -> str:
    """Path parts joined by ``_`` (a file name without separators)."""
    return "_".join(part for part in parts if part not in ("", "."))


def output_names(paths: Sequence[Path]) -> list[str]:
    """A distinct PNG name for each of ``paths``, readable and the same for the same inputs.

    The name is the path relative to the deepest folder holding all inputs, folder separators
    replaced by ``_``, with ``.png`` in place of the suffix (``dirA/good/000.png`` and
    ``dirB/good/000.png`` give ``dirA_good_000.png`` and ``dirB_good_000.png``). Files told apart
    only by their suffix keep it (``x.png`` and ``x.jpg`` give ``x.png.png`` and ``x.jpg.png``). Names
    that would still coincide (ignoring case, for case-insensitive file systems) get ``-2``,
    ``-3``, ... in input order.
    """
    absolute = [Path(os.path.abspath(p)) for p in paths]
    try:
        root = Path(os.path.commonpath([str(p.parent) for p in absolute])) if absolute else Path()
    except ValueError:  # different drives: keep the whole path below each drive
        root = None
    stems = []
    for path in absolute:
        parts = path.parent.relative_to(root).parts if root else path.parent.parts[1:]
        stems.append((_flat_name(parts), path.stem, path.suffix))
    suffixes: dict[str, set[str]] = {}  # name without suffix (case-folded) -> suffixes it has
    for folder, stem, suffix in stems:
        suffixes.setdefault(_flat_name([folder, stem]).casefold(), set()).add(suffix.casefold())
    wanted = []
    for folder, stem, suffix in stems:
        base = _flat_name([folder, stem])
        wanted.append(f"{base}{suffix}" if len(suffixes[base.casefold()]) > 1 else base)
    taken = {name.casefold() for name in wanted}  # a numbered name must not take one of these
    names: list[str] = []
    used: set[str] = set()
    for base in wanted:
        name, number = base, 1
        while name.casefold() in used or (number > 1 and name.casefold() in taken):
            number += 1
            name = f"{base}-{number}"
        used.add(name.casefold())
        names.append(f"{name}.png")
    return names


class Reporter:
    """Prints ``PATH score=S normalized=N anomalous=yes|no``, writes the four-panel PNG and
    results.jsonl rows.

    Heat maps share one colour scale: 0 to 1.5 x threshold, so the threshold shows as orange.
    ``normalized`` is :func:`core.scores.normalized_score` with ``score_min`` and the threshold
    in force; without a stored ``score_min`` (old checkpoints and exports) it says so on stderr
    once and takes 0, named by ``source``.
    """

    def __init__(self, save_path: str, threshold: float, score_min: float | None = None,
                 source: str = "the model", save_pic: bool = True) -> None:
        self.folder = Path(save_path)
        self.threshold = float(threshold)
        if score_min is None:
            print(NO_MINIMUM_NOTE.format(source=source), file=sys.stderr)
        self.score_min = 0.0 if score_min is None else float(score_min)
        self.save_pic = save_pic
        self.records: list[dict[str, Any]] = []

    @property
    def jsonl_path(self) -> Path:
        """SAVE_PATH/results.jsonl."""
        return self.folder / "results.jsonl"

    def add(self, path: Path, name: str, image: np.ndarray, amap: np.ndarray, score: float) -> None:
        """Report one image: ``image`` (3, S, S) normalised, ``amap`` (S, S), ``score``.

        Without ``save_pic`` no PNG is written and the record's ``image`` is None.
        """
        if not np.isfinite(score):
            raise InputError(f"{path}: the anomaly score is NaN or inf; check the image and model")
        anomalous = bool(score > self.threshold)
        flag = "yes" if anomalous else "no"
        normalized = float(normalized_score(score, self.score_min, self.threshold))
        if self.save_pic:
            title = (f"score={score:.4f} normalized={normalized:.3f} threshold={self.threshold:.4f} "
                     f"anomalous={flag}")
            panel = four_panel(denormalize(image), amap, self.threshold, 0.0, 1.5 * self.threshold,
                               title=title)
            save_png(self.folder / name, panel)
        print(f"{path} score={score:.6f} normalized={normalized:.4f} anomalous={flag}")
        self.records.append({"path": str(path), "score": float(score), "normalized_score": normalized,
                             "label": "anomalous" if anomalous else "normal",
                             "threshold": self.threshold,
                             "image": str(self.folder / name) if self.save_pic else None})

    def write_jsonl(self) -> Path:
        """Write results.jsonl (one JSON object per image reported so far) atomically."""
        atomic_write_text(self.jsonl_path, "".join(json.dumps(r) + "\n" for r in self.records))
        return self.jsonl_path


Result = tuple[Path, np.ndarray, np.ndarray, float]  # path, image (3, S, S), map (S, S), score


def report_all(results: Iterable[Result], reporter: Reporter, names: dict[Path, str],
               bad: BadInputs) -> int:
    """Report every result and write results.jsonl; the exit status (0, or SKIPPED_STATUS).

    An image that cannot be scored goes to ``bad``. When that stops the run (or anything else
    does), results.jsonl is still written and lists exactly the pictures written before.
    """
    try:
        for path, image, amap, score in results:
            try:
                reporter.add(path, names[path], image, amap, score)
            except InputError as error:
                bad(path, error)
    except InputError as error:  # with --skip_bad too: a batch that fails as a whole stops the run
        hint = "" if bad.skip else "; or pass --skip_bad to go on without it"
        raise InputError(f"{error}{hint} (the {len(reporter.records)} images scored before it "
                         f"are in {reporter.jsonl_path})") from error
    finally:
        reporter.write_jsonl()
    pictures = f"{len(reporter.records)} pictures and " if reporter.save_pic else ""
    print(f"wrote {pictures}{reporter.jsonl_path}")
    if bad.skipped:
        print(f"skipped {len(bad.skipped)} of {len(names)} images (listed above); exit status "
              f"{SKIPPED_STATUS}", file=sys.stderr)
        return SKIPPED_STATUS
    return 0
