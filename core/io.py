"""Writing output files atomically, and removing the temporaries of writers that were killed.

Every writer of the toolkit puts its output under a temporary name in the folder of the target
first and renames it when complete. The temporary names carry the writer's process id:

    .NAME.tmp-PID              a file being written (checkpoints, PNGs, JSON, results.jsonl)
    .NAME.export-PID-XXXX      a folder being exported (deploy/export.py)
    .NAME.partial-PID-XXXX     a dataset folder being built (datasets/mvtec.py), ``.old`` when
                               it holds the previous build being replaced

A process killed while writing (SIGKILL, power loss) leaves its temporary behind; the next writer
into the same folder removes those whose process is no longer running
(:func:`remove_stale_temporaries`).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from pathlib import Path

from core.errors import ConfigError

STALE_NAME = re.compile(r"^\.(?P<target>.+)\.(?:tmp|export|partial)-(?P<pid>\d{1,10})(?:-\w+)?(?:\.old)?$")


def temp_path(path: str | Path) -> Path:
    """The temporary name ``.NAME.tmp-PID`` beside ``path`` under which it is written."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def staging_dir(target: str | Path, kind: str) -> Path:
    """A new empty folder ``.NAME.<kind>-PID-XXXX`` beside ``target`` to build it in."""
    target = Path(target)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.{kind}-{os.getpid()}-", dir=target.parent))


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (True when that cannot be told, so nothing is removed)."""
    if os.name != "posix":
        return True  # os.kill(pid, 0) would terminate the process on Windows
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OverflowError, ValueError):
        return False  # no process can have such an id
    except OSError:
        return True  # PermissionError: it exists, under another user
    return True


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove the toolkit's temporaries in ``folder`` (not below it) whose writer is dead.

    Only names of the forms listed in the module docstring are considered, and only those whose
    process id is not a running process; temporaries of running processes are kept.

    Returns:
        the removed paths.
    """
    folder = Path(folder)
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []  # a missing or unreadable folder has nothing of ours to clean
    removed = []
    for entry in entries:
        match = STALE_NAME.match(entry.name)
        if match is None or pid_alive(int(match["pid"])):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            continue  # another process cleaned it first, or it is not ours to delete
        removed.append(entry)
    return removed


def cannot_write(path: str | Path, exc: OSError, option: str) -> str:
    """The one line saying why ``path`` could not be written and how to fix it (``option`` names
    the argument that chose the place, e.g. ``--save_path``)."""
    full = exc.errno == errno.ENOSPC
    reason = "disk full" if full else exc.strerror or str(exc)
    kept = " (the previous file is kept)" if os.path.exists(path) else ""
    fix = f"free space or pass another {option}" if full else f"pass a writable {option}"
    return f"{path}: cannot write it: {reason}{kept}; {fix}"


def atomic_write_text(path: str | Path, text: str, option: str = "output folder") -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one.

    A write that fails (full disk, no permission) raises one ConfigError naming ``path`` and
    ``option``, the argument that chose the folder; the previous file is left as it was.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path.parent)
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        raise ConfigError(cannot_write(path, exc, option)) from exc
    finally:
        if tmp.exists():
            tmp.unlink()
