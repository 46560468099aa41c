"""SGD baseline: lr 0.1, momentum 0.9, weight decay 5e-4, cosine schedule, 200 epochs, batch 128.

    python scripts/train.py --config configs/sgd.py
    python scripts/train.py --config configs/sgd.py:cpu --config.model.name=vgg16

Sources: He et al. 2016; Foret et al. 2021 (appendix C) CIFAR-10 baselines.
"""

from jaxsam.config import base_config


def get_config(size=None):
    return base_config(size)
