"""Adam baseline: lr 1e-3 (the original study's rate), β = (0.9, 0.999), L2 5e-4, cosine.

    python scripts/train.py --config configs/adam.py
    python scripts/train.py --config configs/adam.py:cpu

Sources: Kingma & Ba 2015 (defaults); the original PyTorch study (lr 1e-3).
"""

from jaxsam.config import base_config, use_adam


def get_config(size=None):
    return use_adam(base_config(size))
