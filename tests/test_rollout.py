"""walrus_jax.inference.rollouts with a small fake nnx model (the real model is covered by test_rollout_oracle.py).

The fake model has the Walrus call signature and layout, reads the field indices through a learned
table and reacts to the jitter, so every argument that the rollout threads through is observable.
"""
import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from walrus_jax.inference import rollouts
from walrus_jax import normalization, xla_options
from walrus_jax.models.config import OPEN, PERIODIC, WALL, ModelConfig
from walrus_jax.models.jitter import Jitter

H = W = 32
B, T_IN, C_VAR, C_CON = 2, 3, 3, 1
N_STATES = 12
BCS = np.array([[WALL, OPEN], [PERIODIC, PERIODIC]])


class FakeWalrus(nnx.Module):
    """y[t] = tanh(a[f] * x[t] + b[f] * mean_{s<=t} x[s]) (causal in time), rolled by the jitter."""

    def __init__(self, rngs: nnx.Rngs):
        self.cfg = ModelConfig.tiny(n_states=N_STATES)
        self.a = nnx.Param(0.5 + 0.1 * jax.random.normal(rngs.params(), (N_STATES,)))
        self.b = nnx.Param(0.3 * jax.random.normal(rngs.params(), (N_STATES,)))

    def __call__(self, x, field_indices, bcs, jitter=None):
        assert isinstance(bcs, tuple)  # concrete, never traced
        fi = jnp.asarray(field_indices)
        a, b = self.a[...][fi], self.b[...][fi]
        t = jnp.arange(1, x.shape[1] + 1, dtype=x.dtype).reshape((1, -1) + (1,) * (x.ndim - 2))
        y = jnp.tanh(a * x + b * jnp.cumsum(x, axis=1) / t)
        if jitter is not None:
            y = jnp.roll(y, jitter.patch_shift[0], axis=2) + 0.01 * jnp.sum(jitter.token_shift)
        return y


def numpy_reference(a_tab, b_tab, window, consts, fi, pmask, mask, n_steps, eps=1e-5):
    """The rollout (formatter, RMS normalization, model, de-normalization, masks) written out in float64
    numpy for the fake model (no jitter)."""
    win = window.astype(np.float64)
    out = []
    for _ in range(n_steps):
        x = np.concatenate([win, np.repeat(consts[:, None].astype(np.float64), win.shape[1], axis=1)], -1)
        s = np.maximum(np.sqrt((x ** 2).mean(axis=(1, 2, 3), keepdims=True)), eps)
        d = np.diff(x, axis=1)
        dr = np.maximum(np.sqrt((d ** 2).mean(axis=(1, 2, 3), keepdims=True)), eps)
        xn = x / s
        t = np.arange(1, x.shape[1] + 1).reshape(1, -1, 1, 1, 1)
        y = np.tanh(a_tab[fi] * xn + b_tab[fi] * np.cumsum(xn, axis=1) / t)
        nxt = (x[:, -1] + y[:, -1] * dr[:, 0])[..., : win.shape[-1]]
        nxt[mask] = 0.0
        nxt[..., ~pmask] = 0.0
        out.append(nxt)
        win = np.concatenate([win[:, 1:], nxt[:, None]], axis=1)
    return np.stack(out, axis=1)


def assert_f32_close(a, b, n_steps: int, ops: int = 16):
    """Two float32 programs for the same rollout (compiled separately: XLA may fuse and reorder
    operations and sums differently) differ by rounding only. Per step each value sees at most
    `ops` roundings (normalization, the model's few elementwise operations, the de-normalization)
    plus the RMS sums over T_in*H*W terms, whose rounding grows like log2(terms) when summed
    pairwise; FakeWalrus is tanh-bounded, so steps add their errors. Bound, per channel scale:
    n_steps * (ops + log2(terms)) * eps32 * max|b|."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    eps = float(np.finfo(np.float32).eps)
    bound = n_steps * (ops + np.log2(T_IN * H * W)) * eps
    scale = np.abs(b).max(axis=tuple(range(b.ndim - 1)))  # per channel
    err = np.abs(a - b).max(axis=tuple(range(b.ndim - 1)))
    assert (err <= bound * np.maximum(scale, np.finfo(np.float32).tiny)).all(), (err, bound * scale)


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    model = FakeWalrus(nnx.Rngs(0))
    data = dict(
        input_fields=(rng.normal(size=(B, T_IN, H, W, C_VAR)) * [1.0, 10.0, 0.0]).astype(np.float32),
        constant_fields=rng.uniform(1, 2, size=(B, H, W, C_CON)).astype(np.float32),
    )
    mask = np.zeros((B, H, W), bool)
    mask[:, :4, :4] = True
    kw = dict(field_indices=np.array([4, 7, 5, 9]), bcs=BCS, padded_field_mask=np.array([True, True, False]),
              mask=mask)
    return model, data, kw


def test_matches_numpy_reference(setup):
    model, data, kw = setup
    preds = np.asarray(rollouts.rollout(model, data["input_fields"], constant_fields=data["constant_fields"], n_steps=4, **kw))
    assert preds.shape == (B, 4, H, W, C_VAR) and preds.dtype == np.float32
    ref = numpy_reference(np.asarray(model.a[...], np.float64), np.asarray(model.b[...], np.float64),
                          data["input_fields"], data["constant_fields"], kw["field_indices"], kw["padded_field_mask"],
                          kw["mask"], 4)
    np.testing.assert_allclose(preds, ref, rtol=2e-5, atol=2e-5)
    assert (preds[..., 2] == 0).all() and (preds[:, :, :4, :4] == 0).all()
    assert np.abs(preds[..., :2]).max() > 0.1


def test_equals_python_loop_of_single_steps(setup):
    model, data, kw = setup
    n = 5
    key = jax.random.key(3)
    scan = np.asarray(rollouts.rollout(model, data["input_fields"], constant_fields=data["constant_fields"], n_steps=n,
                                jitter=key, **kw))
    step = xla_options.jit(lambda w, j: rollouts.predict_next(model, w, kw["field_indices"], rollouts.normalize_bcs(BCS, 2),
                                               jnp.asarray(data["constant_fields"]), jnp.asarray(kw["mask"]),
                                               jnp.asarray(kw["padded_field_mask"]), j))  # as the scan: top level
    win = jnp.asarray(data["input_fields"])
    loop = []
    for t in range(n):
        j = rollouts.sample_jitter(jax.random.fold_in(key, t), model.cfg, (H, W), BCS)
        nxt = step(win, j)
        loop.append(np.asarray(nxt))
        win = jnp.concatenate([win[:, 1:], nxt[:, None]], axis=1)
    assert_f32_close(scan, np.stack(loop, 1), n_steps=n)


def test_key_determinism(setup):
    model, data, kw = setup
    run = lambda k: np.asarray(rollouts.rollout(model, data["input_fields"], constant_fields=data["constant_fields"],  # noqa
                                         n_steps=3, jitter=k, **kw))
    a, a2, b = run(jax.random.key(0)), run(jax.random.key(0)), run(jax.random.key(1))
    np.testing.assert_array_equal(a, a2)
    assert np.abs(a - b).max() > 1e-3
    # Old-style uint32 keys are accepted too.
    np.testing.assert_array_equal(run(jax.random.PRNGKey(0)), run(jax.random.PRNGKey(0)))


def test_one_compilation_per_shape_and_n_steps(setup):
    model, data, kw = setup
    x = data["input_fields"]
    kwargs = dict(constant_fields=data["constant_fields"], n_steps=2, **kw)
    rollouts.rollout(model, x, **kwargs)
    before = rollouts.TRACE_COUNT["scan"]
    rollouts.rollout(model, x * 2.0, **kwargs)
    rollouts.rollout(model, x + 1.0, **{**kwargs, "constant_fields": data["constant_fields"] * 3})
    # New weights (same graph) do not retrace either.
    m2 = FakeWalrus(nnx.Rngs(5))
    rollouts.rollout(m2, x, **kwargs)
    assert rollouts.TRACE_COUNT["scan"] == before
    rollouts.rollout(model, x, **{**kwargs, "n_steps": 3})
    assert rollouts.TRACE_COUNT["scan"] == before + 1
    rollouts.rollout(model, x[:1], **{**kwargs, "constant_fields": data["constant_fields"][:1], "mask": kw["mask"][:1]})
    assert rollouts.TRACE_COUNT["scan"] == before + 2


def test_chunked_equals_unchunked(setup, tmp_path):
    model, data, kw = setup
    n = 7
    common = dict(constant_fields=data["constant_fields"], n_steps=n, **kw)
    for jitter in (None, jax.random.key(11)):
        full = np.asarray(rollouts.rollout(model, data["input_fields"], jitter=jitter, **common))
        chunked = rollouts.rollout(model, data["input_fields"], jitter=jitter, chunk_size=3, **common)
        assert isinstance(chunked, np.ndarray)
        np.testing.assert_array_equal(chunked, full)
    # Stacked jitter, streamed into an HDF5 dataset.
    j = Jitter(jnp.asarray(np.tile([[2, 0, 0]], (n, 1)) * np.arange(n)[:, None], jnp.int32),
               jnp.zeros((n, model.cfg.n_blocks, 3), jnp.int32))
    full = np.asarray(rollouts.rollout(model, data["input_fields"], jitter=j, **common))
    with h5py.File(tmp_path / "preds.h5", "w") as f:
        dset = f.create_dataset("pred", (B, n, H, W, C_VAR), np.float32)
        rollouts.rollout(model, data["input_fields"], jitter=j, chunk_size=2, sink=dset, **common)
    with h5py.File(tmp_path / "preds.h5", "r") as f:
        np.testing.assert_array_equal(f["pred"][...], full)
    # The stacked jitter is really used per step: a constant one differs.
    const = np.asarray(rollouts.rollout(model, data["input_fields"], jitter=Jitter(j.patch_shift[1], j.token_shift[1]), **common))
    assert np.abs(const - full).max() > 1e-3


def test_ensemble_is_vmap_over_keys(setup):
    model, data, kw = setup
    keys = jax.random.split(jax.random.key(7), 3)
    common = dict(constant_fields=data["constant_fields"], n_steps=3, **kw)
    ens = np.asarray(rollouts.rollout_ensemble(model, data["input_fields"], keys, **common))
    assert ens.shape == (3, B, 3, H, W, C_VAR)
    for e in range(3):
        assert_f32_close(ens[e], np.asarray(rollouts.rollout(model, data["input_fields"], jitter=keys[e], **common)),
                         n_steps=common["n_steps"])
    assert np.abs(ens[0] - ens[1]).max() > 1e-3
    chunked = rollouts.rollout_ensemble(model, data["input_fields"], keys, chunk_size=2, **common)
    assert_f32_close(chunked, ens, n_steps=common["n_steps"])


def test_ensemble_of_perturbed_initial_conditions(setup):
    """Without jitter, member e is the rollout of input + 0.1 * rms * N(0, 1), its noise from keys[e]."""
    model, data, kw = setup
    keys = jax.random.split(jax.random.key(8), 3)
    common = dict(constant_fields=data["constant_fields"], n_steps=3, **kw)
    x = np.asarray(data["input_fields"], np.float64)
    ens = np.asarray(rollouts.rollout_ensemble(model, data["input_fields"], keys, jitter=False, perturbation=0.1,
                                               **common))
    rms = np.sqrt((x ** 2).mean(axis=(1, 2, 3), keepdims=True))
    for e in range(3):
        noise = np.asarray(jax.random.normal(jax.random.fold_in(keys[e], rollouts.PERTURBATION_STREAM), x.shape))
        start = (x + 0.1 * rms * noise).astype(np.float32)
        assert_f32_close(ens[e], np.asarray(rollouts.rollout(model, start, **common)), n_steps=common["n_steps"])
    assert np.abs(ens[0] - ens[1]).max() > 1e-3
    with pytest.raises(ValueError, match="members would all be the same"):
        rollouts.rollout_ensemble(model, data["input_fields"], keys, jitter=False, **common)
    with pytest.raises(ValueError, match="perturbation must be >= 0"):
        rollouts.rollout_ensemble(model, data["input_fields"], keys, perturbation=-1.0, **common)


def test_plain_callable_model(setup):
    model, data, kw = setup
    fn = lambda x, fi, bcs, jitter=None: model(x, fi, bcs, jitter=jitter)  # noqa: E731
    a = np.asarray(rollouts.rollout(fn, data["input_fields"], constant_fields=data["constant_fields"], n_steps=2, **kw))
    b = np.asarray(rollouts.rollout(model, data["input_fields"], constant_fields=data["constant_fields"], n_steps=2, **kw))
    np.testing.assert_array_equal(a, b)


def test_bad_inputs(setup):
    model, data, kw = setup
    x, c = data["input_fields"], data["constant_fields"]
    with pytest.raises(ValueError, match="T_in=3 frames .* needs at least 6"):
        rollouts.rollout(model, x, constant_fields=c, n_steps=2, min_input_steps=6, **kw)
    with pytest.raises(ValueError, match="field_indices has 3 entries but the data has 3 variable \\+ 1 constant"):
        rollouts.rollout(model, x, constant_fields=c, n_steps=2, **{**kw, "field_indices": np.array([4, 7, 5])})
    with pytest.raises(ValueError, match="padded_field_mask must have shape"):
        rollouts.rollout(model, x, constant_fields=c, n_steps=2, **{**kw, "padded_field_mask": np.array([True, False])})
    with pytest.raises(ValueError, match="constant_fields shape"):
        rollouts.rollout(model, x, constant_fields=c[:, :16], n_steps=2, **kw)
    bad = x.copy()
    bad[1, 2, 5, 6, 0] = np.nan
    with pytest.raises(ValueError, match=r"input_fields contains 1 non-finite .* index \(1, 2, 5, 6, 0\)"):
        rollouts.rollout(model, bad, constant_fields=c, n_steps=2, **kw)
    with pytest.raises(ValueError, match="out of the model's vocabulary \\[0, 12\\)"):
        rollouts.rollout(model, x, constant_fields=c, n_steps=2, **{**kw, "field_indices": np.array([4, 7, 5, 40])})
    with pytest.raises(ValueError, match="bcs has 3 rows"):
        rollouts.rollout(model, x, constant_fields=c, n_steps=2, **{**kw, "bcs": np.zeros((3, 2), int)})
    with pytest.raises(ValueError, match="not supported by the stride table"):
        rollouts.rollout(model, x[:, :, :20], constant_fields=c[:, :20], n_steps=2, **{**kw, "mask": None})
    with pytest.raises(ValueError, match="stacked Jitter"):
        rollouts.rollout(model, x, constant_fields=c, n_steps=2, jitter=Jitter.zeros(2).replace(
            patch_shift=jnp.zeros((5, 3), jnp.int32), token_shift=jnp.zeros((5, 2, 3), jnp.int32)), **kw)


def test_mask_from_constants_and_step_count():
    c = np.zeros((1, 4, 4, 2), np.float32)
    c[0, 1, 2, 1] = 1.0
    assert normalization.mask_from_constants(c, ["k", "other"]) is None
    m = normalization.mask_from_constants(c, ["k", "mask"])
    assert m.shape == (1, 4, 4) and m.sum() == 1 and m[0, 1, 2]
    assert rollouts.n_rollout_steps(100, 6) == 100
    assert rollouts.n_rollout_steps(500, 6) == 205  # max_rollout_steps + T_in - 1, as the original


def test_rollout_with_global_normalization_statistics():
    """normalization_stats: x / (rms + 1e-8), next = x[last] + y[last] · (rms_delta + 1e-8), every step."""
    rng = np.random.default_rng(11)
    x0 = rng.normal(size=(2, 3, 32, 32, 2)).astype(np.float32)
    rms, rms_delta = np.array([2.0, 0.5], np.float32), np.array([0.1, 0.3], np.float32)

    def model(x, field_indices, bcs, jitter=None):
        return 0.5 * x

    preds = rollouts.rollout(model, x0, field_indices=np.array([4, 5]), bcs=((2, 2), (2, 2)), n_steps=3,
                       normalization_stats={"rms": rms, "rms_delta": rms_delta})
    win = x0.astype(np.float64)
    for t in range(3):
        nxt = win[:, -1] + 0.5 * (win[:, -1] / (rms + 1e-8)) * (rms_delta + 1e-8)
        np.testing.assert_allclose(np.asarray(preds[:, t]), nxt, rtol=1e-5, atol=1e-6)
        win = np.concatenate([win[:, 1:], nxt[:, None]], axis=1)
    with pytest.raises(ValueError, match="one value per channel"):
        rollouts.rollout(model, x0, field_indices=np.array([4, 5]), bcs=((2, 2), (2, 2)), n_steps=1,
                   normalization_stats=(rms[:1], rms_delta))
