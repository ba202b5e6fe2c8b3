"""The floor every other package stands on: errors, atomic files, devices, processes, Paddle runtime.

Nothing here imports datasets, models, deploy or engine.
"""

import os
import warnings

# Paddle logs through glog and warns about ccache on import; neither is actionable for users.
os.environ.setdefault("GLOG_minloglevel", "2")
warnings.filterwarnings("ignore", message="No ccache found")
