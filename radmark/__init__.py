"""radmark: radioactive data marking and exact statistical detection.

Importing this package is cheap and side-effect free: no torch, no CUDA, no network.
Heavy modules (marking, models, verification) import torch lazily when used.
"""

__version__ = "0.2.0"

SCHEMA_VERSION = 1
