"""Adam + SAM (ρ = 0.05): the study's main question — does SAM help Adam too?

    python scripts/train.py --config configs/adam_sam.py             # paper scale
    python scripts/train.py --config configs/adam_sam.py:cpu         # ~10 min on 2 CPU cores, real data
    python scripts/train.py --config configs/adam_sam.py:smoke       # seconds, synthetic data
    # The original study's setting: ASAM rho 2.0, lr 1e-3, label smoothing 0.1
    python scripts/train.py --config configs/adam_sam.py --config.sam.name=asam \
        --config.sam.rho=2.0 --config.train.label_smoothing=0.1

Sources: Adam lr 1e-3 (Kingma & Ba 2015; the original study); SAM ρ = 0.05 (Foret et al. 2021).
"""

from jaxsam.config import base_config, use_adam, use_sam


def get_config(size=None):
    return use_sam(use_adam(base_config(size)))
