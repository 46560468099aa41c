"""jaxsam: loss-landscape geometry of SGD and Adam, with and without
Sharpness-Aware Minimization, in JAX/Flax.

Public API, re-exported from the modules that define it.
"""

from jaxsam import models
from jaxsam.models import get_model
from jaxsam.sam import (
    AuxState,
    FriendlySAMState,
    LookSAMState,
    MomentumSAMState,
    PerturbedAux,
    SAMState,
    VaSSOState,
    friendly_sam_transform,
    gradient_point,
    gsam_transform,
    kernels_only_mask,
    linen_grad_fn,
    looksam_transform,
    momentum_sam_transform,
    nnx_grad_fn,
    rho_following_lr,
    sam_aux,
    sam_perturbation,
    sam_transform,
    vasso_transform,
    weights_mask,
)

__version__ = "0.1.0"

__all__ = [
    "models",
    "get_model",
    "SAMState",
    "LookSAMState",
    "FriendlySAMState",
    "VaSSOState",
    "MomentumSAMState",
    "AuxState",
    "PerturbedAux",
    "sam_transform",
    "gsam_transform",
    "looksam_transform",
    "friendly_sam_transform",
    "vasso_transform",
    "momentum_sam_transform",
    "gradient_point",
    "sam_aux",
    "linen_grad_fn",
    "nnx_grad_fn",
    "sam_perturbation",
    "kernels_only_mask",
    "weights_mask",
    "rho_following_lr",
]
