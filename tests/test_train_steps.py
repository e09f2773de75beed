"""The training objective, the optimizer / schedule and the jitted train step, against the
original trainer's numbers (tests/fixtures/train_oracle_*.npz, recorded from its own code)."""
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from walrus_jax.errors import ConfigError
from walrus_jax.training import optim, steps
from walrus_jax.models import ModelConfig, Walrus
from tools import check_train_oracle

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
ORACLE_2D = os.path.join(FIXTURES, "train_oracle_2d.npz")
ORACLE_MASK = os.path.join(FIXTURES, "train_oracle_2d_mask.npz")


def sched(base_lr=1e-3, max_epochs=100, warmup=0, cooldown=0, **kw):
    return optim.Schedule(base_lr=base_lr, max_epochs=max_epochs, warmup_epochs=warmup, cooldown_epochs=cooldown, **kw)


# ------------------------------------------------------------------------------ schedule
def test_schedule_matches_the_original_sequences():
    f = np.load(ORACLE_2D)
    release = sched(2e-4, 200, 10, 10, steps_per_epoch=500)
    per_epoch = np.asarray(f["lr_released/per_epoch"])
    np.testing.assert_allclose([release.lr_at(L) for L in range(200)], per_epoch, rtol=1e-12)
    np.testing.assert_allclose([release(u) for u in range(300)], f["lr_released/per_update_first300"], rtol=1e-12)
    assert release(499) == release(0) and release(500) == pytest.approx(per_epoch[1], rel=1e-12)  # a staircase
    per_update = sched(2e-4, 200, 10, 10, steps_per_epoch=500, per_update=True)
    idx = f["lr_released_perstep_variant/index_sample"]
    np.testing.assert_allclose([per_update(int(u)) for u in idx], f["lr_released_perstep_variant/per_update_sample"],
                               rtol=1e-9)
    small = np.asarray(f["lr_small_w10_c10_max100/per_update"])
    s = sched(2e-4, 100, 10, 10)
    ours = np.array([s(u) for u in range(300)])
    np.testing.assert_allclose(ours[:102], small[:102], rtol=1e-12, atol=1e-20)
    assert (small[102:] < 0).all() and (ours[102:] == 0).all()  # past the end: clamped, never negative
    # traced (inside the optimizer) in float32
    np.testing.assert_allclose(jax.jit(jax.vmap(release))(jnp.arange(0, 100000, 97)),
                               [release(u) for u in range(0, 100000, 97)], rtol=2e-6)


def test_schedule_lengths_are_checked_and_follow_the_run():
    with pytest.raises(ValueError, match="warmup_epochs \\+ train.cooldown_epochs = 12 pseudo-epochs exceeds the run's 10"):
        sched(max_epochs=10, warmup=6, cooldown=6)
    from ml_collections import config_dict
    t = config_dict.ConfigDict(dict(steps=12, steps_per_epoch=1, lr_per_update=False, warmup_epochs=-1,
                                    cooldown_epochs=-1, lr=1.0, warmup_factor=0.1, lr_offset=128.0, lr_exponent=0.5))
    assert optim.resolve_epochs(t) == (12, 1, 1)
    t.steps, t.steps_per_epoch = 100_000, 500
    assert optim.resolve_epochs(t) == (200, 10, 10)  # the release's proportions


# ------------------------------------------------------------------------------ optimizer
def _adamw_by_hand(p, grads_per_update, lrs, b1=0.9, b2=0.999, eps=1e-10, wd=0.0, clip=None):
    """torch AdamW on one tensor in float64; a None gradient skips the update (no step count)."""
    p = np.asarray(p, np.float64).copy()
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    t = 0
    for g, lr in zip(grads_per_update, lrs):
        if g is None:
            continue
        g = np.asarray(g, np.float64)
        t += 1
        p *= 1 - lr * wd
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p -= lr / (1 - b1 ** t) * m / (np.sqrt(v) / np.sqrt(1 - b2 ** t) + eps)
    return p


def test_adamw_matches_torch_and_skips_absent_gradients():
    opt = optim.OptimizerConfig(clip_norm=None, weight_decay=0.1)
    s = sched(0.5, max_epochs=10)
    tx = optim.build(opt, s)
    params = {"a": jnp.array([1.0, -2.0]), "b": jnp.array([0.5, 0.25, -1.0])}
    ga = [np.array([0.3, 0.4]), np.array([-0.1, 0.2]), np.array([0.05, -0.3])]
    gb = [np.array([1.0, -1.0, 0.5]), np.array([0.2, 0.1, 0.3]), np.array([-0.4, 0.0, 0.1])]
    present_b = [False, True, True]  # "b" has no gradient in the first update: skipped entirely
    state = tx.init(params)
    p = params
    for i in range(3):
        g = {"a": jnp.asarray(ga[i]), "b": jnp.asarray(gb[i] if present_b[i] else np.zeros(3))}
        u, state = tx.update(g, state, p, present={"a": True, "b": present_b[i]})
        p = optax.apply_updates(p, u)
    lrs = [s(u) for u in range(3)]  # the update index drives the schedule, whichever parameter skipped
    # float32 against float64: a few roundings of O(1) parameters, so an absolute bound of a few
    # float32 eps times the largest parameter (2), on top of a relative one
    tol = dict(rtol=2e-6, atol=4 * np.finfo(np.float32).eps * 2.0)
    np.testing.assert_allclose(p["a"], _adamw_by_hand([1.0, -2.0], ga, lrs, wd=0.1), **tol)
    hand_b = _adamw_by_hand([0.5, 0.25, -1.0], [None, gb[1], gb[2]], lrs, wd=0.1)
    np.testing.assert_allclose(p["b"], hand_b, **tol)
    adam = optim._find(state, optim.TorchAdamWState)
    assert int(adam.step["a"]) == 3 and int(adam.step["b"]) == 2


def test_optimizer_by_name_and_its_arguments():
    assert optim.parse_args("b1=0.95, weight_decay=0.1,  nesterov=True") == (
        ("b1", 0.95), ("weight_decay", 0.1), ("nesterov", True))
    with pytest.raises(ConfigError, match="'b1=' .*not a Python literal|is not a Python literal"):
        optim.parse_args("b1=fast")
    with pytest.raises(ConfigError, match="not key=value"):
        optim.parse_args("0.9")
    with pytest.raises(ConfigError, match="'adamx' is neither 'release' nor an optax optimizer"):
        optim.OptimizerConfig(name="adamx")
    with pytest.raises(ConfigError, match="train.optimizer='lion' with train.optimizer_args.*colour"):
        optim.build(optim.OptimizerConfig(name="lion", args=(("colour", 1),)), sched(1e-3))
    # another optax optimizer gets the same schedule, clipping and accumulation around it
    tx = optim.build(optim.OptimizerConfig(name="sgd", clip_norm=1.0, grad_accum=2), sched(0.5, max_epochs=10))
    params = {"w": jnp.array([1.0, 2.0])}
    state = tx.init(params)
    u, state = tx.update({"w": jnp.array([3.0, 0.0])}, state, params)
    np.testing.assert_array_equal(u["w"], [0.0, 0.0])
    u, state = tx.update({"w": jnp.array([0.0, 4.0])}, state, params)
    lr = float(sched(0.5, max_epochs=10)(0))
    np.testing.assert_allclose(u["w"], -lr * np.array([3.0, 4.0]) / (5.0 + 1e-6), rtol=1e-6)


def test_clipping_coefficient_and_accumulation():
    opt = optim.OptimizerConfig(clip_norm=1.0, grad_accum=2, weight_decay=0.0)
    s = sched(1e-2, max_epochs=10)
    tx = optim.build(opt, s)
    params = {"w": jnp.array([1.0, 2.0])}
    state = tx.init(params)
    u, state = tx.update({"w": jnp.array([3.0, 0.0])}, state, params)
    p = optax.apply_updates(params, u)
    np.testing.assert_array_equal(p["w"], params["w"])  # first of two micro-batches: nothing applied
    u, state = tx.update({"w": jnp.array([0.0, 4.0])}, state, p)
    p = optax.apply_updates(p, u)
    last = optim.last_update(state, s)
    assert float(last["grad_norm"]) == pytest.approx(5.0, rel=1e-6)
    assert float(last["clip_coef"]) == pytest.approx(1.0 / (5.0 + 1e-6), rel=1e-6)
    assert float(last["lr"]) == pytest.approx(float(s(0)))
    # Adam's first step is ±lr whatever the scale
    np.testing.assert_allclose(p["w"], [1.0 - 1e-2, 2.0 - 1e-2], rtol=1e-6)
    assert int(state.count) == 1 and int(state.micro) == 0


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


def _loss(batch, **kw):
    opts = steps.StepOptions(loss_multiplier=100.0, jitter=False, **kw)
    return float(steps.compute_loss(Scale(4), {k: jnp.asarray(v) for k, v in batch.items()}, None,
                                    bcs=((2, 2), (2, 2)), opts=opts, train=False)[0])


def _loss_by_hand(batch, minimum_context=1, object_mask=None):
    inp, out, con = (batch[k].astype(np.float64) for k in ("input_fields", "output_fields", "constant_fields"))
    t = inp.shape[1]
    x = np.concatenate([inp, np.repeat(con[:, None], t, axis=1)], -1)  # (B, T, H, W, 4)
    s_rms = np.maximum(np.sqrt((x ** 2).mean(axis=(1, 2, 3), keepdims=True)), 1e-5)
    d_rms = np.maximum(np.sqrt((np.diff(x, axis=1) ** 2).mean(axis=(1, 2, 3), keepdims=True)), 1e-5)
    nxt = np.concatenate([out[:, :1], con[:, None]], -1)
    target = (np.diff(np.concatenate([x, nxt], 1), axis=1) / d_rms)[..., :3]
    y = ((x / s_rms) * np.linspace(0.5, 1.5, 4))[..., :3]
    real = np.asarray(batch["padded_field_mask"], np.float64)
    y, target = y * real, target * real  # padded channel: prediction and target 0
    if object_mask is not None:
        keep = (object_mask == 0)[:, None, :, :, None]
        y, target = y * keep, target * keep
    mae = np.abs(y - target).mean(axis=(2, 3))  # (B, T, 3): the_well MAE over space
    return 100.0 * mae[:, minimum_context:].mean()  # every channel (the padded one too) in the mean


def test_loss_matches_hand_computation():
    batch = _batch(np.random.default_rng(0))
    assert _loss(batch) == pytest.approx(_loss_by_hand(batch), rel=1e-5)
    assert _loss(batch, minimum_context=0) == pytest.approx(_loss_by_hand(batch, 0), rel=1e-5)
    assert _loss(batch, minimum_context=2) == pytest.approx(_loss_by_hand(batch, 2), rel=1e-5)


def test_global_normalization_from_dataset_statistics():
    """With the dataset's rms / rms_delta in the batch (fine-tuning), they replace the per-sample RMS."""
    batch = _batch(np.random.default_rng(6))
    rms, rms_delta = np.array([1.5, 0.0, 2.0, 0.7], np.float32), np.array([0.3, 0.0, 0.2, 0.0], np.float32)
    got = _loss(dict(batch, norm_rms=rms, norm_rms_delta=rms_delta))
    inp, out, con = (batch[k].astype(np.float64) for k in ("input_fields", "output_fields", "constant_fields"))
    x = np.concatenate([inp, np.repeat(con[:, None], 3, axis=1)], -1)
    nxt = np.concatenate([out[:, :1], con[:, None]], -1)
    target = (np.diff(np.concatenate([x, nxt], 1), axis=1) / (rms_delta + 1e-8))[..., :3]
    y = ((x / (rms + 1e-8)) * np.linspace(0.5, 1.5, 4))[..., :3]
    real = np.asarray(batch["padded_field_mask"], np.float64)
    mae = np.abs(y * real - target * real).mean(axis=(2, 3))
    assert got == pytest.approx(100.0 * mae[:, 1:].mean(), rel=1e-5)


def test_object_mask_from_a_constant_field_named_mask():
    rng = np.random.default_rng(5)
    batch = _batch(rng)
    disc = (rng.uniform(size=(2, 4, 4)) > 0.6).astype(np.float32)
    batch["constant_fields"] = disc[..., None]
    names = np.array(["pressure", "velocity_x", "velocity_y", "mask"])
    db, _ = steps.device_batch(dict(batch, field_names=names, boundary_conditions=np.array([[2, 2], [2, 2]])))
    np.testing.assert_array_equal(db["object_mask"], disc)
    assert _loss(dict(batch, object_mask=disc)) == pytest.approx(_loss_by_hand(batch, object_mask=disc), rel=1e-5)
    db, _ = steps.device_batch(dict(batch, field_names=np.array(["p", "u", "v", "c"]),
                                    boundary_conditions=np.array([[2, 2], [2, 2]])))
    assert "object_mask" not in db  # no field named "mask": nothing masked


def test_loss_ignores_padded_fields_and_constants():
    batch = _batch(np.random.default_rng(1))
    base = _loss(batch)
    changed = dict(batch, output_fields=batch["output_fields"].copy())
    changed["output_fields"][..., 1] += 5.0  # the padded field's next frame
    assert _loss(changed) == pytest.approx(base, rel=1e-6)
    changed["output_fields"][..., 0] += 5.0  # a real field's next frame
    assert _loss(changed) > base + 1.0


# ------------------------------------------------------------------------------ accumulation
class Lin(nnx.Module):
    """Stand-in model (a per-channel affine map) so that accumulation is checked in isolation."""

    def __init__(self, c):
        self.cfg = ModelConfig.tiny(jitter_patches=False)
        self.w = nnx.Param(jnp.ones((c, c)) * 0.1 + jnp.eye(c))
        self.b = nnx.Param(jnp.zeros((c,)))

    def __call__(self, x, field_indices, bcs, jitter=None, *, train=False, key=None):
        return x @ self.w[...] + self.b[...]


def _run(opt, state, batches, graphdef, rest, mask=None, lr=1e-2):
    fn = steps.build_train_step(graphdef, optim.build(opt, sched(lr), mask), sched(lr),
                                steps.StepOptions(jitter=False, grad_accum=opt.grad_accum), trainable_mask=mask)
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
    acc, one = optim.OptimizerConfig(grad_accum=2), optim.OptimizerConfig(grad_accum=1)
    tx_acc, tx_one = optim.build(acc, sched(1e-2)), optim.build(one, sched(1e-2))
    s_acc, _ = _run(acc, steps.init_state(jax.tree.map(jnp.asarray, params), tx_acc, key), [b1], g, rest)
    np.testing.assert_array_equal(s_acc["params"]["w"], params["w"])  # one micro-batch of two: nothing applied
    s_acc, _ = _run(acc, s_acc, [b2], g, rest)
    s_one, _ = _run(one, steps.init_state(jax.tree.map(jnp.asarray, params), tx_one, key), [big], g, rest)
    assert not np.allclose(s_one["params"]["w"], params["w"])
    np.testing.assert_allclose(optim.last_update(s_acc["opt_state"], sched(1e-2))["grad_norm"],
                               optim.last_update(s_one["opt_state"], sched(1e-2))["grad_norm"], rtol=1e-5)
    chex.assert_trees_all_close(s_acc["params"], s_one["params"], rtol=1e-6, atol=1e-7)


def test_frozen_parameters_do_not_move():
    rng = np.random.default_rng(3)
    g, p, r = nnx.split(Lin(4), nnx.Param, ...)
    params, rest = jax.tree.map(np.array, nnx.to_pure_dict(p)), nnx.to_pure_dict(r)
    opt, mask = optim.OptimizerConfig(), {"w": False, "b": True}
    state = steps.init_state(jax.tree.map(jnp.asarray, params), optim.build(opt, sched(1e-2), mask),
                             jax.random.key(0), mask)
    assert set(optim._find(state["opt_state"], optim.TorchAdamWState).mu) == {"b"}  # no moments for frozen ones
    s, _ = _run(opt, state, [_batch(rng), _batch(rng)], g, rest, mask)
    np.testing.assert_array_equal(s["params"]["w"], params["w"])
    assert np.abs(np.asarray(s["params"]["b"])).max() > 1e-4


def test_present_mask_follows_the_encoder_the_model_uses():
    params = {"embed": {"d2": {"w": 0}, "d3": {"w": 0}}, "debed": {"d2": {"w": 0}, "d3": {"w": 0}},
              "processor": {"w": 0}}
    assert steps.present_mask(params, steps.active_spatial_axes((2, 4, 32, 32, 1, 4))) == {
        "embed": {"d2": {"w": True}, "d3": {"w": False}}, "debed": {"d2": {"w": True}, "d3": {"w": False}},
        "processor": {"w": True}}


# ------------------------------------------------------------------------------ the real model
@pytest.fixture(scope="module")
def tiny_walrus():
    cfg = ModelConfig.tiny(drop_path=0.1)
    g, p, r = nnx.split(Walrus(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    return g, nnx.to_pure_dict(p), nnx.to_pure_dict(r)


@pytest.fixture(scope="module")
def tiny_walrus_no_drop():
    g, p, r = nnx.split(Walrus(ModelConfig.tiny(drop_path=0.0, input_field_drop=0.0), rngs=nnx.Rngs(0)), nnx.Param, ...)
    return g, nnx.to_pure_dict(p), nnx.to_pure_dict(r)


@pytest.mark.slow
def test_rollout_loss_is_the_mean_of_one_step_losses_along_the_models_own_rollout(tiny_walrus_no_drop):
    """rollout_steps = 3: the loss is the mean of the usual one-step loss and, for j = 1, 2, the loss of
    the last prediction made from the window that holds the model's own predictions (taken here from
    wj.rollout, the inference path); k = 1 reads only the first output frame."""
    from walrus_jax.inference import rollouts

    g, params, rest = tiny_walrus_no_drop
    model = nnx.merge(g, nnx.State(params), nnx.State(rest))
    rng = np.random.default_rng(9)
    fi = np.array([3, 4, 5])
    inp = rng.normal(size=(2, 4, 32, 32, 3)).astype(np.float32)
    out = rng.normal(size=(2, 3, 32, 32, 3)).astype(np.float32)
    bcs = ((2, 2), (2, 2))

    def loss(batch, **kw):
        opts = steps.StepOptions(jitter=False, **kw)
        batch = {k: jnp.asarray(v) for k, v in batch.items()} | {"field_indices": jnp.asarray(fi)}
        # train=True without a key: no drop path, no jitter (deterministic, as the rollout)
        return float(steps.compute_loss(model, batch, None, bcs=bcs, opts=opts, train=True)[0])

    preds = np.asarray(rollouts.rollout(model, inp, field_indices=fi, bcs=bcs, n_steps=2))
    frames = np.concatenate([inp, preds], axis=1)
    terms = [loss({"input_fields": inp, "output_fields": out[:, :1]})]
    for j in (1, 2):  # minimum_context = T - 1: only the last prediction is scored
        terms.append(loss({"input_fields": frames[:, j:j + 4], "output_fields": out[:, j:j + 1]}, minimum_context=3))
    got = loss({"input_fields": inp, "output_fields": out}, rollout_steps=3)
    assert got == pytest.approx(np.mean(terms), rel=1e-5)
    assert loss({"input_fields": inp, "output_fields": out}) == terms[0]
    through = loss({"input_fields": inp, "output_fields": out}, rollout_steps=3, rollout_stop_gradient=False)
    assert through == got  # the same value; only the gradient differs
    with pytest.raises(ValueError, match="rollout_steps=4 needs 4 output frames"):
        loss({"input_fields": inp, "output_fields": out}, rollout_steps=4)


@pytest.mark.slow
def test_rollout_loss_gradient_flows_through_the_predicted_frames_unless_stopped(tiny_walrus_no_drop):
    g, params, rest = tiny_walrus_no_drop
    rng = np.random.default_rng(10)
    batch = {"input_fields": jnp.asarray(rng.normal(size=(2, 4, 32, 32, 3)), jnp.float32),
             "output_fields": jnp.asarray(rng.normal(size=(2, 2, 32, 32, 3)), jnp.float32),
             "field_indices": jnp.array([3, 4, 5])}

    def grads(**kw):
        opts = steps.StepOptions(jitter=False, rollout_steps=2, **kw)
        fn = lambda p: steps.compute_loss(nnx.merge(g, nnx.State(p), nnx.State(rest)), batch, None,  # noqa: E731
                                          bcs=((2, 2), (2, 2)), opts=opts, train=True)[0]
        return np.concatenate([np.ravel(a) for a in jax.tree.leaves(jax.jit(jax.grad(fn))(params))])

    full, stopped = grads(rollout_stop_gradient=False), grads(rollout_stop_gradient=True)
    assert np.isfinite(full).all() and np.isfinite(stopped).all()
    assert np.abs(full - stopped).max() > 1e-6 * np.abs(full).max()


@pytest.mark.slow
@pytest.mark.parametrize("name, lr", [("release", 3e-3), ("lion", 3e-4)])  # lion: the usual 10x smaller lr
def test_train_step_lowers_loss_on_a_fixed_batch(tiny_walrus, name, lr):
    g, params, rest = tiny_walrus
    params = jax.tree.map(jnp.array, params)  # a copy: the step donates its state
    rng = np.random.default_rng(4)
    t = np.linspace(0, 1, 32, dtype=np.float32)
    wave = np.sin(2 * np.pi * (t[:, None] + t[None, :]))[None, None, :, :, None]
    frames = np.stack([np.roll(wave, k, axis=2) for k in range(4)], axis=1)[:, :, 0]  # (1, 4, 32, 32, 1)
    inp = np.concatenate([frames, 0.5 * frames], -1).repeat(2, 0) + 0.01 * rng.normal(size=(2, 4, 32, 32, 2))
    batch = {"input_fields": inp[:, :3].astype(np.float32), "output_fields": inp[:, 3:].astype(np.float32),
             "constant_fields": np.zeros((2, 32, 32, 0), np.float32), "field_indices": np.array([4, 5]),
             "padded_field_mask": np.array([True, True]), "boundary_conditions": np.array([[2, 2], [2, 2]])}
    db, bcs = steps.device_batch(batch)
    assert bcs == ((2, 2), (2, 2))
    db = {k: jnp.asarray(v) for k, v in db.items()}
    opts = steps.StepOptions()
    tx = optim.build(optim.OptimizerConfig(name=name), sched(lr))
    state = steps.init_state(params, tx, jax.random.key(0))
    ev = steps.build_eval_loss(g, opts)
    before = float(ev(state["params"], db, rest, bcs=bcs))
    fn = steps.build_train_step(g, tx, sched(lr), opts)
    losses = []
    for _ in range(6):
        state, m = fn(state, db, rest, bcs)
        losses.append(float(m["loss"]))
    after = float(ev(state["params"], db, rest, bcs=bcs))
    assert np.isfinite(losses).all()
    chex.assert_tree_all_finite(state["params"])
    chex.assert_trees_all_equal_shapes_and_dtypes(state["params"], params)  # the step keeps the layout
    assert int(state["step"]) == 6
    assert after < 0.8 * before, (before, after, losses)


def test_device_batch_errors():
    with pytest.raises(KeyError, match="boundary_conditions"):
        steps.device_batch({"input_fields": np.zeros((1, 1, 32, 32, 1))})
    with pytest.raises(ValueError, match="differ across the batch"):
        steps.device_batch({"boundary_conditions": np.array([[[2, 2]], [[0, 1]]]), "input_fields": 0,
                            "output_fields": 0, "field_indices": 0})


# ------------------------------------------------------------------------------ the original's trainer
@pytest.mark.slow
@pytest.mark.parametrize("kernels", ["auto", "xla"])
@pytest.mark.parametrize("path", [ORACLE_2D, ORACLE_MASK], ids=["2d_padded_velocity_z", "2d_object_mask"])
def test_train_step_matches_the_original_trainer(path, kernels):
    """Loss per micro-batch, gradient norm, clip coefficient, lr (1e-5), every gradient (1e-4) and
    every parameter update w1 − w0, w3 − w0 (1e-3 of the update) through the real train step, with
    this host's kernels and with the portable path ("xla") GPUs and TPUs share."""
    ok, rows = check_train_oracle.run(path, kernels)
    bad = [r for r in rows if not r[3]]
    assert ok and not bad, bad[:10]
    kinds = {r[0].split(" ")[0].split("[")[0] for r in rows}
    assert {"micro_loss", "grad_norm_preclip", "clip_coef", "lr_used", "grad", "update"} <= kinds


@pytest.mark.slow
def test_oracle_check_fails_on_a_perturbed_weight_or_lr(tmp_path):
    f = dict(np.load(ORACLE_MASK))
    name = "w0/blocks.0.space_mixing.fused_ff_qkv.weight"
    f[name] = f[name] * np.float32(1.001)  # a wrong weight: gradients and updates move
    f["lr_used"] = f["lr_used"] * 1.01  # as if the original had used another lr
    path = tmp_path / "perturbed.npz"
    np.savez(path, **f)
    ok, rows = check_train_oracle.run(str(path))
    failed = {r[0].split(" ")[0].split("[")[0] for r in rows if not r[3]}
    assert not ok and {"grad", "update", "lr_used"} <= failed, failed


@pytest.mark.slow
def test_oracle_check_fails_when_the_files_no_gradient_parameter_moved(tmp_path):
    f = dict(np.load(ORACLE_MASK))
    name = json.loads(str(f["params_without_grad_json"]))[0]
    f[f"w1/{name}"] = f[f"w1/{name}"] + np.float32(1e-3)  # the original moved a parameter it had no gradient for
    path = tmp_path / "moved.npz"
    np.savez(path, **f)
    ok, rows = check_train_oracle.run(str(path))
    bad = [r for r in rows if not r[3]]
    assert not ok and [r[0] for r in bad] == [f"update w1-w0 {name} (no gradient: the file's must not move)"]
    assert bad[0][1] == pytest.approx(1e-3, rel=1e-3)


# ------------------------------------------------------------------------------ one normalization
@pytest.mark.parametrize("global_stats", [False, True])
def test_training_loss_and_rollout_normalize_identically(global_stats):
    """The loss and the rollout give the model the same inputs and undo the same delta scale: a
    model whose last prediction the rollout turns into frame F scores 0 when F is the target."""
    from walrus_jax.inference import rollouts

    rng = np.random.default_rng(11)
    inp = jnp.asarray(rng.normal(size=(2, 3, 8, 8, 2)) * [3.0, 0.2] + [1.0, -5.0], jnp.float32)
    const = jnp.asarray(rng.normal(size=(2, 8, 8, 1)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(2, 3, 8, 8, 3)), jnp.float32)
    stats = (np.array([2.0, 0.5, 1.5], np.float32), np.array([0.3, 0.1, 0.7], np.float32)) if global_stats else None
    seen = []

    class Probe(nnx.Module):
        def __init__(self):
            self.cfg = ModelConfig.tiny(jitter_patches=False)

        def __call__(self, x, field_indices, bcs, jitter=None, *, train=False, key=None):
            seen.append(np.asarray(x))
            return y

    model, fi, bcs = Probe(), jnp.array([3, 4, 5]), ((2, 2), (2, 2))
    nxt = rollouts.predict_next(model, inp, fi, bcs, const, stats=stats)
    batch = {"input_fields": inp, "output_fields": nxt[:, None], "constant_fields": const, "field_indices": fi}
    if global_stats:
        batch.update(norm_rms=jnp.asarray(stats[0]), norm_rms_delta=jnp.asarray(stats[1]))
    loss, _ = steps.compute_loss(model, batch, None, bcs=bcs, opts=steps.StepOptions(jitter=False, minimum_context=2),
                                 train=False)
    np.testing.assert_array_equal(seen[0], seen[1])  # the same model input, bit for bit
    assert float(loss) < 1e-4  # x100 loss multiplier: the last frame's error is float32 rounding
