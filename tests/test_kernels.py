"""The kernel-selection point (models/kernels.py) and the TPU forms: each specialised form equals the
portable path, the choice follows the platform a program is lowered for, and the TPU forms compile
for a TPU with the TPU compiler on this host (libtpu, compile-only devices)."""
from __future__ import annotations

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental.pallas import tpu as pltpu

import walrus_jax as wj
from walrus_jax.models import full_resolution, kernels, patching
from walrus_jax.models.attention import materialised_attention, space_attention_core
from walrus_jax.models.convolution import fold_singleton_axes
from walrus_jax.models.flash_attention import block_length, flash_attention
from walrus_jax.models.jitter import sample_jitter

ROOT = pathlib.Path(__file__).resolve().parents[1]


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_no_default_backend_in_model_or_training_code():
    """The form is chosen by the compile target (kernels.select), never by the host's backend."""
    for package in ("walrus_jax/models", "walrus_jax/training"):
        for path in (ROOT / package).glob("*.py"):
            assert "default_backend" not in path.read_text(), path


def test_select_follows_the_lowering_platform():
    f = lambda x: kernels.select("auto", x, xla=lambda x: x + 1.0, cpu=lambda x: x + 2.0, tpu=lambda x: x + 3.0)
    x = jnp.zeros(2)
    assert float(jax.jit(f)(x)[0]) == 2.0  # this host's programs are CPU programs
    assert float(kernels.select("xla", x, xla=lambda x: x + 1.0, cpu=lambda x: x + 2.0)[0]) == 1.0
    assert float(kernels.select("gpu", x, xla=lambda x: x + 1.0, cpu=lambda x: x + 2.0)[0]) == 1.0  # no GPU form
    with pytest.raises(ValueError, match="kernels='fast'"):
        kernels.select("fast", x, xla=lambda x: x)
    with pytest.raises(ValueError, match="kernels='fast'"):
        wj.ModelConfig.tiny(kernels="fast")


def test_cpu_kernel_is_lowered_only_into_cpu_programs():
    q = jnp.ones((2, 16, 2, 8), jnp.float32)
    text = jax.jit(lambda q: space_attention_core(q, q, q, "auto")).lower(q).as_text()
    assert "WjAttentionForward" in text
    text = jax.jit(lambda q: space_attention_core(q, q, q, "xla")).lower(q).as_text()
    assert "WjAttentionForward" not in text


def _qkv(shape, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q, k, v, do = (jax.random.normal(kk, shape, jnp.float32).astype(dtype) for kk in keys)
    return q, k, v, do


@pytest.mark.slow
@pytest.mark.parametrize("length", [32 * 32, 33 * 33, 16 ** 3, 17 ** 3])
def test_flash_attention_matches_the_portable_path(length):
    """Pallas TPU flash attention (interpret mode on this CPU) against the materialised einsums, float32:
    values and q, k, v gradients; token counts that are not multiples of the tile, head dim 88."""
    q, k, v, do = _qkv((1, length, 1, 88), jnp.float32)

    def grads(f):
        out, vjp = jax.vjp(f, q, k, v)
        return (out,) + vjp(do)

    with pltpu.force_tpu_interpret_mode():
        got = jax.jit(lambda: grads(flash_attention))()
    want = jax.jit(lambda: grads(materialised_attention))()
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert rel_err(a, b) <= 1e-5, (name, rel_err(a, b))


def test_flash_attention_bfloat16_error():
    q, k, v, _ = _qkv((2, 33 * 33, 2, 88), jnp.bfloat16)
    with pltpu.force_tpu_interpret_mode():
        got = jax.jit(flash_attention)(q, k, v)
    exact = materialised_attention(*(a.astype(jnp.float32) for a in (q, k, v)))
    err = rel_err(got.astype(jnp.float32), exact)
    portable = rel_err(materialised_attention(q, k, v).astype(jnp.float32), exact)
    print(f"bf16 flash attention: relative error {err:.2e} (portable bf16 path: {portable:.2e})")
    assert err <= 2 * portable + 1e-3


def test_block_length():
    assert block_length(4096) == 512 and block_length(4913) == 512 and block_length(1089) == 128
    assert block_length(1024) == 512 and block_length(100) == 128


@pytest.mark.slow
def test_model_tpu_forms_equal_the_portable_path():
    """The whole model with its TPU forms (Pallas flash space attention in interpret mode) against
    kernels="xla": the forward pass and the gradient of a loss."""
    cfg = wj.ModelConfig.tiny(kernels="xla", drop_path=0.0)
    model = wj.Walrus(cfg, rngs=nnx.Rngs(0))
    tpu_model = wj.with_kernels(model, "tpu")
    x = jax.random.normal(jax.random.key(1), (1, 3, 32, 32, 2))
    fi, bcs = jnp.array([3, 4]), ((wj.PERIODIC, wj.PERIODIC), (wj.WALL, wj.OPEN))

    def loss_and_grad(m):
        graphdef, state = nnx.split(m)
        f = lambda s: jnp.mean(nnx.merge(graphdef, s)(x, fi, bcs) ** 2)
        return jax.jit(jax.value_and_grad(f))(state)

    with pltpu.force_tpu_interpret_mode():
        (l_tpu, g_tpu) = loss_and_grad(tpu_model)
    (l_xla, g_xla) = loss_and_grad(model)
    assert rel_err(l_tpu, l_xla) <= 1e-5
    # Per weight, relative to its own gradient; a gradient that is zero up to rounding (|g| ~ 1e-11
    # where others are ~1e-2) is compared on the scale of the largest.
    pairs = [(np.asarray(a, np.float64), np.asarray(b, np.float64))
             for a, b in zip(jax.tree.leaves(g_tpu), jax.tree.leaves(g_xla))]
    largest = max(np.abs(b).max() for _, b in pairs)
    for a, b in pairs:
        assert np.abs(a - b).max() <= 1e-4 * max(np.abs(b).max(), 1e-3 * largest)


def test_space_to_depth_order_and_inverse():
    """Point (s1 i + a1, s2 j + a2, s3 k + a3) of channel c lands at [i, j, k, ((a3 C + c) s1 + a1) s2 + a2];
    depth_to_space undoes it."""
    N, C, (s1, s2, s3), (h, w, d) = 2, 3, (4, 2, 4), (3, 5, 2)
    x = np.random.default_rng(0).normal(size=(N, C, s1 * h, s2 * w, s3 * d)).astype(np.float32)
    ref = x.reshape(N, C, h, s1, w, s2, d, s3).transpose(0, 2, 4, 6, 7, 1, 3, 5).reshape(N, h, w, d, -1)
    got = full_resolution.space_to_depth(jnp.asarray(x), (s1, s2, s3))
    np.testing.assert_array_equal(np.asarray(got), ref)
    np.testing.assert_array_equal(np.asarray(full_resolution.depth_to_space(got, (s1, s2, s3), C)), x)


FULL_RES_CASES = [  # spatial shape, BCs, jitter
    ((32, 32), ((wj.WALL, wj.OPEN), (wj.PERIODIC, wj.PERIODIC)), True),
    ((16, 64, 16), ((wj.PERIODIC, wj.PERIODIC), (wj.WALL, wj.OPEN), (wj.OPEN, wj.OPEN)), True),
    ((64, 64, 64), ((wj.PERIODIC, wj.PERIODIC), (wj.PERIODIC, wj.PERIODIC), (wj.WALL, wj.WALL)), True),
    ((64, 64, 64), ((wj.PERIODIC, wj.PERIODIC), (wj.PERIODIC, wj.PERIODIC), (wj.WALL, wj.WALL)), False),
]


def _full_resolution_ends(shape, bcs, jitter, dtype, n_frames=2, n_fields=3, width=5, key=0):
    """The encoder's input end and the decoder's output end as functions of (kernels, weights), with
    random inputs of the tiny model's geometry; `width` channels at the token resolution."""
    cfg = wj.ModelConfig.tiny()
    k1 = cfg.kernel_sizes[0]
    spatial3 = tuple(shape) + (1,) * (3 - len(shape))
    bcs3 = patching.pad_bcs3(bcs)
    strides = patching.choose_strides(spatial3)
    plans = patching.plan_axes(spatial3, bcs3, cfg.kernel_sizes, jitter=jitter)
    shift = sample_jitter(jax.random.key(key + 7), cfg, shape, bcs).patch_shift if jitter else None
    padded = tuple(p.padded for p in plans)
    s1 = [1 if n == 1 else s[0] for n, s in zip(padded, strides)]
    periodic = [p.periodic for p in plans]
    ks = jax.random.split(jax.random.key(key), 6)
    x = jax.random.normal(ks[0], (n_frames,) + spatial3 + (n_fields,), dtype)
    w_enc = fold_singleton_axes(jax.random.normal(ks[1], (k1,) * 3 + (n_fields + 3, width), dtype), padded, jnp.sum)
    z = jax.random.normal(ks[2], (n_frames,) + tuple(patching.conv_out(n, k1, s) for n, s in zip(padded, s1)) +
                          (width,), dtype)
    w_dec = jax.random.normal(ks[3], (k1,) * 3 + (width, n_fields), dtype)
    bias = jax.random.normal(ks[4], (n_fields,), dtype)

    def encode(kern, x, w, scale):
        return full_resolution.encode_input(x, w, scale, plans, bcs3, shift, s1, dtype, kern)

    def decode(kern, z, w, b):
        return full_resolution.decode_output(z, w, b, plans, shift, s1, periodic, dtype, kern)

    return encode, decode, (x, w_enc, jnp.asarray(1.3, dtype)), (z, w_dec, bias)


@pytest.mark.slow
@pytest.mark.parametrize("shape,bcs,jitter", FULL_RES_CASES)
def test_full_resolution_tpu_forms_equal_the_portable_path(shape, bcs, jitter):
    """The TPU forms of the encoder's input end and the decoder's output end (space-to-depth,
    channels-first) against the portable path, values and gradients of every input, in float64: the
    same sums in another order, so equal to float64 rounding."""
    with jax.enable_x64(True):
        encode, decode, enc_args, dec_args = _full_resolution_ends(shape, bcs, jitter, jnp.float64)
        for fn, args in ((encode, enc_args), (decode, dec_args)):
            ref = jax.jit(fn, static_argnums=0)("xla", *args)
            got = jax.jit(fn, static_argnums=0)("tpu", *args)
            assert got.shape == ref.shape and rel_err(got, ref) <= 1e-12
            probe = jnp.cos(ref)
            grads = {k: jax.jit(jax.grad(lambda *a, k=k: jnp.sum(fn(k, *a) * probe), argnums=tuple(range(len(args)))))(
                *args) for k in ("xla", "tpu")}
            for a, b in zip(grads["tpu"], grads["xla"]):
                assert rel_err(a, b) <= 1e-12


# ----------------------------------------------------------------- compiled for TPU on this host
def _tpu_mesh(n: int):
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices[:n]
    return jax.sharding.Mesh(np.asarray(devices), ("data",))


@pytest.mark.xdist_group("libtpu")  # the TPU compiles share one test worker (pytest.ini)
@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_flash_attention_compiles_for_tpu(dtype):
    """Forward and backward of space attention as one TPU program, sharded over 4 chips: the Pallas
    kernel is in it (a Mosaic custom call) and no L x L array is."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from walrus_jax.models.activation_sharding import activation_mesh

    mesh = _tpu_mesh(4)
    L = 17 ** 3
    spec = jax.ShapeDtypeStruct((8, L, 2, 88), jnp.dtype(dtype), sharding=NamedSharding(mesh, P("data")))

    def f(q, k, v):
        with activation_mesh(mesh):
            out, vjp = jax.vjp(lambda q, k, v: space_attention_core(q, k, v, "auto"), q, k, v)
            return vjp(out)

    compiled = jax.jit(f).lower(spec, spec, spec).compile()
    text = compiled.as_text()
    assert "tpu_custom_call" in text
    assert not re.search(rf"\[[^\]]*\b{L},\s*{L}\b", text)  # no (L, L) logits anywhere
    per_chip = compiled.memory_analysis().temp_size_in_bytes
    assert per_chip < 64 * 2**20, per_chip  # a (2, L, L) float32 block alone would be 193 MB


@pytest.mark.xdist_group("libtpu")  # the TPU compiles share one test worker (pytest.ini)
@pytest.mark.slow
def test_full_resolution_ends_compile_for_tpu_in_little_memory():
    """The 3-D input and output ends with their gradients, compiled for one TPU chip: the TPU forms
    (channels-first, space-to-depth) hold under a third of what the portable channels-last forms hold
    there (3.5x less at 64^3; 8x less in the model's 128^3 step), where every array of a few channels
    is stored 128 lanes wide. The token-resolution side has 128 channels (352 in the released model).
    Compiled with XLA's least optimisation effort: 12 s instead of a minute, and 4.4x less here (3.5x
    at the default effort).
    """
    from jax.experimental import topologies
    from jax.sharding import SingleDeviceSharding

    device = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices[0]
    encode, decode, enc_args, dec_args = _full_resolution_ends((64, 64, 64), FULL_RES_CASES[2][1], True,
                                                               jnp.bfloat16, n_frames=6, n_fields=5, width=128)
    place = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=SingleDeviceSharding(device))

    def temp_bytes(kern):
        def loss(enc_args, dec_args):
            return jnp.sum(encode(kern, *enc_args).astype(jnp.float32)) + \
                jnp.sum(decode(kern, *dec_args).astype(jnp.float32) ** 2)

        lowered = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*jax.tree.map(place, (enc_args, dec_args)))
        compiled = lowered.compile(compiler_options={"exec_time_optimization_effort": -1.0})
        return compiled.memory_analysis().temp_size_in_bytes

    portable, tpu = temp_bytes("xla"), temp_bytes("tpu")
    print(f"temporaries: TPU forms {tpu / 2**20:.0f} MiB, portable forms {portable / 2**20:.0f} MiB")
    assert tpu * 3 <= portable, (tpu, portable)
