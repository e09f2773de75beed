"""Model invariants: scan == unrolled, causality, jit with a key compiles once, remat, dtypes,
fine-tuning variants, padding round trip with and without jit, and clear errors for bad input."""
from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import walrus_jax as wj
from walrus_jax.models import patching, processor
from walrus_jax.models.config import OPEN, PERIODIC, WALL
from conftest import rel_err

BCS = ((PERIODIC, PERIODIC), (WALL, OPEN))
FI = np.array([4, 5, 3])


@functools.lru_cache(maxsize=None)
def tiny(**kw) -> wj.Walrus:
    cfg = wj.ModelConfig.tiny(n_states=10, n_blocks=3, **kw)
    return wj.Walrus(cfg, rngs=nnx.Rngs(1))


def inputs(T=4, seed=0, spatial=(32, 32)):
    return jax.random.normal(jax.random.key(seed), (2, T) + spatial + (3,))


def fwd(model, x, bcs=BCS, jitter=None, fi=FI):
    return nnx.jit(lambda m, x, j: m(x, fi, bcs, j))(model, x, jitter)


def test_scan_equals_unrolled_loop(monkeypatch):
    monkeypatch.setattr(processor, "CPU_UNROLL_MAX_BLOCKS", 0)  # scanned on CPU too
    model = tiny()
    x = inputs()
    j = wj.sample_jitter(jax.random.key(3), model.cfg, (32, 32), BCS)
    y_scan = fwd(model, x, jitter=j)
    unrolled = wj.Walrus(model.cfg.replace(scan_layers=False), rngs=nnx.Rngs(0))
    nnx.update(unrolled, nnx.state(model))
    y_loop = fwd(unrolled, x, jitter=j)
    assert rel_err(y_loop, y_scan) <= 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["full", "offload", "dots_and_attention"])
def test_remat_policy_does_not_change_values_or_gradients(policy):
    model = tiny()
    x = inputs()
    remat = wj.Walrus(model.cfg.replace(remat=policy), rngs=nnx.Rngs(0))
    nnx.update(remat, nnx.state(model))

    def loss(m):
        return jnp.mean(jnp.abs(m(x, FI, BCS)))

    g1 = jax.tree.leaves(nnx.grad(loss)(model))
    g2 = jax.tree.leaves(nnx.grad(loss)(remat))
    # Compared as one vector: some leaves (norm scales followed by another norm) have gradients
    # that are analytically zero and numerically ~1e-11 noise.
    flat1 = np.concatenate([np.ravel(a) for a in g1])
    flat2 = np.concatenate([np.ravel(b) for b in g2])
    assert rel_err(flat2, flat1) <= 1e-5


def test_causality_last_frame_does_not_leak_backwards():
    model = tiny()
    x = inputs()
    x2 = x.at[:, -1].set(jax.random.normal(jax.random.key(9), x[:, -1].shape))
    y1, y2 = fwd(model, x), fwd(model, x2)
    np.testing.assert_array_equal(np.asarray(y1[:, :-1]), np.asarray(y2[:, :-1]))
    assert np.abs(np.asarray(y1[:, -1] - y2[:, -1])).max() > 1e-3


def test_jit_with_key_compiles_once_and_draws_differ():
    model = tiny()
    x = inputs()
    traces = []

    @nnx.jit
    def run(m, x, key):
        traces.append(1)
        return m(x, FI, BCS, wj.sample_jitter(key, m.cfg, (32, 32), BCS))

    outs = [np.asarray(run(model, x, jax.random.key(i))) for i in range(3)]
    assert len(traces) == 1
    assert np.abs(outs[0] - outs[1]).max() > 1e-4
    np.testing.assert_allclose(np.asarray(run(model, x, jax.random.key(0))), outs[0], rtol=0, atol=0)


def test_periodic_token_roll_changes_output_but_zero_jitter_on_wall_axes_does_not():
    """A zero Jitter still pads by S//2 (shapes differ from jitter=None) but rolls nothing."""
    model = tiny()
    x = inputs(spatial=(32, 32))
    zero = wj.Jitter.zeros(model.cfg.n_blocks)
    y0 = fwd(model, x, jitter=zero)
    shifted = wj.Jitter(zero.patch_shift, zero.token_shift.at[:, 0].set(5))
    y1 = fwd(model, x, jitter=shifted)
    assert y0.shape == y1.shape == x.shape
    assert np.abs(np.asarray(y0 - y1)).max() > 1e-4


@pytest.mark.slow
def test_singleton_axis_in_any_position():
    """(H, 1, W) data (rotated 2-D) runs through the 2-D encoder; same as (H, W, 1) up to the
    token positions, so just check shapes and finiteness, and that (H,W) == (H,W,1)."""
    model = tiny()
    x = inputs(T=2)
    y2 = fwd(model, x)
    y3 = fwd(model, x[:, :, :, :, None, :], bcs=BCS + ((PERIODIC, PERIODIC),))
    assert rel_err(y3[:, :, :, :, 0], y2) <= 1e-6
    xm = jnp.moveaxis(x[:, :, :, :, None, :], 4, 3)  # (B, T, 32, 1, 32, C)
    ym = fwd(model, xm, bcs=(BCS[0], (PERIODIC, PERIODIC), BCS[1]))
    assert ym.shape == xm.shape and np.isfinite(np.asarray(ym)).all()


def test_last_frame_only_is_the_last_frame_of_the_full_output():
    model = tiny()
    x = inputs()
    j = wj.sample_jitter(jax.random.key(3), model.cfg, (32, 32), BCS)
    y = fwd(model, x, jitter=j)
    y_last = nnx.jit(lambda m, x, j: m(x, FI, BCS, j, last_frame_only=True))(model, x, j)
    assert y_last.shape == (2, 1, 32, 32, 3)
    assert rel_err(y_last, y[:, -1:]) <= 1e-6


def test_dots_and_attention_keeps_the_fused_attention_output():
    """Under "dots_and_attention" the backward pass reuses the fused kernel's saved output and
    log-sum-exp: the forward kernel runs once per block, where "full" runs it again."""
    from walrus_jax.cpu_kernels import attention as fused

    if jax.default_backend() != "cpu" or not fused.available():
        pytest.skip("the fused attention kernel is a CPU kernel and needs a C++ compiler")
    x = inputs()

    def forward_kernel_calls(policy):
        model = wj.Walrus(tiny().cfg.replace(remat=policy, scan_layers=False), rngs=nnx.Rngs(0))
        loss = lambda m: jnp.mean(jnp.abs(m(x, FI, BCS)))
        text = jax.jit(nnx.grad(loss)).lower(model).as_text()
        return text.count(f"custom_call @{fused._FORWARD}(")

    n_blocks = tiny().cfg.n_blocks
    assert forward_kernel_calls("full") == 2 * n_blocks
    assert forward_kernel_calls("dots_and_attention") == n_blocks


@pytest.mark.slow
@pytest.mark.parametrize("causal,scan_layers,remat", [(True, True, "none"), (False, False, "full")])
def test_processor_last_frame_only_matches_full_processor(causal, scan_layers, remat):
    """The processor's last block computing one frame gives the full processor's last frame: with a
    token shift, drop path drawn from a key (as in training), scanned or unrolled blocks, remat;
    values and parameter gradients."""
    model = wj.Walrus(wj.ModelConfig.tiny(n_states=10, n_blocks=3, causal_in_time=causal, drop_path=0.3,
                                          scan_layers=scan_layers, remat=remat), rngs=nnx.Rngs(2))
    tokens = jax.random.normal(jax.random.key(4), (2, 4, 4, 4, 1, model.cfg.hidden_dim))
    shift = jax.random.randint(jax.random.key(5), (3, 3), 0, 4) * jnp.array([1, 1, 0])
    key = jax.random.key(6)

    def last(proc, only):
        y = proc(tokens, shift, key, last_frame_only=only)
        return y if only else y[:, -1:]

    full, one = (nnx.jit(lambda p, only=only: last(p, only))(model.processor) for only in (False, True))
    assert one.shape == (2, 1, 4, 4, 1, model.cfg.hidden_dim)
    assert rel_err(one, full) <= 1e-6
    grads = [np.concatenate([np.ravel(g) for g in jax.tree.leaves(
        nnx.grad(lambda p, only=only: jnp.sum(jnp.sin(last(p, only))))(model.processor))]) for only in (False, True)]
    # One vector: the time keys' norm bias has an analytically zero gradient (softmax ignores a shift
    # shared by all of a query's logits), numerically ~1e-6 noise in either form.
    assert rel_err(grads[1], grads[0]) <= 1e-5


def test_non_causal_returns_last_step_only():
    model = tiny(causal_in_time=False)
    y = fwd(model, inputs(T=3))
    assert y.shape == (2, 1, 32, 32, 3)


def test_bf16_compute_close_to_float32():
    model = tiny()
    x = inputs()
    bf = wj.Walrus(model.cfg.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))
    nnx.update(bf, nnx.state(model))
    y32, y16 = fwd(model, x), fwd(bf, x)
    assert y16.dtype == jnp.float32
    assert rel_err(y16, y32) < 0.1


def test_train_mode_drop_path_is_random_and_eval_is_not():
    model = tiny(drop_path=0.5, input_field_drop=0.5)
    x = inputs()
    f = nnx.jit(lambda m, x, k: m(x, FI, BCS, train=True, key=k))
    a, b = f(model, x, jax.random.key(0)), f(model, x, jax.random.key(1))
    assert np.abs(np.asarray(a - b)).max() > 1e-4
    np.testing.assert_array_equal(np.asarray(f(model, x, jax.random.key(0))), np.asarray(a))
    with pytest.raises(ValueError, match="needs a PRNG `key`"):
        model(x, FI, BCS, train=True)


@pytest.mark.slow
def test_ape_and_learned_rope_variants_build_and_run():
    model = tiny(learned_rope="per_axis", ape_grid=(32, 32, 1))
    y = fwd(model, inputs(T=2))
    assert np.isfinite(np.asarray(y)).all()
    assert model.processor.blocks.space.rope_freqs[...].shape == (3, 3, 1)
    assert isinstance(model.processor.blocks.space.rope_freqs, nnx.Param)
    assert not isinstance(tiny().processor.blocks.space.rope_freqs, nnx.Param)  # a buffer, not trained
    with pytest.raises(ValueError, match="absolute position embedding"):
        # jitter padding on the WALL/OPEN axis gives 33 tokens there instead of 32
        model(inputs(T=2, spatial=(32, 128)), FI, BCS, wj.Jitter.zeros(model.cfg.n_blocks))


def test_resize_66_to_64_matches_torch_interpolate():
    torch = pytest.importorskip("torch")
    from walrus_jax.models.walrus import resize_last_axis
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 5, 66)).astype(np.float32)
    for n_in, n_out in [(66, 64), (64, 66)]:
        xi = x[..., :n_in]
        ref = torch.nn.functional.interpolate(torch.tensor(xi), size=(4, 5, n_out), mode="trilinear",
                                              align_corners=False).numpy()
        ours = np.asarray(resize_last_axis(jnp.asarray(xi), n_out, axis=4))
        assert rel_err(ours, ref) <= 1e-6


# ----------------------------------------------------------------------------------- bad input
def test_grid_size_outside_stride_table_lists_supported_sizes():
    with pytest.raises(ValueError, match=r"spatial size 64 on axis 0.*\[32, 128, 256, 384, 512, 768, 1024\]"):
        tiny()(jnp.zeros((1, 2, 64, 32, 3)), FI, BCS)


def test_field_indices_out_of_range():
    with pytest.raises(ValueError, match=r"outside the model's vocabulary \[0, 10\)"):
        tiny()(inputs(T=2), np.array([4, 5, 12]), BCS)


def test_field_indices_count_mismatch():
    with pytest.raises(ValueError, match=r"field_indices has shape \(2,\) but x has 3 channels"):
        tiny()(inputs(T=2), np.array([4, 5]), BCS)


def test_bcs_rank_mismatch():
    with pytest.raises(ValueError, match=r"bcs has 3 rows but the input has 2 spatial axes"):
        tiny()(inputs(T=2), FI, BCS + ((WALL, WALL),))


def test_bad_bc_code_and_traced_bcs():
    with pytest.raises(ValueError, match="WALL=0, OPEN=1 or PERIODIC=2"):
        tiny()(inputs(T=2), FI, ((2, 2), (0, 7)))
    with pytest.raises(TypeError, match="bcs must be concrete"):
        jax.jit(lambda b: tiny()(inputs(T=2), FI, b))(jnp.asarray(BCS))


def test_bcs_that_differ_across_the_batch():
    with pytest.raises(ValueError, match="differ across the batch"):
        tiny()(inputs(T=2), FI, np.array([BCS, ((WALL, WALL), (WALL, WALL))]))


def test_config_validation():
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        wj.ModelConfig(hidden_dim=30, num_heads=4)
    with pytest.raises(ValueError, match="unknown ModelConfig keys"):
        wj.ModelConfig.from_dict({"hiden_dim": 3})


def test_from_torch_config_reads_released_yaml():
    import yaml
    from conftest import FIXTURES
    y = yaml.safe_load(open(FIXTURES / "walrus_extended_config.yaml"))
    cfg = wj.ModelConfig.from_torch_config(y["model"], n_states=len(y["data"]["field_index_map_override"]))
    assert cfg == wj.ModelConfig.walrus_1p3b()
    assert cfg.groups == 16  # the model-level groups overrides encoder/decoder groups (12)
    assert (cfg.hidden_dim, cfg.n_blocks, cfg.num_heads, cfg.head_dim, cfg.n_rope_freqs) == (1408, 40, 16, 88, 11)


def test_released_parameter_count_from_abstract_model():
    abstract = nnx.eval_shape(lambda: wj.Walrus(wj.ModelConfig.walrus_1p3b(), rngs=nnx.Rngs(0)))
    params = nnx.state(abstract, nnx.Param)
    n_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
    n_all = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(abstract)))
    assert n_all == 1_286_199_487  # the released state_dict, RoPE buffers included
    assert n_params == 1_286_199_487 - 40 * 11


@pytest.mark.slow
def test_drop_path_draws_like_the_original():
    """Time branch: one draw per frame shared by the batch; space branch: one per (sample, frame)."""
    from walrus_jax.models.attention import SpaceAttention, TimeAttention

    cfg = wj.ModelConfig.tiny()
    x = jnp.broadcast_to(jax.random.normal(jax.random.key(1), (1, 6, 4, 4, 1, cfg.hidden_dim)),
                         (8, 6, 4, 4, 1, cfg.hidden_dim))  # 8 identical samples
    t = TimeAttention(cfg, rngs=nnx.Rngs(0))
    y = t(x, 0.5, jax.random.key(2))
    kept = np.asarray(jnp.any(y != x, axis=(2, 3, 4, 5)))  # (B, T): branch kept
    assert (kept == kept[:1]).all() and 0 < kept[0].sum() < 6  # same frames for every sample, not all
    s = SpaceAttention(cfg, rngs=nnx.Rngs(0))
    kept = np.asarray(jnp.any(s(x, 0.5, jax.random.key(3)) != x, axis=(2, 3, 4, 5)))
    assert not (kept == kept[:1]).all()  # independent per sample


def test_batched_jitter_is_refused_with_its_expected_shape():
    model = tiny()
    batched = jax.tree.map(lambda a: jnp.stack([a, a]), wj.Jitter.zeros(model.cfg.n_blocks))
    with pytest.raises(AssertionError, match=r"jitter.patch_shift must be \(3,\)"):
        model(inputs(), FI, BCS, batched)


class PatchingRoundTrip(chex.TestCase):
    """Padding + flags + roll, then its inverse, give back the fields exactly: with the roll amounts
    concrete (no jit) and traced (jit, as every training step and rollout runs them)."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_unjitter_inverts_pad_and_flag(self):
        spatial3, bcs3 = (32, 128, 1), ((PERIODIC, PERIODIC), (WALL, OPEN), (PERIODIC, PERIODIC))
        plans = patching.plan_axes(spatial3, bcs3, (8, 4), jitter=True)
        x = jax.random.normal(jax.random.key(0), (2,) + spatial3 + (3,))

        @self.variant
        def round_trip(x, shift):
            padded = patching.pad_and_flag(x, plans, bcs3, shift)
            chex.assert_shape(padded, (2,) + tuple(p.padded for p in plans) + (3 + 3,))
            return patching.unjitter(padded[..., :3], plans, shift)

        for shift in ([0, 0, 0], [7, -3, 0], [-15, 9, 0]):
            np.testing.assert_array_equal(round_trip(x, jnp.asarray(shift, jnp.int32)), x)
