"""A rollout as a serialized `jax.export` artifact: StableHLO with the weights inside and a symbolic
batch dimension, callable from any process with jax (no walrus_jax) or from a runtime that loads
StableHLO (IREE, XLA's C++ API), e.g. to couple the surrogate into a solver.

    wj.export(model, input_fields, "step.jaxexport", field_indices=fi, bcs=bcs, n_steps=1)

    # in another process, with only jax installed:
    import jax
    exported = jax.export.deserialize(open("step.jaxexport", "rb").read())
    preds = exported.call(x)          # x (b, T_in, *spatial, C_var) float32, any batch b

The exported function is `wj.rollout_fn`'s (jitter off): input_fields (b, T_in, *spatial, C_var) ->
preds (b, n_steps, *spatial, C_var), plus constant_fields (b, *spatial, C_con) as a second argument
when the model was exported with constant fields, and the boolean mask (b, *spatial) as the last
argument when exported with one. The model runs on its portable forms (kernels="xla"), so the
artifact holds no call into walrus_jax's own kernels and lowers for any of `platforms`.

The serialization format (a flatbuffer) holds at most 2 GiB, weights included: the small and medium
presets fit, the released 1.3B model (5.2 GB in float32, 2.6 GB in bfloat16) does not.
"""
from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from walrus_jax.errors import UserError
from walrus_jax.inference.differentiable import rollout_fn
from walrus_jax.models.walrus import Walrus, with_kernels

FLATBUFFER_LIMIT = 2 ** 31  # bytes a serialized Exported can hold


def export(model, input_fields, path: str | os.PathLike, *, field_indices, bcs, n_steps: int,
           constant_fields=None, padded_field_mask=None, mask=None, normalization_stats=None,
           platforms: Sequence[str] | None = None) -> jax.export.Exported:
    """Writes `path` (the bytes of `Exported.serialize()`) and returns the Exported.

    input_fields: an example (B, T_in, *spatial, C_var) array or jax.ShapeDtypeStruct; its batch
    axis becomes symbolic, the other axes are fixed. constant_fields / mask: examples of the extra
    arguments (their batch axis symbolic as well), or None. field_indices, bcs, padded_field_mask,
    normalization_stats: as in `wj.rollout`, fixed in the artifact. platforms: e.g. ("cpu", "cuda",
    "tpu"); default this process's backend.
    """
    if isinstance(model, Walrus) and model.cfg.kernels != "xla":
        model = with_kernels(model, "xla")
    weight_bytes = sum(a.nbytes for a in jax.tree.leaves(nnx.state(model))) if isinstance(model, nnx.Module) else 0
    if weight_bytes >= FLATBUFFER_LIMIT:
        raise UserError(f"export: the model's weights take {weight_bytes / 2**30:.2f} GiB, more than the "
                        f"{FLATBUFFER_LIMIT / 2**30:.0f} GiB a serialized jax.export artifact can hold")
    has_consts, has_mask = constant_fields is not None, mask is not None
    batch = jax.export.symbolic_shape("b")[0]

    def spec(example, dtype):
        shape = tuple(np.shape(example))
        return jax.ShapeDtypeStruct((batch,) + shape[1:], dtype)

    args = [spec(input_fields, jnp.float32)]
    if has_consts:
        args.append(spec(constant_fields, jnp.float32))
    if has_mask:
        args.append(spec(mask, jnp.bool_))

    def call(x, *extra):
        consts = extra[0] if has_consts else None
        msk = extra[-1] if has_mask else None
        f = rollout_fn(model, field_indices=field_indices, bcs=bcs, n_steps=n_steps, constant_fields=consts,
                       padded_field_mask=padded_field_mask, mask=msk, normalization_stats=normalization_stats,
                       checkpoint="none", remat=None)
        return f(x)

    exported = jax.export.export(jax.jit(call), platforms=platforms)(*args)
    data = exported.serialize()
    tmp = f"{os.fspath(path)}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)  # never a half-written artifact under the final name
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return exported
