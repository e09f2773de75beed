"""wj.rollout_fn: the rollout as a pure function under jax.grad, against wj.rollout and finite
differences, with each checkpointing scheme; its memory grows sub-linearly in the steps."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import walrus_jax as wj
from walrus_jax.errors import DataError
from walrus_jax.inference import differentiable
from walrus_jax.models.config import OPEN, PERIODIC, WALL
from conftest import rel_err

BCS = ((PERIODIC, PERIODIC), (WALL, OPEN))
FI = np.array([4, 5, 3, 7])  # 3 variable fields + 1 constant field
N_STEPS = 5  # "sqrt": one segment of 3 steps and a remainder of 2


@functools.lru_cache(maxsize=None)
def tiny() -> wj.Walrus:
    return wj.Walrus(wj.ModelConfig.tiny(n_states=10, n_blocks=2), rngs=nnx.Rngs(1))


def data(seed=0):
    kx, kc = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (2, 3, 32, 32, 3))
    c = 1.0 + 0.1 * jax.random.normal(kc, (2, 32, 32, 1))
    return x, c


def build(model=None, checkpoint="sqrt", n_steps=N_STEPS, consts=None):
    return wj.rollout_fn(tiny() if model is None else model, field_indices=FI, bcs=BCS, n_steps=n_steps,
                         constant_fields=consts, checkpoint=checkpoint)


def loss_of(preds):
    """A smooth loss on the late states (the last two steps), weighted so no symmetry hides errors."""
    w = jnp.linspace(0.5, 1.5, preds.shape[-1])
    return jnp.mean(jnp.sin(preds[:, -2:]) * w)


@pytest.mark.parametrize("checkpoint", [c if c == "sqrt" else pytest.param(c, marks=pytest.mark.slow)
                                        for c in differentiable.CHECKPOINT_CHOICES])
def test_values_equal_the_rollout(checkpoint):
    x, c = data()
    want = wj.rollout(tiny(), x, field_indices=FI, bcs=BCS, n_steps=N_STEPS, constant_fields=c)
    got = jax.jit(build(checkpoint=checkpoint, consts=c))(x)
    assert got.shape == want.shape == (2, N_STEPS, 32, 32, 3)
    assert rel_err(got, want) <= 1e-6


@pytest.mark.slow
def test_checkpointing_schemes_give_the_same_gradients():
    x, c = data()
    grads = {name: jax.jit(jax.grad(lambda x, c, f=build(checkpoint=name): loss_of(f(x, c)), argnums=(0, 1)))(x, c)
             for name in differentiable.CHECKPOINT_CHOICES}
    for name in ("step", "sqrt"):
        for a, b in zip(grads[name], grads["none"]):
            assert rel_err(a, b) <= 1e-5, name


def _directional_fd(fun, h):
    """Central difference of fun along its argument's direction: (fun(+h) - fun(-h)) / 2h."""
    return (fun(h) - fun(-h)) / (2 * h)


@pytest.mark.slow
def test_gradient_wrt_initial_condition_and_constants_matches_finite_differences():
    x, c = data()
    f = build()
    loss = jax.jit(lambda x, c: loss_of(f(x, c)))
    gx, gc = jax.jit(jax.grad(lambda x, c: loss_of(f(x, c)), argnums=(0, 1)))(x, c)
    vx, vc = (jax.random.normal(jax.random.key(k), a.shape) for k, a in ((5, x), (6, c)))
    for g, v, along in ((gx, vx, lambda h: loss(x + h * vx, c)), (gc, vc, lambda h: loss(x, c + h * vc))):
        fd = _directional_fd(along, 1e-2)
        analytic = jnp.vdot(g, v)
        assert abs(fd - analytic) <= 1e-3 * abs(analytic), (float(fd), float(analytic))


@pytest.mark.slow
def test_gradient_wrt_weights_through_nnx_matches_finite_differences():
    x, c = data()
    model = tiny()

    def loss(m):
        return loss_of(build(m, consts=c)(x))

    grads = nnx.jit(nnx.grad(loss))(model)
    g = nnx.state(grads, nnx.Param)
    params = nnx.state(model, nnx.Param)
    # A random direction scaled to each weight's spread, so that a small step moves every weight
    # about as much relative to its size (an unscaled one is far outside the linear range of the
    # small embedding weights).
    keys = jax.random.split(jax.random.key(7), len(jax.tree.leaves(params)))
    direction = jax.tree.unflatten(jax.tree.structure(params),
                                   [jax.random.normal(k, p.shape) * (jnp.std(p) + 1e-2)
                                    for k, p in zip(keys, jax.tree.leaves(params))])
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def moved(h):
        p = jax.tree.map(lambda a, d: a + h * d, params, direction)
        return loss(nnx.merge(graphdef, p, rest))

    fd = _directional_fd(moved, 3e-3)
    analytic = sum(jnp.vdot(a, d) for a, d in zip(jax.tree.leaves(g), jax.tree.leaves(direction)))
    assert abs(fd - analytic) <= 1e-3 * abs(analytic), (float(fd), float(analytic))


def _temp_bytes(checkpoint, n_steps):
    x, c = data()
    f = build(checkpoint=checkpoint, n_steps=n_steps, consts=c)
    compiled = jax.jit(jax.grad(lambda x: loss_of(f(x)))).lower(x).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_sqrt_checkpointing_memory_grows_sublinearly():
    """From 16 to 64 steps, "step" keeps 4x the windows; "sqrt" about 2x (2 sqrt(n) windows), both far
    below keeping every step's activations ("none")."""
    none, step, sqrt = (_temp_bytes(name, 64) for name in ("none", "step", "sqrt"))
    assert sqrt < step < none, (sqrt, step, none)
    growth = (_temp_bytes("sqrt", 64) - _temp_bytes("sqrt", 16)) / (step - _temp_bytes("step", 16))
    assert growth < 0.5, growth


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="checkpoint='every' not in"):
        build(checkpoint="every")
    with pytest.raises(ValueError, match="n_steps must be >= 1"):
        build(n_steps=0)
    x, _ = data()
    with pytest.raises(DataError, match="field_indices has 4"):
        build()(x)  # no constant fields given: 3 channels for 4 field indices
