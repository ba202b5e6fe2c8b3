"""The floor (core/): device specs, argument types and the blur matrix, at their boundaries."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest
from scipy.ndimage import gaussian_filter1d

from core.device import check_gpu, parse_device
from core.errors import ConfigError
from core.resample import gaussian_blur_matrix
from core.script import fraction, image_side, positive_float, str2bool


def test_parse_device_specs():
    assert parse_device("cpu") == ("cpu", 0)
    assert parse_device(" GPU:1 ") == ("gpu", 1)
    assert parse_device("gpu") == ("gpu", 0)


@pytest.mark.bad_input
def test_bad_device_specs_and_a_missing_gpu_say_what_to_use(monkeypatch):
    with pytest.raises(ConfigError, match="--device tpu: use cpu, gpu or gpu:N"):
        parse_device("tpu")
    for spec in ("gpu:x", "cpu:1", "gpu:-1"):
        with pytest.raises(ConfigError, match=f"--device {spec}: use cpu, gpu or gpu:N"):
            parse_device(spec)
    monkeypatch.setattr(paddle, "is_compiled_with_cuda", lambda: True)
    monkeypatch.setattr(paddle.device.cuda, "device_count", lambda: 2)
    check_gpu(1)
    with pytest.raises(ConfigError) as info:
        check_gpu(2)
    assert str(info.value) == ("GPU 2 was requested but this machine has 2 GPU(s); pick gpu:0 to gpu:1 "
                               "(--device / --gpu_id) or run on the CPU (--device cpu / --use_gpu False)")
    monkeypatch.setattr(paddle.device.cuda, "device_count", lambda: 0)
    with pytest.raises(ConfigError, match=r"has 0 GPU\(s\); run on the CPU \(--device cpu"):
        check_gpu(0)


def test_argument_types():
    assert str2bool("True") is True and str2bool(" no ") is False and str2bool(False) is False
    assert image_side("8192") == 8192 and fraction("1") == 1.0 and positive_float("1e-3") == 1e-3
    for parse, value, message in ((str2bool, "maybe", "expected True or False"),
                                  (image_side, "8193", "must be between 1 and 8192"),
                                  (image_side, "2.5", "expected an integer"),
                                  (fraction, "0", r"must be in \(0, 1\]"),
                                  (positive_float, "nan", "expected a finite number"),
                                  (positive_float, "-1", "must be a finite number > 0")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            parse(value)


@pytest.mark.parametrize("sigma", [0.7, 4.0])
def test_blur_matrix_equals_scipy(sigma):
    signal = np.random.default_rng(0).random(37)
    np.testing.assert_allclose(gaussian_blur_matrix(37, sigma) @ signal,
                               gaussian_filter1d(signal, sigma, mode="reflect"), atol=1e-12)


@pytest.mark.parametrize("sigma", [0.0, -4.0, float("nan"), float("inf")])
def test_blur_matrix_refuses_a_sigma_without_a_kernel(sigma):
    """sigma 0 gave a matrix of NaN, a negative one a matrix of zeros (every map 0)."""
    with pytest.raises(ValueError, match="blur sigma must be a finite number > 0"):
        gaussian_blur_matrix(8, sigma)


@pytest.mark.parametrize("make", [
    "from core.runtime import Runtime\nRuntime(engine='dynamic', cpu_threads=3)",
    # the command a user types: train.py --method cutpaste --cpu_threads 3, through train.py's parser
    "import train\nfrom engine.cli import runtime_from\n"
    "runtime_from(train.parse_args(['--method', 'cutpaste', '--cpu_threads', '3']))",
])
def test_a_cpu_runtime_gives_eager_paddle_its_threads(make: str):
    """Paddle's own OpenMP runtime starts at one thread; a CPU Runtime, and train.py's
    ``--cpu_threads``, set it (eager training and the dynamic engine ran on one core of many)."""
    library = Path(paddle.__file__).parent / "libs" / "libiomp5.so"
    if not library.is_file():
        pytest.skip(f"this Paddle build has no {library.name}")
    code = (f"import ctypes, paddle\nomp = ctypes.CDLL({str(library)!r})\n"
            f"before = omp.omp_get_max_threads()\n{make}\nprint(before, omp.omp_get_max_threads())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.stdout.split() == ["1", "3"]
