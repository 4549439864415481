"""Keep TensorFlow's start-up chatter (oneDNN, CPU-feature and absl pre-init lines) off the console."""
from __future__ import annotations

import os


def quiet_tensorflow() -> None:
    """Silence TensorFlow's C++ INFO/WARNING logs and its oneDNN notice; effective only before TF is imported.

    Values already set in the environment win, e.g. TF_CPP_MIN_LOG_LEVEL=0 to debug TensorFlow."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # C++ logs: errors only
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # no "oneDNN custom operations are on" notice
