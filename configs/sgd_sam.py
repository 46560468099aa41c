"""SGD + SAM (ρ = 0.05, per-device perturbation): lr 0.1, momentum 0.9, wd 5e-4, cosine.

    python scripts/train.py --config configs/sgd_sam.py
    python scripts/train.py --config configs/sgd_sam.py:cpu --config.sam.name=asam --config.sam.rho=0.5

Sources: Foret et al. 2021 (ρ = 0.05 on CIFAR-10); ASAM ρ = 0.5, η = 0.01: Kwon et al. 2021.
"""

from jaxsam.config import base_config, use_sam


def get_config(size=None):
    return use_sam(base_config(size))
