"""What every script's entry point shares: the top-level error handling and Paddle-style flags."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable

from core.errors import ToolkitError


def str2bool(value: str | bool) -> bool:
    """Parse True/False style flags the way Paddle's tools do (``--use_gpu True``)."""
    if isinstance(value, bool):
        return value
    lowered = value.strip().lower()
    if lowered in ("true", "t", "yes", "y", "1"):
        return True
    if lowered in ("false", "f", "no", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def run_main(main: Callable[[list[str] | None], int]) -> None:
    """Run a script's main; a ToolkitError becomes one ``error:`` line and exit status 2."""
    try:
        code = main(None)
    except ToolkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code)


MAX_SIDE = 8192
"""Largest accepted image side (--resize, --crop_size, --img_size, a checkpoint's sizes)."""


def _number(value: str, kind: type) -> int | float:
    """``value`` as an int or a finite float; an ArgumentTypeError (argparse's one line) if not."""
    try:
        number = kind(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                         f"got {value!r}") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {value!r}")
    return number


def int_at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type=`` accepting integers in [low, high] (no upper bound if ``high`` is None)."""

    def parse(value: str) -> int:
        number = _number(value, int)
        if number < low or (high is not None and number > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return number

    return parse


def finite_float(value: str) -> float:
    """An argparse ``type=`` accepting any finite number (not nan or inf)."""
    return _number(value, float)


def positive_float(value: str) -> float:
    """An argparse ``type=`` accepting finite numbers > 0."""
    number = _number(value, float)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {value}")
    return number


def fraction(value: str) -> float:
    """An argparse ``type=`` accepting numbers in (0, 1]."""
    number = _number(value, float)
    if not 0 < number <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return number


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)
image_side = int_at_least(1, MAX_SIDE)
