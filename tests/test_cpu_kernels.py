"""The CPU formulations of attention and convolution equal the plain ones (values and gradients),
including the shapes where blocks need padding."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

from walrus_jax.models.blocked_attention import blocked_attention, query_block_size
from walrus_jax.models.convolution import DIMS, conv3d, conv_stride1


def materialised_attention(q, k, v):
    logits = jnp.einsum("nqhd,nkhd->nhqk", q, k) / np.sqrt(q.shape[-1])
    return jnp.einsum("nhqk,nkhd->nqhd", jax.nn.softmax(logits, axis=-1), v)


@pytest.mark.parametrize("shape,block_bytes", [
    ((2, 40, 3, 8), 40 * 40 * 4),         # one block per (frame, head)
    ((3, 50, 2, 16), 8 * 50 * 4),         # 7 blocks of 8 rows: 6 padded query rows
    ((1, 37, 4, 12), 10 * 37 * 4),        # 4 blocks of 10 rows, 3 padded rows
])
@pytest.mark.slow
def test_blocked_attention_equals_materialised(shape, block_bytes):
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (3.0 * jax.random.normal(kk, shape) for kk in keys)  # large logits: max-subtraction matters
    f = lambda q, k, v: blocked_attention(q, k, v, block_bytes=block_bytes)
    got, want = f(q, k, v), materialised_attention(q, k, v)
    assert rel_err(got, want) <= 1e-5

    # Both are float32 computations: compared as max |difference| / max |reference| (the oracle
    # tests' measure); against a float64 reference both are ~5e-6 here.
    loss = lambda fn: (lambda *a: jnp.sum(jnp.cos(fn(*a)) * jnp.arange(shape[-1])))
    g_got = jax.grad(loss(f), argnums=(0, 1, 2))(q, k, v)
    g_want = jax.grad(loss(materialised_attention), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_got, g_want):
        assert rel_err(a, b) <= 2e-5


def test_query_block_size():
    assert query_block_size(6, 1024, 8 * 2**20) == 256   # 341 rows fit; evened out: 4 blocks of 256
    assert query_block_size(1, 100, 10**9) == 100        # everything fits: one block
    rows = query_block_size(6, 32768, 8 * 2**20)         # a 32^3 token grid: few rows, bounded memory
    assert 8 <= rows and 6 * rows * 32768 * 4 <= 8 * 2**20 + 6 * 8 * 32768 * 4
    rows = query_block_size(4, 1000, 4 * 4 * 1000 * 30)  # 30 rows fit -> 34 blocks of 30 (20 padded)
    n_blocks = -(-1000 // rows)
    assert rows <= 30 and n_blocks * rows - 1000 < n_blocks


def test_blocked_attention_rejects_mismatched_shapes():
    q = jnp.zeros((1, 8, 2, 4))
    with pytest.raises(ValueError, match="one shape"):
        blocked_attention(q, jnp.zeros((1, 9, 2, 4)), q)


def lax_conv(x, w, strides, padding="VALID"):
    return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=DIMS,
                                        precision=jax.lax.Precision.HIGHEST)


def grads(fn, x, w):
    return jax.grad(lambda x, w: jnp.sum(jnp.sin(fn(x, w))), argnums=(0, 1))(x, w)


@pytest.mark.parametrize("spatial,kernel,strides,channels", [
    ((21, 19, 1), (8, 8, 1), (2, 2, 1), 5),    # the first encoder layer on 2-D data; odd lengths
    ((20, 1, 17), (8, 1, 8), (6, 1, 4), 3),    # stride not dividing the kernel (8 / 6)
    ((9, 10, 11), (4, 4, 4), (2, 1, 3), 7),    # 3-D, mixed strides
    ((12, 12, 1), (4, 4, 1), (2, 2, 1), 40),   # many channels
])
@pytest.mark.slow
def test_conv3d_equals_strided_convolution(spatial, kernel, strides, channels, monkeypatch):
    from walrus_jax.models import convolution

    monkeypatch.setattr(convolution, "GEMM_CONV_MIN_FLOPS", 0)  # the matrix-product forms, however small
    kx, kw = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (2,) + spatial + (channels,))
    w = jax.random.normal(kw, kernel + (channels, 6)) / np.sqrt(np.prod(kernel) * channels)
    want = lax_conv(x, w, strides)
    got = conv3d(x, w, strides, jnp.float32)
    assert got.shape == want.shape
    assert rel_err(got, want) <= 1e-5
    for a, b in zip(grads(lambda x, w: conv3d(x, w, strides, jnp.float32), x, w),
                    grads(lambda x, w: lax_conv(x, w, strides), x, w)):
        assert rel_err(a, b) <= 2e-5


@pytest.mark.slow
@pytest.mark.parametrize("n_out", [5, 3])  # patches form (I <= O), taps form (O < I, its own gradient)
@pytest.mark.parametrize("padding", [((0, 0),) * 3, ((1, 1), (1, 1), (0, 0)), ((3, 3), (0, 0), (2, 2))])
def test_conv_stride1_gradient(padding, n_out, monkeypatch):
    from walrus_jax.models import convolution

    monkeypatch.setattr(convolution, "GEMM_CONV_MIN_FLOPS", 0)  # the matrix-product forms, however small
    kx, kw = jax.random.split(jax.random.key(4))
    x = jax.random.normal(kx, (3, 7, 6, 5, 4))
    w = jax.random.normal(kw, (2, 3, 2, 4, n_out)) / 5
    assert rel_err(conv_stride1(x, w, padding), lax_conv(x, w, (1, 1, 1), padding)) <= 1e-5
    for a, b in zip(grads(lambda x, w: conv_stride1(x, w, padding), x, w),
                    grads(lambda x, w: lax_conv(x, w, (1, 1, 1), padding), x, w)):
        assert rel_err(a, b) <= 2e-5


@pytest.mark.parametrize("group_bytes,frame_bytes,n_out,group", [
    (40 * 2**10, 2**20, 5, 1), (80 * 2**10, 2**20, 2, 2), (2**20, 64, 5, 0)])
@pytest.mark.slow
def test_conv_stride1_frame_groups_and_fallback(monkeypatch, group_bytes, frame_bytes, n_out, group):
    """Small budgets split the frames into groups (one map step each), or, when one frame's
    intermediate is over GEMM_CONV_MAX_FRAME_BYTES, fall back to XLA's convolution; both forms
    (patches: I <= O, taps: O < I); same values and gradients."""
    from walrus_jax.models import convolution

    kx, kw = jax.random.split(jax.random.key(5))
    x = jax.random.normal(kx, (4, 7, 6, 5, 4))
    w = jax.random.normal(kw, (2, 3, 2, 4, n_out)) / 5
    padding = ((1, 1), (0, 0), (1, 0))
    assert convolution._frames_per_group(x.shape, w.shape, padding, x.dtype) == 0  # tiny: XLA's form
    monkeypatch.setattr(convolution, "GEMM_CONV_MIN_FLOPS", 0)
    monkeypatch.setattr(convolution, "GEMM_CONV_GROUP_BYTES", group_bytes)
    monkeypatch.setattr(convolution, "GEMM_CONV_MAX_FRAME_BYTES", frame_bytes)
    assert convolution._frames_per_group(x.shape, w.shape, padding, x.dtype) == group
    assert rel_err(conv_stride1(x, w, padding), lax_conv(x, w, (1, 1, 1), padding)) <= 1e-5
    for a, b in zip(grads(lambda x, w: conv_stride1(x, w, padding), x, w),
                    grads(lambda x, w: lax_conv(x, w, (1, 1, 1), padding), x, w)):
        assert rel_err(a, b) <= 2e-5


# ------------------------------------------------------------------ lean initialization and loading
def test_init_host_and_traced_paths_agree():
    """The eager constructor assembles weights chunk by chunk on the host; inside a trace (jit with
    shardings on accelerators) one lax.map draws them. Same seed -> identical values, and the
    random kernels have the std the scheme promises (1/sqrt(fan_in))."""
    from flax import nnx

    from walrus_jax.models import ModelConfig, Walrus

    cfg = ModelConfig.tiny(n_states=12)
    eager = nnx.state(Walrus(cfg, rngs=nnx.Rngs(3)))
    traced = jax.jit(lambda: nnx.state(Walrus(cfg, rngs=nnx.Rngs(3))))()
    flat_e, flat_t = dict(nnx.to_flat_state(eager)), dict(nnx.to_flat_state(traced))
    assert flat_e.keys() == flat_t.keys()
    for path in flat_e:
        np.testing.assert_array_equal(np.asarray(flat_e[path].get_value()), np.asarray(flat_t[path].get_value()),
                                      err_msg=str(path))
    fused = np.asarray(flat_e[("processor", "blocks", "space", "fused", "kernel")].get_value())
    assert abs(fused.std() * np.sqrt(cfg.hidden_dim) - 1.0) < 0.05
    assert not np.array_equal(fused[0], fused[1])  # the stacked layers differ
    other = nnx.state(Walrus(cfg, rngs=nnx.Rngs(4)))
    assert not np.array_equal(np.asarray(dict(nnx.to_flat_state(other))[("embed", "d2", "proj1")].get_value()),
                              np.asarray(flat_e[("embed", "d2", "proj1")].get_value()))


def test_to_device_is_zero_copy_on_cpu():
    """Host-assembled float32 weights become the model's arrays without a second copy."""
    from walrus_jax.models.init import host_buffer, to_device

    buf = host_buffer((3, 1000))
    buf[...] = 1.5
    dev = to_device(buf, np.float32)
    if jax.default_backend() == "cpu":
        assert dev.unsafe_buffer_pointer() == buf.ctypes.data
    assert to_device(buf, jnp.bfloat16).dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(dev), buf)


def test_load_state_dict_round_trip_and_strictness():
    """load_state_dict(to_state_dict(a)) reproduces model a exactly; a bad state_dict raises before
    anything is written (the model keeps its weights)."""
    from flax import nnx

    from walrus_jax.checkpoints import convert
    from walrus_jax.models import ModelConfig, Walrus

    cfg = ModelConfig.tiny(n_states=12)
    sd = convert.to_state_dict(Walrus(cfg, rngs=nnx.Rngs(1)))
    target = Walrus(cfg, rngs=nnx.Rngs(2))
    before = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(target))}
    bad = dict(sd)
    bad["blocks.0.space_mixing.ff_out.bias"] = np.zeros(3, np.float32)
    del bad["encoder_dummy"]
    with pytest.raises(convert.ConversionError, match="ff_out.bias.*shape|missing key"):
        convert.load_state_dict(target, bad)
    for p, v in nnx.to_flat_state(nnx.state(target)):
        np.testing.assert_array_equal(np.asarray(v.get_value()), before[p])
    convert.load_state_dict(target, sd)
    back = convert.to_state_dict(target)
    assert back.keys() == sd.keys()
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


@pytest.mark.parametrize("impl", ["kernel", "xla", "tpu"])
@pytest.mark.parametrize("causal, N, Tq, D", [
    (True, 5, 6, 8),      # causal: the mask
    (False, 5, 6, 8),
    (False, 130, 6, 48),  # the small configuration's head_dim (whole vectors); more tokens than work items
    (False, 7, 1, 20),    # a rollout's last frame only: one query per token; head_dim with a tail
])
@pytest.mark.slow
def test_frame_attention_equals_materialised(impl, causal, N, Tq, D):
    """The CPU forms of time attention (the C++ kernel, and the XLA form of broadcast products over T
    frames) equal softmax attention written with einsums, bias and causal mask included; values and
    gradients."""
    from walrus_jax.cpu_kernels import frame_attention as kernel
    from walrus_jax.models import attention

    T, H = 6, 3
    kq, kk, kv, kb = jax.random.split(jax.random.key(1), 4)
    q = 2.0 * jax.random.normal(kq, (N, Tq, H, D))
    k, v = (2.0 * jax.random.normal(kk_, (N, T, H, D)) for kk_ in (kk, kv))
    bias = jax.random.normal(kb, (H, Tq, T))

    def reference(q, k, v, bias):
        logits = jnp.einsum("nqhd,nkhd->nhqk", q, k) / np.sqrt(D) + bias[None]
        if causal:
            logits = jnp.where(np.tril(np.ones((T, T), bool)), logits, -jnp.inf)
        return jnp.einsum("nhqk,nkhd->nqhd", jax.nn.softmax(logits, axis=-1), v)

    if impl == "kernel":
        assert kernel.available() and kernel.supports(q, k, v, bias)
        assert "WjFrameAttentionForward" in str(jax.make_jaxpr(attention.frame_attention, static_argnums=4)(q, k, v, bias, causal))
        f = lambda q, k, v, b: kernel.frame_attention(q, k, v, b, causal)
    else:
        halve = impl == "xla"  # the XLA:CPU form halves head_dim sums, the TPU form ("tpu") does not
        f = lambda q, k, v, b: attention._frame_attention(q, k, v, b, causal, halve)
    assert rel_err(jax.jit(f)(q, k, v, bias), reference(q, k, v, bias)) <= 1e-6
    loss = lambda fn: (lambda *a: jnp.sum(jnp.cos(fn(*a)) * jnp.arange(D)))
    for a, b in zip(jax.jit(jax.grad(loss(f), argnums=(0, 1, 2, 3)))(q, k, v, bias),
                    jax.grad(loss(reference), argnums=(0, 1, 2, 3))(q, k, v, bias)):
        assert rel_err(a, b) <= 1e-5


def test_channel_ops_gradients():
    """add_channels / scale_channels (bias and scale with the channel sum as a product) have the
    plain broadcast ops' values and gradients."""
    from walrus_jax.models.layers import add_channels, scale_channels

    kx, kb, kw = jax.random.split(jax.random.key(2), 3)
    x = jax.random.normal(kx, (3, 5, 7, 6))
    b = jax.random.normal(kb, (6,))
    w = jax.random.normal(kw, x.shape)
    for op, plain in ((add_channels, lambda x, b: x + b), (scale_channels, lambda x, b: x * b)):
        np.testing.assert_array_equal(op(x, b), plain(x, b))
        got = jax.grad(lambda x, b: jnp.sum(jnp.sin(op(x, b)) * w), argnums=(0, 1))(x, b)
        want = jax.grad(lambda x, b: jnp.sum(jnp.sin(plain(x, b)) * w), argnums=(0, 1))(x, b)
        for a, c in zip(got, want):
            assert rel_err(a, c) <= 1e-6
