"""Writing benchmark figures into docs/benchmarks.md, one marked section per benchmark."""

from __future__ import annotations

import datetime
import os
import platform
import re
from pathlib import Path

from core.io import atomic_write_text

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
HEADER = (
    "# Benchmarks\n\nFigures written by the scripts in bench/; "
    "each section says the command that made it.\n"
)


def machine() -> str:
    """One line describing where the figures were measured."""
    import paddle

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()}, Paddle {paddle.__version__}, "
            f"{datetime.date.today().isoformat()}")


BUSY_LOAD = 2.5
"""A load average above this on the 2 cores means other jobs ran beside the benchmark (the
benchmark itself runs up to 2 threads)."""


def load_note(start: float, end: float) -> str:
    """``load average S at the start, E at the end`` and whether other jobs shared the machine."""
    text = f"load average {start:.1f} at the start, {end:.1f} at the end"
    if max(start, end) > BUSY_LOAD:
        return (text + " (**machine loaded**: other jobs shared the cores, so wall times are inflated; "
                "compare process CPU times, and sides only within this run)")
    return text + " (no other jobs ran)"


def update_section(name: str, body: str) -> None:
    """Replace (or append) the section between ``<!-- name:start -->`` and ``<!-- name:end -->``.

    ``body`` is the benchmark's Markdown: its heading, the ``Command: `...` on <machine()>`` line
    and the figures. Every bench script writes docs/benchmarks.md through this function only.
    """
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = DOC.read_text() if DOC.exists() else HEADER
    block = f"{start}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else f"{text.rstrip()}\n\n{block}\n"
    atomic_write_text(DOC, text if text.endswith("\n") else text + "\n")
