"""The Hessian's trace (Hutchinson) and eigenvalue density (stochastic Lanczos quadrature).

* `hessian_trace`: Hutchinson's estimator (Hutchinson 1989, "A stochastic
  estimator of the trace of the influence matrix for Laplacian smoothing
  splines") tr(H) ≈ mean of zᵀHz over Rademacher vectors z, with its
  standard error.
* `spectral_density`: the eigenvalue density by stochastic Lanczos
  quadrature (Golub & Meurant 1994/2010, "Matrices, Moments and
  Quadrature"; applied to neural networks by Ghorbani, Krishnan & Xiao 2019,
  "An Investigation into Neural Net Optimization via Hessian Eigenvalue
  Density"): m Lanczos steps from a unit vector v give an m-point Gauss
  quadrature rule (nodes = Ritz values, weights = squared first components
  of the eigenvectors of the tridiagonal matrix) that is exact for
  vᵀ p(H) v when p has degree ≤ 2m − 1.

Both need only Hessian-vector products; their loops are `driver.Loop`s.

    hessian_trace(loss_fn, params, key, n=100).trace
    dens = spectral_density(loss_fn, params, key, order=80, n_probes=4)
    plt.plot(dens.grid, dens.density)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.flatten_util import ravel_pytree

from jaxsam.geometry import driver
from jaxsam.geometry import loss as loss_lib
from jaxsam.geometry.lanczos import LANCZOS, check_key, flat_spec, uniform_vectors
from jaxsam.geometry.records import DensityResult, TraceResult

# --------------------------------------------------------------------------- Hutchinson
# inputs: {"keys": (steps·b,) probe keys}; static: (b,), b probes per step (0: one, not stacked).


def _rademacher_like(key: jax.Array, tree: Any) -> Any:
    """A pytree like `tree` with independent ±1 entries (one draw for all leaves)."""
    flat, unravel = ravel_pytree(tree)
    return unravel(jax.random.rademacher(key, flat.shape, flat.dtype))


def _trace_init(params, inputs, static):
    dtype = jnp.promote_types(ravel_pytree(params)[0].dtype, jnp.float32)
    return jnp.zeros(inputs["keys"].shape, dtype)


def _trace_query(i, samples, params, inputs, static):
    (b,) = static
    if not b:
        z = _rademacher_like(inputs["keys"][i], params)
        return z, z
    keys = lax.dynamic_slice_in_dim(inputs["keys"], i * b, b)
    z = jax.vmap(lambda k: _rademacher_like(k, params))(keys)
    return z, z


def _trace_update(i, samples, z, hz, params, inputs, static):
    (b,) = static
    if not b:
        return samples.at[i].set(optax.tree.vdot(z, hz).astype(samples.dtype))
    values = jax.vmap(optax.tree.vdot)(z, hz).astype(samples.dtype)
    return lax.dynamic_update_slice_in_dim(samples, values, i * b, 0)


def _trace_finish(samples, params, inputs, static):
    return samples


def hessian_trace(
    loss_fn: Any,
    params: Any,
    key: jax.Array,
    *,
    n: int = 100,
    batch_size: int | None = None,
) -> TraceResult:
    """Hutchinson estimate of tr(H) from n Rademacher probes.

    For z with independent ±1 entries E[zᵀHz] = tr(H), with variance
    2 Σ_{i≠j} H_ij² per probe, the smallest among probes with i.i.d.
    zero-mean, unit-variance entries (Hutchinson 1989).

    Args:
      loss_fn: a `LossFunction` or any `params -> scalar`.
      params: where the Hessian is taken.
      key: PRNG key; probe i uses `jax.random.split(key, n)[i]`.
      n: number of probes, ≥ 2 (needed for a standard error).
      batch_size: probes evaluated together (vectorized) in the compiled
        loop; None (default) does one at a time, the least memory. On the
        host (`driver.host_loops()`) the probes of a batch go one at a time.

    Returns:
      A `TraceResult` with the mean, its standard error and the samples.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> loss = lambda w: 0.5 * jnp.sum(jnp.array([3.0, 2.0, 1.0]) * w**2)
      >>> float(hessian_trace(loss, jnp.zeros(3), jax.random.key(0), n=4).trace)  # diagonal: exact
      6.0
    """
    if not isinstance(n, (int, np.integer)) or n < 2:
        raise ValueError(f"n must be an integer >= 2 to give a standard error (got {n!r})")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None (got {batch_size})")
    check_key(key)
    keys = jax.random.split(key, n)
    b = 0 if batch_size is None or batch_size == 1 else min(int(batch_size), n)
    steps = n if not b else -(-n // b)
    if b and steps * b > n:  # the last batch is filled with repeats of the last probe, dropped below
        keys = jnp.concatenate([keys, jnp.repeat(keys[-1:], steps * b - n, axis=0)])
    loop = driver.Loop("hvp", _trace_init, _trace_query, _trace_update, _trace_finish, block=b, vmap=True)
    samples = np.asarray(driver.run(loop, loss_fn, params, {"keys": keys}, steps=steps, static=(b,)))[:n]
    return TraceResult(
        trace=float(np.mean(samples)),
        standard_error=float(np.std(samples, ddof=1) / np.sqrt(n)),
        n=int(n),
        dim=flat_spec(params)[0],
        samples=samples,
        loss_info=loss_lib.info_of(loss_fn),
    )


# --------------------------------------------------------------------------- stochastic Lanczos quadrature


def spectral_density(
    loss_fn: Any,
    params: Any,
    key: jax.Array,
    *,
    order: int = 30,
    n_probes: int = 4,
    sigma: float | None = None,
    grid: int | np.ndarray = 1000,
    probes: jax.Array | None = None,
) -> DensityResult:
    """Hessian eigenvalue density by stochastic Lanczos quadrature (Ghorbani et al. 2019).

    For each probe v (a Rademacher vector scaled to unit norm), `order`
    Lanczos steps give nodes λ_j and weights w_j with Σ_j w_j f(λ_j) ≈
    vᵀ f(H) v, and E[vᵀ f(H) v] = tr f(H) / dim; the density is the average
    over probes of Σ_j w_j N(t; λ_j, sigma²).

    Args:
      loss_fn: a `LossFunction` or any `params -> scalar`.
      params: where the Hessian is taken.
      key: PRNG key for the probes (and Lanczos restart directions).
      order: Lanczos steps per probe (clipped to the number of parameters).
      n_probes: number of probes (ignored if `probes` is given).
      sigma: width of the Gaussian smoothing; default 1% of the spread of the
        nodes (max − min), or 1e-3 if they coincide.
      grid: number of evaluation points spanning [min node − 5σ, max node +
        5σ] (so the density integrates to ≈ 1 over it), or the points.
      probes: optional (n_probes, dim) start vectors (normalized here), for
        example to reuse probes across checkpoints or to test exactness.

    Returns:
      A `DensityResult`; `.moment(p)` gives the SLQ estimate of tr(H^p)/dim.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> loss = lambda w: 0.5 * jnp.sum(jnp.array([3.0, 1.0]) * w**2)
      >>> d = spectral_density(loss, jnp.zeros(2), jax.random.key(0), order=2, n_probes=1)
      >>> round(d.moment(1), 6)  # tr(H)/dim, exact for Rademacher probes
      2.0
    """
    if not isinstance(order, (int, np.integer)) or order < 1:
        raise ValueError(f"order must be an integer >= 1 (got {order!r})")
    if probes is None and (not isinstance(n_probes, (int, np.integer)) or n_probes < 1):
        raise ValueError(f"n_probes must be an integer >= 1 (got {n_probes!r})")
    if sigma is not None and not sigma > 0:
        raise ValueError(f"sigma must be > 0 (got {sigma})")
    check_key(key)
    dim, dtype = flat_spec(params)
    m = min(order, dim)
    if probes is not None:
        probes = jnp.asarray(probes, dtype)
        if probes.ndim != 2 or probes.shape[1] != dim:
            raise ValueError(f"probes must have shape (n_probes, {dim}) (got {probes.shape})")
        n_probes = probes.shape[0]
    if np.ndim(grid) == 0 and int(grid) < 2:
        raise ValueError(f"grid must be >= 2 points or an array of points (got {grid})")

    # The restart seed, and the probes' signs unless probes are given.
    draws = uniform_vectors(key, 1 if probes is not None else n_probes + 1, dim, dtype)
    if probes is None:  # Rademacher: the signs of uniform draws
        probes = jnp.where(jnp.stack(draws[1:]) < 0, -1, 1).astype(dtype)
    # One Lanczos run per probe (each holds an (order, dim) basis); only the tridiagonal matrices come back.
    alphas, betas = driver.run(LANCZOS, loss_fn, params, {"restart_seed": draws[0]}, steps=m, static=(m, False),
                               each={"v0": probes})  # fmt: skip
    rules = []
    for a, b in zip(np.asarray(alphas), np.asarray(betas)):
        t = np.diag(a) + np.diag(b[:-1], 1) + np.diag(b[:-1], -1)
        theta, s = np.linalg.eigh(t)
        # Gauss quadrature: nodes are the Ritz values, weights the squared
        # first components of T's eigenvectors (‖v‖ = 1, so they sum to 1).
        rules.append((theta, s[0] ** 2))
    nodes, weights = (np.stack(a) for a in zip(*rules))
    lo, hi = float(nodes.min()), float(nodes.max())
    if sigma is None:
        sigma = 0.01 * (hi - lo) if hi > lo else 1e-3
    if np.ndim(grid) == 0:
        grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, int(grid))
    grid = np.asarray(grid, dtype=np.float64)
    gauss = np.exp(-0.5 * ((grid[:, None, None] - nodes[None]) / sigma) ** 2) / (sigma * np.sqrt(2 * np.pi))
    density = np.mean(np.sum(gauss * weights[None], axis=2), axis=1)
    return DensityResult(
        nodes=nodes,
        weights=weights,
        grid=grid,
        density=density,
        sigma=float(sigma),
        order=m,
        n_probes=int(n_probes),
        dim=int(dim),
        loss_info=loss_lib.info_of(loss_fn),
    )


def moments(result: DensityResult, p: int) -> float:
    """SLQ estimate of tr(H^p)/dim from a `DensityResult` (same as `result.moment(p)`)."""
    return result.moment(p)
