"""Shared test fixtures: float64 switch, a tiny network and a fake batch."""

from __future__ import annotations

import os

# One persistent XLA compilation cache for the tests and the subprocesses they
# start (which inherit the variables), kept in .pytest_cache/ between sessions.
# XLA:CPU compiles a ResNet's initializers in over ten seconds, and a study
# compiles the same programs for every arm: with the cache they compile once.
# Set before JAX is imported, which reads them at import.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "jax_compilation_cache"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def x64():
    """float64 inside one test (correctness checks), restored afterwards."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


def mlp_init(key, sizes=(5, 7, 3)):
    """Parameters of a small tanh MLP: a dict of {'dense_i': {'kernel', 'bias'}}."""
    params = {}
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, k1, k2 = jax.random.split(key, 3)
        params[f"dense_{i}"] = {
            "kernel": jax.random.normal(k1, (n_in, n_out)) / jnp.sqrt(n_in),
            "bias": 0.1 * jax.random.normal(k2, (n_out,)),
        }
    return params


def mlp_loss(params, batch):
    """Mean softmax cross-entropy of the MLP on (inputs, integer labels)."""
    x, y = batch
    n_layers = len(params)
    for i in range(n_layers):
        x = x @ params[f"dense_{i}"]["kernel"] + params[f"dense_{i}"]["bias"]
        if i < n_layers - 1:
            x = jnp.tanh(x)
    log_probs = jax.nn.log_softmax(x)
    return -jnp.mean(jnp.take_along_axis(log_probs, y[:, None], axis=1))


@pytest.fixture
def mlp_problem():
    """(params, batch, loss) of a tiny random classification problem."""
    key = jax.random.key(0)
    k_params, k_x, k_y = jax.random.split(key, 3)
    params = mlp_init(k_params)
    batch = (jax.random.normal(k_x, (16, 5)), jax.random.randint(k_y, (16,), 0, 3))
    return params, batch, mlp_loss


def pytest_collection_modifyitems(config, items):
    """Tests marked slow first. pytest-xdist hands out the shared-fixture groups first (largest
    group first) and then single tests in collection order; a slow single test collected last
    (the two-process run in test_train.py) would otherwise start last and leave one worker idle."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def tiny_train_config(**overrides):
    """A training config of seconds: the smoke network on 128 synthetic images, 2 epochs of 4 steps."""
    from jaxsam.config import base_config

    c = base_config("smoke")
    c.train.progress = False
    c.data.synthetic_train = 128
    c.data.synthetic_test = 64
    c.train.batch_size = 32
    c.train.eval_batch_size = 32
    c.train.num_epochs = 2
    c.optimizer.learning_rate = 0.05
    c.update_from_flattened_dict(overrides)
    return c
