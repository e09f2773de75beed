"""The processor: N identical space-time blocks, created with nnx.vmap (one stacked set of weights)
and applied with nnx.scan (one compiled block, not N), with an optional remat policy."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import filterlib
from jax.ad_checkpoint import checkpoint_name

from walrus_jax.cpu_kernels import attention as fused_attention
from walrus_jax.models import lora
from walrus_jax.models.activation_sharding import batch_sharded
from walrus_jax.models.attention import SpaceAttention, TimeAttention
from walrus_jax.models.config import ModelConfig
from walrus_jax.models.kernels import known_platform, select

BLOCK_INPUT = "block_input"  # the name each block's input carries for the remat policies
REMAT_POLICIES = {
    "full": None,  # save nothing
    # As "full", but each block's input is kept in host memory: on an accelerator the saved inputs
    # (n_blocks x one block's activations) are the largest buffer of a long-context train step, and
    # one block's input goes back to the device per backward step. On CPU host memory is the device's.
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=[BLOCK_INPUT],
        offload_src="device", offload_dst="pinned_host"),
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_and_attention": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(*fused_attention.OUTPUT_NAMES)),
}
TOKEN_AXES = (2, 3, 4)  # (h, w, d) of a (B, T, h, w, d, hid) tensor
# The blocks' weights are stacked along a leading axis named "layers": nnx.vmap prepends the name to
# every weight's logical axis names (out_sharding metadata), and nnx.scan removes it inside each step
# and restores it after, so a block always sees its own per-block names.
STACKED = {nnx.PARTITION_NAME: "layers"}
# In CPU programs a training call (a drop-path key given) of a processor of at most this many blocks
# runs as an unrolled loop even with scan_layers: differentiated, a scan writes every block's saved
# activations into stacked buffers and reads them back, copies XLA:CPU does not elide (S config
# train step 0.61x -> 0.79x the original's time ratio, peak memory 1.21x -> 1.02x). Inference keeps
# the scan: unrolled, XLA:CPU keeps more buffers alive at once (S forward peak 1.18x -> 1.47x the
# original's). Deeper models keep the scan (compile time grows with every unrolled block).
CPU_UNROLL_MAX_BLOCKS = 4
# Inside a scan each block's weights are dynamic slices of the stacked ones. XLA:CPU fuses the slice
# of a small weight (a bias, a norm scale) into every elementwise kernel that reads it and then
# computes it per element, unvectorised: the space block's bias + SwiGLU took 15 ms instead of 3 per
# small-config block. Weights of at most this many elements per block therefore enter the scan
# whole, and CPU programs take them from the stack as a product with the one-hot block index
# (`_block_slice`, exact for finite weights: one term is 1 * w, the others 0 * w'), which XLA
# computes once and does not fuse.
# Larger weights are matrix-product operands, which XLA copies out of the stack anyway.
CPU_SMALL_WEIGHT_ELEMENTS = 2 ** 16


class Block(nnx.Module):
    """SpaceTimeSplitBlock: time attention (+ residual), then space attention (+ residual)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.time = TimeAttention(cfg, rngs=rngs)
        self.space = SpaceAttention(cfg, rngs=rngs)

    def __call__(self, x, rate=0.0, key=None, last_frame_only: bool = False):
        """x (B, T, h, w, d, hid) -> same, or (B, 1, h, w, d, hid) with last_frame_only: only the
        last frame's output (space attention treats frames independently, so it runs on that one)."""
        kt, ks = (None, None) if key is None else jax.random.split(key)
        y = self.time(x, rate, kt, last_frame_only=last_frame_only)
        return self.space(y, rate, ks, n_frames=x.shape[1] if last_frame_only else None)


def roll_tokens(x: jax.Array, shift: jax.Array) -> jax.Array:
    """Circular shift of the token grid by shift (3,) (traced) along (h, w, d)."""
    for a, axis in enumerate(TOKEN_AXES):
        if x.shape[axis] > 1:
            x = jnp.roll(x, shift[a], axis=axis)
    return x


class Processor(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg

        @nnx.split_rngs(splits=cfg.n_blocks)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=STACKED)
        def create(r: nnx.Rngs) -> Block:
            block = Block(cfg, rngs=r)
            lora.attach(block, cfg, rngs=r)  # inside the vmap: adapters stack with the layers
            return block

        self.blocks = create(rngs)

    def __call__(self, x: jax.Array, token_shift: jax.Array | None = None, key: jax.Array | None = None,
                 last_frame_only: bool = False) -> jax.Array:
        """x (B, T, h, w, d, hid) tokens -> same, or (B, 1, h, w, d, hid) with last_frame_only.
        token_shift (n_blocks, 3): roll before each block, undone after the last one; None for no
        roll. key: drop-path randomness (None: eval).

        last_frame_only: the caller needs only the last frame's tokens (a rollout, or a model that
        predicts from the last frame alone). Every block but the last still needs all frames (the
        next block's time attention reads them), but the last block computes one frame: its time
        attention asks one query per token and its space attention runs on one frame of T, about
        (T - 1) / T of the last block's work saved, same numbers."""
        cfg = self.cfg
        rates = jnp.asarray(cfg.drop_path_rates())
        xs = {"rate": rates}
        if token_shift is not None:
            xs["shift"] = jnp.asarray(token_shift, jnp.int32)
        if key is not None:
            xs["key"] = jax.random.split(key, cfg.n_blocks)

        def block_step(last: bool, scanned: bool):
            def step(block: Block, x, xs):
                x = batch_sharded(x)  # each block's input and output stay split by sample (activation_sharding)
                x = checkpoint_name(x, BLOCK_INPUT)
                if "shift" in xs:
                    x = roll_tokens(x, xs["shift"])
                return batch_sharded(block(x, xs["rate"], xs.get("key"), last_frame_only=last))
            if cfg.remat != "none":
                policy = REMAT_POLICIES[cfg.remat]
                if cfg.remat == "offload" and known_platform(cfg.kernels) == "cpu":
                    policy = REMAT_POLICIES["full"]  # a CPU's host memory is its device memory: no copies
                step = nnx.remat(step, policy=policy, prevent_cse=not scanned)
            return step

        graphdef, state = nnx.split(self.blocks)
        # jnp: the weights may be numpy arrays (closed over), which cannot be indexed by tracers later.
        state = jax.tree.map(jnp.asarray, state)
        small = _small_weight_paths(state)

        def scanned_blocks(x, xs, state):
            """All blocks as one nnx.scan; the small weights enter whole and are picked per step
            (`_block_slice`, see CPU_SMALL_WEIGHT_ELEMENTS)."""
            blocks, xs = nnx.merge(graphdef, state), dict(xs)
            step = block_step(last=False, scanned=True)
            if small:
                small_filter = filterlib.PathIn(*small)
                block_axes = nnx.StateAxes({small_filter: None, ...: 0})
                xs["index"] = jnp.arange(cfg.n_blocks)
            else:
                block_axes = 0

            @nnx.scan(in_axes=(block_axes, nnx.Carry, 0), out_axes=nnx.Carry, transform_metadata=STACKED)
            def run(block, x, xs):
                if small:
                    gd, stacked, rest = nnx.split(block, small_filter, ...)
                    picked = jax.tree.map(lambda a: _block_slice(a, xs["index"], cfg.kernels), stacked)
                    block = nnx.merge(gd, picked, rest)
                return step(block, x, xs)

            return run(blocks, x, xs)

        def block_at(state, i):
            return nnx.merge(graphdef, jax.tree.map(lambda a: _block_slice(a, i, cfg.kernels), state))

        def unrolled_blocks(x, xs, state):
            step = block_step(last=False, scanned=False)
            for i in range(cfg.n_blocks):
                x = step(block_at(state, i), x, jax.tree.map(lambda a: a[i], xs))
            return x

        if not last_frame_only:
            if not cfg.scan_layers:
                x = unrolled_blocks(x, xs, state)
            elif key is not None and cfg.n_blocks <= CPU_UNROLL_MAX_BLOCKS:
                x = select(cfg.kernels, x, xs, state, xla=scanned_blocks, cpu=unrolled_blocks)
            else:
                x = scanned_blocks(x, xs, state)
        else:
            n_full = cfg.n_blocks - 1
            if cfg.scan_layers:
                # The first n_blocks - 1 blocks as a scan over block indices (indexing the stacked
                # weights in place: scanning over a slice of them would copy (N - 1) / N of them).
                step = block_step(last=False, scanned=True)

                def body(x, i_xs):
                    i, xs_i = i_xs
                    return step(block_at(state, i), x, xs_i), None

                x, _ = jax.lax.scan(body, x, (jnp.arange(n_full), jax.tree.map(lambda a: a[:n_full], xs)))
            else:
                step = block_step(last=False, scanned=False)
                for i in range(n_full):
                    x = step(block_at(state, i), x, jax.tree.map(lambda a: a[i], xs))
            x = block_step(last=True, scanned=cfg.scan_layers)(block_at(state, n_full), x,
                                                                jax.tree.map(lambda a: a[n_full], xs))
        if token_shift is not None:
            x = roll_tokens(x, -jnp.sum(xs["shift"], axis=0))
        return x


def _is_small(a) -> bool:
    """A stacked weight (n_blocks, ...) of at most CPU_SMALL_WEIGHT_ELEMENTS floats per block."""
    return jnp.issubdtype(a.dtype, jnp.floating) and a.size <= CPU_SMALL_WEIGHT_ELEMENTS * a.shape[0]


def _small_weight_paths(state: nnx.State) -> tuple:
    """Paths (within a block) of the stacked small weights."""
    return tuple(path for path, a in nnx.to_flat_state(state) if _is_small(a.get_value() if hasattr(a, "get_value") else a))


def _block_slice(a: jax.Array, i, kernels: str) -> jax.Array:
    """a[i] of a stacked weight a (n_blocks, ...); in CPU programs, for a traced i and a small weight,
    as one_hot(i) . a (see CPU_SMALL_WEIGHT_ELEMENTS)."""
    if isinstance(i, int) or not _is_small(a):
        return a[i]
    one_hot = lambda a, i: jnp.tensordot(jax.nn.one_hot(i, a.shape[0], dtype=a.dtype), a, axes=1)
    return select(kernels, a, i, xla=lambda a, i: a[i], cpu=one_hot)
