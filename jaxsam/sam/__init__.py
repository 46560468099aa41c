"""The SAM family as optax gradient transformations.

Sharpness-Aware Minimization (Foret et al. 2021, "Sharpness-Aware Minimization
for Efficiently Improving Generalization") replaces the gradient g = ∇L(w) by
the gradient at the worst point of a first-order model of the loss on a ball
of radius ρ:

    ε = ρ g / ‖g‖,        g_SAM = ∇L(w + ε).

Each transform here is an `optax.GradientTransformationExtraArgs` whose

    update(updates, state, params, *, grad_fn)

receives the clean gradient in `updates` and `grad_fn(p)`, the gradient of the
same minibatch loss at any parameters `p`, and returns the gradient at the
perturbed point. Whatever is chained after it (sgd, adam, weight decay,
clipping) sees one ordinary gradient, so one `update` call is one SAM step:

    tx = optax.chain(sam_transform(rho=0.05), optax.sgd(0.1, momentum=0.9))
    grads = jax.grad(loss)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   grad_fn=lambda p: jax.grad(loss)(p, batch))

Put the SAM transform first in the chain: the clean gradient it receives and
the gradients `grad_fn` returns must be the same kind of quantity (a clip or
weight decay before it shapes ε, and its output never sees them).

Members (`jaxsam.sam.classic`, `.ema`, `.momentum`):

* SAM; ASAM (Kwon et al. 2021) with `sam_transform(adaptive=True)`,
  ε = ρ T² g / ‖T g‖, T = |w| + η on the leaves `adaptive_leaves` selects.
* GSAM (Zhuang et al. 2022): `gsam_transform`, g_SAM − α g_⊥.
* LookSAM (Liu et al. 2022): `looksam_transform`, the second gradient every k steps.
* Friendly-SAM (Li et al. 2024): `friendly_sam_transform`, perturbs along
  g − σ m with m a moving average of the gradients.
* VaSSO (Li & Giannakis 2023): `vasso_transform`, perturbs along a moving
  average of the gradients.
* Momentum-SAM (Becker et al. 2024): `momentum_sam_transform`, perturbs
  along −v (the momentum); the caller takes the step's one gradient at
  `gradient_point(opt_state, params)`.

Common to all: ρ may be a Python number, an array (also a traced one, so
`optax.inject_hyperparams(sam_transform)(rho=0.05)` works under `jax.jit` and
`jax.vmap` over ρ sweeps it) or an optax schedule of the transform's own step
count (see `rho_following_lr`); the other hyperparameters may be arrays too.
Python values are checked when the transform is built. ρ = 0 returns the
clean gradient exactly (no second gradient is computed); a zero gradient gives
a finite result (every norm has `eps` beside it); the state is a NamedTuple of
arrays (orbax round-trips it); `axis_name` makes the perturbation use each
device's own gradient inside a per-device mapped step and averages the result
over the axis (m-sharpness); `mask` perturbs only the selected parameters;
`has_aux=True` keeps what `grad_fn` returns beside the perturbed gradient in
the state (`AuxState`, `sam_aux`; helpers `linen_grad_fn`, `nnx_grad_fn`).
"""

from jaxsam.sam._common import (
    ADAPTIVE_LEAVES,
    AuxState,
    kernels_only_mask,
    sam_aux,
    sam_perturbation,
    weights_mask,
)
from jaxsam.sam.classic import (
    LookSAMState,
    SAMState,
    gsam_transform,
    looksam_transform,
    rho_following_lr,
    sam_transform,
)
from jaxsam.sam.ema import FriendlySAMState, VaSSOState, friendly_sam_transform, vasso_transform
from jaxsam.sam.grad_fns import PerturbedAux, linen_grad_fn, nnx_grad_fn
from jaxsam.sam.momentum import MomentumSAMState, gradient_point, momentum_sam_transform

__all__ = [
    "ADAPTIVE_LEAVES",
    "AuxState",
    "FriendlySAMState",
    "LookSAMState",
    "MomentumSAMState",
    "PerturbedAux",
    "SAMState",
    "VaSSOState",
    "friendly_sam_transform",
    "gradient_point",
    "gsam_transform",
    "kernels_only_mask",
    "linen_grad_fn",
    "looksam_transform",
    "momentum_sam_transform",
    "nnx_grad_fn",
    "rho_following_lr",
    "sam_aux",
    "sam_perturbation",
    "sam_transform",
    "vasso_transform",
    "weights_mask",
]
