"""The roof under the scripts: argument parsing, the fit/evaluate workflow, metrics and result tables."""

import core  # noqa: F401  (first: quiets Paddle's import-time glog and warnings)
