"""Defaults of every field: ResNet18, SGD (lr 0.1, momentum 0.9, wd 5e-4, cosine), no SAM.

    python scripts/train.py --config configs/default.py          # paper scale
    python scripts/train.py --config configs/default.py:cpu      # ~10 min on 2 CPU cores, real data
    python scripts/train.py --config configs/default.py:smoke    # seconds, synthetic data

Field documentation and the source of each default: jaxsam/config.py.
"""

from jaxsam.config import base_config


def get_config(size=None):
    return base_config(size)
