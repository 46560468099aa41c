"""The README's code runs as written."""

from __future__ import annotations

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_optax_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(block for block in blocks if "jaxsam.sam_transform" in block)
    namespace: dict = {}
    exec(compile(example, str(README), "exec"), namespace)  # noqa: S102
    # One SAM+Adam step from zero moves every parameter by the learning rate.
    params = namespace["params"]
    assert abs(float(params["b"][0]) - 1e-3) < 1e-6


def test_readme_sam_section_runs_as_written():
    """Every python block of "SAM in any optax pipeline", in order in one namespace (they build on each other):
    the optax step, inject_hyperparams, BatchNorm with has_aux, NNX, Momentum-SAM."""
    import math

    text = README.read_text()
    start = text.index("## SAM in any optax pipeline")
    section = text[start:text.index("\n## ", start + 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) >= 5
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102
    # The BatchNorm example's perturbed loss is the loss at w + ε, above the clean one.
    assert math.isfinite(float(namespace["loss"])) and float(namespace["perturbed_loss"]) > float(namespace["loss"])
    assert int(namespace["opt_state"][0].count) == 2  # the Momentum-SAM loop ran its two steps


def test_readme_geometry_example_runs_and_its_numbers_are_the_dense_hessians():
    """The geometry section's NNX regression: λ1..3 are the dense Hessian's top eigenvalues (float32
    Lanczos, 50 steps on 193 parameters), the Hutchinson trace is within 4 standard errors of tr(H)."""
    import jax
    import numpy as np
    from jax.flatten_util import ravel_pytree

    text = README.read_text()
    start = text.index("## Geometry: how sharp is the minimum?")
    section = text[start:text.index("\n## ", start + 1)]
    example = next(block for block in re.findall(r"```python\n(.*?)```", section, flags=re.S) if "nnx" in block)
    namespace: dict = {}
    exec(compile(example, str(README), "exec"), namespace)  # noqa: S102
    ns = namespace
    flat, unravel = ravel_pytree(ns["params"])
    from flax import nnx

    graphdef, _ = nnx.split(ns["model"], nnx.Param)

    def loss(v):
        out = nnx.merge(graphdef, unravel(v))(ns["x"])
        return np.float32(1 / len(ns["x"])) * ns["squared_error"](out, ns["y"]).sum()

    h = np.asarray(jax.jit(jax.hessian(loss))(flat), np.float64)
    spectrum = np.linalg.eigvalsh(h)[::-1]
    np.testing.assert_allclose(ns["top"].eigenvalues, spectrum[:3], rtol=1e-4)
    assert abs(ns["trace"].trace - np.trace(h)) < 4 * ns["trace"].standard_error
    assert ns["worst"].value > 0 and ns["worst"].at_boundary
