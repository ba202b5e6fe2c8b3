"""Error types whose message is the one line a user sees.

Scripts catch :class:`ToolkitError` at the top level, print ``error: <message>`` to stderr and exit
with status 2; every message names the offending file (or argument) and says how to fix it.
"""

from __future__ import annotations


class ToolkitError(Exception):
    """Base class of every error that is the user's to fix (bad input, bad arguments)."""


class InputError(ToolkitError):
    """An input file or folder is missing, unreadable or inconsistent."""


class CheckpointError(ToolkitError):
    """A checkpoint or fit state is missing, corrupt, or of another configuration."""


class ConfigError(ToolkitError):
    """Arguments that do not fit together, or a device/build that cannot run them."""
