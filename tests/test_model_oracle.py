"""Parity with the original PyTorch Walrus (tests/fixtures, produced by the original code)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import walrus_jax as wj
from walrus_jax.checkpoints import convert
from walrus_jax.models import patching
from walrus_jax.models.layers import RMSGroupNorm
from walrus_jax.models import positional
from conftest import from_well, oracle, oracle_meta, rel_err, small_weights, to_well

CASES = ["case_2d_periodic", "case_2d_open_wall", pytest.param("case_3d_mixed", marks=pytest.mark.slow)]
# "auto": this host's forms (CPU kernels); "xla": the portable path GPUs and TPUs share (models/kernels.py)
KERNELS = ["auto", "xla"]
TOL = 1e-5


@functools.lru_cache(maxsize=None)
def small_model(kernels: str = "auto") -> wj.Walrus:
    meta = oracle_meta(CASES[0])
    cfg = wj.ModelConfig.from_torch_config(meta["config"], n_states=meta["config"]["n_states"], kernels=kernels)
    model = wj.Walrus(cfg, rngs=nnx.Rngs(0))
    convert.load_state_dict(model, small_weights())
    return model


def recorded_jitter(case: dict, n_blocks: int) -> wj.Jitter:
    """The oracle's recorded torch / numpy draws as an explicit Jitter."""
    ps = np.zeros(3, np.int32)
    for q, d in zip(case["jitter_roll_quantities"], case["jitter_roll_dims"]):
        ps[d - 3] = q
    ts = np.zeros((n_blocks, 3), np.int32)
    for j, d in zip(range(len(case["processor_periodic_dims"])), case["processor_periodic_dims"]):
        ts[:, d - 3] = case["processor_rolls"][:, j]
    return wj.Jitter(jnp.asarray(ps), jnp.asarray(ts))


@functools.lru_cache(maxsize=None)
def run_case(name: str, jittered: bool, kernels: str = "auto"):
    c = oracle(name)
    model = small_model(kernels)
    jitter = recorded_jitter(c, model.cfg.n_blocks) if jittered else None
    bcs = c["bcs"][0]
    # One jit per (case, jitter on/off): the jitter values are traced arguments.
    fwd = nnx.jit(lambda m, x, fi, j: m(x, fi, bcs, j, return_intermediates=True))
    y, inter = fwd(model, jnp.asarray(to_well(c["x"])), jnp.asarray(c["state_labels"]), jitter)
    return np.asarray(y), jax.tree.map(np.asarray, inter)


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("name", CASES)
def test_output_without_jitter(name, kernels):
    y, _ = run_case(name, False, kernels)
    assert rel_err(from_well(y), oracle(name)["y_nojitter"]) <= TOL


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("name", CASES)
def test_output_with_recorded_jitter(name, kernels):
    y, _ = run_case(name, True, kernels)
    assert rel_err(from_well(y), oracle(name)["y_jitter"]) <= TOL


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("name", CASES)
def test_intermediates(name, kernels):
    c = oracle(name)
    _, inter = run_case(name, False, kernels)
    B, T = c["x"].shape[1], c["x"].shape[0]
    ti = c["inter_time_indices"]
    enc_in = inter["encoder_input"].reshape((B, T) + inter["encoder_input"].shape[1:])[0, ti]
    assert rel_err(np.moveaxis(enc_in, -1, 1), c["inter_encoder_input_b0"]) <= TOL
    for ours, theirs in [("after_encoder", "inter_after_encoder_b0"), ("before_decoder", "inter_before_decoder_b0")]:
        assert rel_err(np.moveaxis(inter[ours][0, ti], -1, 1), c[theirs]) <= TOL, ours


@pytest.mark.slow
def test_block0_output():
    """inter_after_block0_b0: the encoder tokens through block 0 alone."""
    c = oracle("case_2d_periodic")
    model = small_model()
    _, inter = run_case("case_2d_periodic", False)
    graphdef, state = nnx.split(model.processor.blocks)
    block0 = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state))
    out = np.asarray(block0(jnp.asarray(inter["after_encoder"])))
    ti = c["inter_time_indices"]
    assert rel_err(np.moveaxis(out[0, ti], -1, 1), c["inter_after_block0_b0"]) <= TOL


def test_causal_mask_hypothesis_is_distinguishable():
    """The oracle output without the causal time mask differs by far more than our error, so the
    (inferred) mask is what the oracle computed (docs/original.md)."""
    y, _ = run_case("case_2d_periodic", False)
    assert rel_err(from_well(y), oracle("case_2d_periodic")["y_nojitter_nocausalmask"]) > 0.1


@pytest.mark.parametrize("name", CASES)
def test_paddings_and_strides_match_oracle(name):
    c = oracle(name)
    x = c["x"]
    spatial = x.shape[3:]
    spatial3 = tuple(spatial) + (1,) * (3 - len(spatial))
    bcs3 = patching.pad_bcs3(patching.normalize_bcs(c["bcs"][0]))
    assert [list(s) for s in patching.choose_strides(spatial3)] == c["stride_kernels"].tolist()
    for tag, jitter_on in [("nojitter", False), ("jitter", True)]:
        plans = patching.plan_axes(spatial3, bcs3, (8, 4), jitter=jitter_on)
        # torch F.pad order: [D_lo, D_hi, W_lo, W_hi, H_lo, H_hi]
        const = sum([[p.const_pad, p.const_pad] for p in reversed(plans)], [])
        per = sum([[p.periodic_pad, p.periodic_pad] for p in reversed(plans)], [])
        assert const == c[f"{tag}_constant_paddings"].tolist()
        assert per == c[f"{tag}_periodic_paddings"].tolist()


@pytest.mark.parametrize("name", CASES)
def test_sample_jitter_ranges_match_recorded_draws(name):
    """sample_jitter draws from exactly the ranges of the original's randint calls."""
    c = oracle(name)
    model = small_model()
    spatial = c["x"].shape[3:]
    bcs = c["bcs"][0]
    draws = jax.vmap(lambda k: wj.sample_jitter(k, model.cfg, spatial, bcs))(jax.random.split(jax.random.key(0), 4000))
    ps, ts = np.asarray(draws.patch_shift), np.asarray(draws.token_shift)
    rolled = [d - 3 for d, q in zip(c["jitter_roll_dims"], c["jitter_roll_quantities"])]
    calls = iter(c["jitter_randint_calls"].tolist())
    for axis in range(3):
        plans = patching.plan_axes(tuple(spatial) + (1,) * (3 - len(spatial)), patching.pad_bcs3(patching.normalize_bcs(bcs)), (8, 4), True)
        if plans[axis].rolls:
            lo, hi, _ = next(calls)
            assert ps[:, axis].min() == lo and ps[:, axis].max() == hi - 1, axis
        else:
            assert (ps[:, axis] == 0).all()
    assert next(calls, None) is None
    proc = c["processor_randint_calls"]
    periodic = list(c["processor_periodic_dims"] - 3)
    for axis in range(3):
        if axis in periodic:
            hi = proc[periodic.index(axis), 1]
            assert ts[:, :, axis].min() == 0 and ts[:, :, axis].max() == hi - 1
        else:
            assert (ts[:, :, axis] == 0).all()


def test_components_rmsgroupnorm():
    comp = oracle("components")
    norm = RMSGroupNorm(8, rngs=nnx.Rngs(0))
    norm.scale[...] = jnp.asarray(comp["rmsgn_weight"])
    for inp, out in [("rmsgn_input", "rmsgn_output"), ("rmsgn_small_input", "rmsgn_small_output")]:
        y = norm(jnp.asarray(np.moveaxis(comp[inp], 1, -1)), (1, 2, 3))
        assert rel_err(np.moveaxis(np.asarray(y), -1, 1), comp[out]) <= TOL, inp


def test_components_positional():
    comp = oracle("components")
    rp = comp["bucket_relative_position"]
    assert (positional.t5_buckets(rp, bidirectional=False) == comp["bucket_unidirectional"]).all()
    assert (positional.t5_buckets(rp, bidirectional=True) == comp["bucket_bidirectional"]).all()
    ref = comp["relbias_causal_T6"][0]
    bias = np.asarray(positional.time_bias(jnp.asarray(comp["relbias_table"]), 6, causal=True))
    finite = np.isfinite(ref)
    assert (np.triu(np.ones((6, 6), bool), 1)[None] == ~finite).all()  # -inf exactly above the diagonal
    assert rel_err(bias[finite], ref[finite]) <= TOL
    for hd in (24, 88):
        freqs = positional.rope_base_freqs(hd)
        assert rel_err(freqs, comp[f"rope_headdim{hd}_freqs"]) <= TOL
        angles = np.asarray(positional.rope_angles(freqs, (4, 3, 1)))
        assert rel_err(angles, comp[f"rope_headdim{hd}_axial_4x3x1"]) <= TOL
