"""jaxsam: loss-landscape geometry of SGD and Adam, with and without
Sharpness-Aware Minimization, in JAX/Flax.

Public API, re-exported from the modules that define it.
"""

from jaxsam import models
from jaxsam.models import get_model
from jaxsam.sam import (
    LookSAMState,
    SAMState,
    gsam_transform,
    kernels_only_mask,
    looksam_transform,
    rho_following_lr,
    sam_perturbation,
    sam_transform,
)

__version__ = "0.1.0"

__all__ = [
    "models",
    "get_model",
    "SAMState",
    "LookSAMState",
    "sam_transform",
    "gsam_transform",
    "looksam_transform",
    "sam_perturbation",
    "kernels_only_mask",
    "rho_following_lr",
]
