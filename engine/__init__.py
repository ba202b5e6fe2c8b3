"""Shared machinery behind the scripts: errors, metrics, evaluation, visualisation, CLI helpers."""

import os
import warnings

# Paddle logs through glog and warns about ccache on import; neither is actionable for users.
os.environ.setdefault("GLOG_minloglevel", "2")
warnings.filterwarnings("ignore", message="No ccache found")
