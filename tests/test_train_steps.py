"""The training objective, the optimizer / schedule and the jitted train step."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from ml_collections import config_dict

from walrus_jax import optim, steps
from walrus_jax.models import ModelConfig, Walrus


def train_cfg(**kw):
    base = dict(lr=1e-3, steps=100, warmup_steps=2, cooldown_steps=2, warmup_factor=0.1, cooldown_factor=1e-3,
                grad_accum=1, clip_norm=10.0, b1=0.9, b2=0.999, eps=1e-10, weight_decay=1e-4)
    base.update(kw)
    return config_dict.ConfigDict(base)


# ------------------------------------------------------------------------------ schedule
def test_schedule_hand_values():
    f = optim.warmup_invsqrt_cooldown(1.0, total_steps=20, warmup_steps=4, cooldown_steps=4,
                                      warmup_factor=0.1, cooldown_factor=0.001)
    hand = {0: 0.1, 2: 0.1 + 0.9 * 0.5, 4: 1.0, 9: np.sqrt(4 / 9), 15: np.sqrt(4 / 15),
            16: 0.5,  # cooldown starts at the decay's value sqrt(4/16)
            18: 0.001 + (0.5 - 0.001) * (1 - np.sqrt(0.5)), 19: 0.001 + (0.5 - 0.001) * (1 - np.sqrt(0.75))}
    for s, v in hand.items():
        assert float(f(s)) == pytest.approx(v, rel=1e-6), s
        assert optim.schedule_reference(s, 1.0, 20, 4, 4, 0.1, 0.001) == pytest.approx(v, rel=1e-12)
    # traced steps give the same values (the schedule runs inside the optimizer)
    np.testing.assert_allclose(jax.jit(jax.vmap(f))(jnp.arange(20)),
                               [optim.schedule_reference(s, 1.0, 20, 4, 4, 0.1, 0.001) for s in range(20)], rtol=1e-6)


def test_schedule_rejects_bad_lengths():
    with pytest.raises(ValueError, match="warmup_steps \\+ train.cooldown_steps = 12 exceeds train.steps = 10"):
        optim.warmup_invsqrt_cooldown(1.0, 10, 6, 6)


def test_adamw_matches_torch_formula():
    """One AdamW update from the release's settings, by hand: p - lr*(m̂/(sqrt(v̂)+eps) + wd*p)."""
    tc = train_cfg(lr=0.5, warmup_steps=0, cooldown_steps=0, clip_norm=None, weight_decay=0.1)
    tx = optim.make_optimizer(tc)
    p = {"w": jnp.array([1.0, -2.0])}
    g = {"w": jnp.array([0.3, 0.4])}
    upd, _ = tx.update(g, tx.init(p), p)
    new = optax.apply_updates(p, upd)
    m_hat, v_hat = np.array([0.3, 0.4]), np.array([0.3, 0.4]) ** 2  # bias-corrected first step
    hand = np.array([1.0, -2.0]) - 0.5 * (m_hat / (np.sqrt(v_hat) + 1e-10) + 0.1 * np.array([1.0, -2.0]))
    # optax forms the bias correction 1 - 0.999**t in float32 (torch: in Python float64), which
    # moves the first update by ~7e-6 relative; anything larger would be a formula difference.
    np.testing.assert_allclose(new["w"], hand, rtol=1e-5)


# ------------------------------------------------------------------------------ loss
class Scale(nnx.Module):
    """Stand-in model with the Walrus call signature: y = w · x (per channel)."""

    def __init__(self, c):
        self.cfg = ModelConfig.tiny(jitter_patches=False)
        self.w = nnx.Param(jnp.linspace(0.5, 1.5, c))

    def __call__(self, x, field_indices, bcs, jitter=None, *, train=False, key=None):
        return x * self.w[...]


def _batch(rng, b=2, t=3, h=4, w=4, cv=3, cc=1, mask=(True, False, True)):
    return {"input_fields": rng.normal(size=(b, t, h, w, cv)).astype(np.float32),
            "output_fields": rng.normal(size=(b, 1, h, w, cv)).astype(np.float32),
            "constant_fields": rng.normal(size=(b, h, w, cc)).astype(np.float32),
            "field_indices": np.arange(3, 3 + cv + cc),
            "padded_field_mask": np.array(mask)}


def test_loss_matches_hand_computation():
    rng = np.random.default_rng(0)
    batch = _batch(rng)
    model = Scale(4)
    loss, _ = steps.compute_loss(model, {k: jnp.asarray(v) for k, v in batch.items()}, None, bcs=((2, 2), (2, 2)),
                                 opts=steps.StepOptions(loss_multiplier=100.0, jitter=False), train=False)
    # by hand, in float64 numpy
    inp, out, con = (batch[k].astype(np.float64) for k in ("input_fields", "output_fields", "constant_fields"))
    x = np.concatenate([inp, np.repeat(con[:, None], 3, axis=1)], -1)  # (B, T, H, W, 4)
    s_rms = np.maximum(np.sqrt((x ** 2).mean(axis=(1, 2, 3), keepdims=True)), 1e-5)
    d = np.diff(x, axis=1)
    d_rms = np.maximum(np.sqrt((d ** 2).mean(axis=(1, 2, 3), keepdims=True)), 1e-5)
    nxt = np.concatenate([out[:, :1], con[:, None]], -1)
    target = np.diff(np.concatenate([x, nxt], 1), axis=1) / d_rms
    y = (x / s_rms) * np.linspace(0.5, 1.5, 4)
    mae = np.abs(y - target)[..., :3].mean(axis=(2, 3))  # (B, T, 3): the_well MAE over space
    per_sample = mae[..., [0, 2]].mean(-1)  # padded field 1 excluded
    assert float(loss) == pytest.approx(100.0 * per_sample.mean(), rel=1e-5)


def test_loss_ignores_padded_fields_and_constants():
    rng = np.random.default_rng(1)
    batch = _batch(rng)
    opts = steps.StepOptions(jitter=False)
    f = lambda b: float(steps.compute_loss(Scale(4), {k: jnp.asarray(v) for k, v in b.items()}, None,
                                           bcs=((2, 2), (2, 2)), opts=opts, train=False)[0])
    base = f(batch)
    changed = dict(batch, output_fields=batch["output_fields"].copy())
    changed["output_fields"][..., 1] += 5.0  # the padded field's next frame
    assert f(changed) == pytest.approx(base, rel=1e-6)
    changed["output_fields"][..., 0] += 5.0  # a real field's next frame
    assert f(changed) > base + 1.0


# ------------------------------------------------------------------------------ accumulation
class Lin(nnx.Module):
    """Stand-in model (a per-channel affine map) so that accumulation is checked in isolation."""

    def __init__(self, c):
        self.cfg = ModelConfig.tiny(jitter_patches=False)
        self.w = nnx.Param(jnp.ones((c, c)) * 0.1 + jnp.eye(c))
        self.b = nnx.Param(jnp.zeros((c,)))

    def __call__(self, x, field_indices, bcs, jitter=None, *, train=False, key=None):
        return x @ self.w[...] + self.b[...]


def _run(tx, state, batches, graphdef, rest):
    fn = steps.build_train_step(graphdef, tx, steps.StepOptions(jitter=False))
    losses = []
    for b in batches:
        state, m = fn(state, {k: jnp.asarray(v) for k, v in b.items()}, rest, ((2, 2), (2, 2)))
        losses.append(float(m["loss"]))
    return state, losses


def test_grad_accumulation_equals_one_big_batch():
    rng = np.random.default_rng(2)
    b1, b2 = _batch(rng, b=2), _batch(rng, b=2)
    big = {k: (np.concatenate([b1[k], b2[k]]) if k in steps.BATCH_KEYS else b1[k]) for k in b1}
    g, p, r = nnx.split(Lin(4), nnx.Param, ...)
    params, rest = jax.tree.map(np.array, nnx.to_pure_dict(p)), nnx.to_pure_dict(r)  # host copies: states are donated
    key = jax.random.key(0)
    tx_acc = optim.make_optimizer(train_cfg(grad_accum=2, lr=1e-2))
    tx_one = optim.make_optimizer(train_cfg(grad_accum=1, lr=1e-2))
    s_acc, _ = _run(tx_acc, steps.init_state(jax.tree.map(jnp.asarray, params), tx_acc, key), [b1], g, rest)
    # after one micro-batch of two, nothing is applied yet
    np.testing.assert_array_equal(s_acc["params"]["w"], params["w"])
    s_acc, _ = _run(tx_acc, s_acc, [b2], g, rest)
    s_one, _ = _run(tx_one, steps.init_state(jax.tree.map(jnp.asarray, params), tx_one, key), [big], g, rest)
    assert not np.allclose(s_one["params"]["w"], params["w"])
    for a, b in zip(jax.tree.leaves(s_acc["params"]), jax.tree.leaves(s_one["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_frozen_parameters_do_not_move():
    rng = np.random.default_rng(3)
    g, p, r = nnx.split(Lin(4), nnx.Param, ...)
    params, rest = jax.tree.map(np.array, nnx.to_pure_dict(p)), nnx.to_pure_dict(r)
    tx = optim.make_optimizer(train_cfg(lr=1e-2), trainable_mask={"w": False, "b": True})
    s, _ = _run(tx, steps.init_state(jax.tree.map(jnp.asarray, params), tx, jax.random.key(0)),
                [_batch(rng), _batch(rng)], g, rest)
    np.testing.assert_array_equal(s["params"]["w"], params["w"])
    assert np.abs(np.asarray(s["params"]["b"])).max() > 1e-4


# ------------------------------------------------------------------------------ the real model
@pytest.fixture(scope="module")
def tiny_walrus():
    cfg = ModelConfig.tiny(drop_path=0.1)
    g, p, r = nnx.split(Walrus(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    return g, nnx.to_pure_dict(p), nnx.to_pure_dict(r)


def test_train_step_lowers_loss_on_a_fixed_batch(tiny_walrus):
    g, params, rest = tiny_walrus
    rng = np.random.default_rng(4)
    t = np.linspace(0, 1, 32, dtype=np.float32)
    wave = np.sin(2 * np.pi * (t[:, None] + t[None, :]))[None, None, :, :, None]
    frames = np.stack([np.roll(wave, k, axis=2) for k in range(3)], axis=1)[:, :, 0]  # (1, 3, 32, 32, 1)
    inp = np.concatenate([frames, 0.5 * frames], -1).repeat(2, 0) + 0.01 * rng.normal(size=(2, 3, 32, 32, 2))
    batch = {"input_fields": inp[:, :2].astype(np.float32), "output_fields": inp[:, 2:].astype(np.float32),
             "constant_fields": np.zeros((2, 32, 32, 0), np.float32), "field_indices": np.array([4, 5]),
             "padded_field_mask": np.array([True, True]), "boundary_conditions": np.array([[2, 2], [2, 2]])}
    db, bcs = steps.device_batch(batch)
    assert bcs == ((2, 2), (2, 2))
    db = {k: jnp.asarray(v) for k, v in db.items()}
    tx = optim.make_optimizer(train_cfg(lr=3e-3, warmup_steps=0, cooldown_steps=0))
    opts = steps.StepOptions()
    state = steps.init_state(params, tx, jax.random.key(0))
    ev = steps.build_eval_loss(g, opts)
    before = float(ev(state["params"], db, rest, bcs=bcs))
    fn = steps.build_train_step(g, tx, opts)
    losses = []
    for _ in range(6):
        state, m = fn(state, db, rest, bcs)
        losses.append(float(m["loss"]))
    after = float(ev(state["params"], db, rest, bcs=bcs))
    assert np.isfinite(losses).all()
    assert int(state["step"]) == 6
    assert after < 0.8 * before, (before, after, losses)


def test_device_batch_errors():
    with pytest.raises(KeyError, match="boundary_conditions"):
        steps.device_batch({"input_fields": np.zeros((1, 1, 32, 32, 1))})
    with pytest.raises(ValueError, match="differ across the batch"):
        steps.device_batch({"boundary_conditions": np.array([[[2, 2]], [[0, 1]]]), "input_fields": 0,
                            "output_fields": 0, "field_indices": 0})
