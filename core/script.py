"""What every script's entry point shares: the top-level error handling and Paddle-style flags."""

from __future__ import annotations

import argparse
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
