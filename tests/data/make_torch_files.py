"""Write the ``.pth`` files of tests/test_weights.py with torch itself (run in a venv that has torch,
e.g. the peer venv of bench/bench_peers.py; torch never enters requirements*.txt):

    .venv-peers/bin/python tests/data/make_torch_files.py

``torch_saved.pth`` is ``torch.save``'s zip archive, ``torch_saved_legacy.pth`` the format before
PyTorch 1.6 (``_use_new_zipfile_serialization=False``, as torchvision's older weight files are).
Both hold :func:`state`, whose values tests/test_weights.py recomputes with numpy.
"""

from __future__ import annotations

import collections
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def state() -> collections.OrderedDict:
    """Tensors of the layouts a state dict holds: float32 weights, a view with an offset and a
    transposed (non-contiguous) one sharing the weights' storage, float16, float64, int64 and a
    0-d int64 like BatchNorm's ``num_batches_tracked``."""
    weight = torch.arange(54, dtype=torch.float32).reshape(2, 3, 3, 3) / 7
    flat = weight.reshape(-1)
    return collections.OrderedDict([
        ("conv1.weight", weight),
        ("tail", flat[40:50]),
        ("fc.weight", weight.reshape(6, 9).t()),
        ("half", torch.linspace(-2, 2, 5, dtype=torch.float16)),
        ("double", torch.tensor([[1e-300, 3.5], [-0.25, 1e300]], dtype=torch.float64)),
        ("index", torch.tensor([3, -1, 2**40])),
        ("bn1.num_batches_tracked", torch.tensor(17)),
    ])


def main() -> None:
    torch.save(state(), HERE / "torch_saved.pth")
    torch.save(state(), HERE / "torch_saved_legacy.pth", _use_new_zipfile_serialization=False)
    print(f"wrote with torch {torch.__version__}")


if __name__ == "__main__":
    main()
