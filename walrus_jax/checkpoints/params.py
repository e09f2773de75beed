"""The parameter toolkit: the abstract model, parameters by path, and parameters -> model.

Every place that needs the shapes of a Walrus, walks its parameters by name or builds a model from
stored arrays goes through here:

    abstract_model(cfg)                  Walrus(cfg) built with `nnx.eval_shape`: ShapeDtypeStruct values,
                                         nothing allocated, no random numbers drawn
    variables(model_or_state)            {("processor", "blocks", ...): nnx.Variable} for every variable
    flatten(tree) / unflatten(flat)      nested dict <-> {"a/b/c": leaf} (sep=None: tuple-of-str keys)
    model_from_params(cfg, params)       a Walrus holding `params` (cast to cfg's dtypes, optionally
                                         placed with `shardings`), without running the random init
    host_params(model)                   a model's variables as a nested dict of numpy arrays
    random_params(cfg, seed, scale)      fast numpy random parameters (demos and tests)

A parameter path is the chain of attribute names from the model root, e.g.
"processor/blocks/space/fused/kernel", the same as the keys of `nnx.to_pure_dict(nnx.state(model))`.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from walrus_jax.models import initializers
from walrus_jax.models.config import ModelConfig

SEP = "/"


def abstract_model(cfg: ModelConfig):
    """Walrus(cfg) with jax.ShapeDtypeStruct values (shapes, dtypes and variable metadata only)."""
    from walrus_jax.models.walrus import Walrus

    return nnx.eval_shape(lambda: Walrus(cfg, rngs=nnx.Rngs(0)))


def variables(model_or_state) -> dict[tuple[str, ...], nnx.Variable]:
    """{path tuple of str: Variable} of a model (or an nnx.State), in nnx's order."""
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)
    return {tuple(str(p) for p in path): var for path, var in nnx.to_flat_state(state)}


def flatten(tree: Mapping, sep: str | None = SEP) -> dict:
    """A nested dict -> {"a/b/c": leaf} (sep=None: {("a", "b", "c"): leaf}); keys become str."""
    flat = traverse_util.flatten_dict(tree)
    if sep is None:
        return {tuple(str(k) for k in path): v for path, v in flat.items()}
    return {sep.join(str(k) for k in path): v for path, v in flat.items()}


def unflatten(flat: Mapping, sep: str | None = SEP) -> dict:
    """The inverse of `flatten`: {"a/b/c": leaf} or {("a", "b", "c"): leaf} -> nested dict."""
    if not flat:
        return {}
    if sep is None:
        return traverse_util.unflatten_dict(dict(flat))
    return traverse_util.unflatten_dict({tuple(k.split(sep)): v for k, v in flat.items()})


def path_name(path) -> str:
    """A jax.tree_util key path (DictKey / SequenceKey / GetAttrKey entries) as "a/b/c"."""
    return SEP.join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def fixed_buffer(var: nnx.Variable) -> np.ndarray | None:
    """The value of a non-parameter variable (a fixed buffer, never learned nor checkpointed, e.g.
    the RoPE frequency buffer) from its declared `Init`; None if that Init is random (no fixed value)."""
    spec = initializers.of(var)
    return None if spec.random else spec.constant(tuple(var.get_value().shape))


def model_from_params(cfg: ModelConfig, params: Mapping, source: str = "params", shardings: Mapping | None = None):
    """A Walrus model with the given parameters, without running the (slow, eager) random init.

    params: nested dict {path part: ...: array} as `nnx.to_pure_dict(nnx.state(model))` or
      `walrus_jax.checkpoints.convert.assemble_params` produce (keys compared as strings). Arrays are
      cast to the dtype `cfg.param_dtype` gives each variable. The RoPE frequency buffer may be
      absent (training checkpoints hold nnx.Param only); it then gets its fixed value.
    shardings: optional nested dict (same paths) of jax.sharding.Sharding: each array is placed with
      its sharding (already placed jax arrays of the right dtype are used as they are).
    Raises ValueError naming `source` and the first missing / mis-shaped parameters.
    """
    graphdef, state = nnx.split(abstract_model(cfg))
    flat = flatten(params, sep=None)
    where = {} if shardings is None else flatten(shardings, sep=None)
    missing = []
    for path, var in variables(state).items():
        value = flat.get(path)
        if value is None:
            value = None if isinstance(var, nnx.Param) else fixed_buffer(var)
            if value is None:
                missing.append(SEP.join(path))
                continue
        want = var.get_value()
        if tuple(np.shape(value)) != tuple(want.shape):
            raise ValueError(f"{source}: parameter {SEP.join(path)} has shape {np.shape(value)}, the model "
                             f"config expects {tuple(want.shape)}")
        if not (isinstance(value, jax.Array) and value.dtype == want.dtype):  # placed arrays stay where they are
            value = jnp.asarray(value, want.dtype)
        if path in where:
            value = jax.device_put(value, where[path])
        var.set_value(value)
    if missing:
        raise ValueError(f"{source}: {len(missing)} model parameter(s) missing, e.g. {missing[:5]}")
    return nnx.merge(graphdef, state)


def host_params(model, kind=...) -> dict:
    """The model's variables (`kind`: nnx.Param for the parameters only) as a nested dict of numpy arrays."""
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, kind)))


def cast_model(model, dtype: str = "bfloat16", param_dtype: str | None = None):
    """A copy of a Walrus model computing in `dtype` with parameters stored in `param_dtype`
    (default: `dtype`). RMS statistics, LayerNorm and the attention softmax stay float32 inside the
    model, and the rollout's normalization statistics are float32 whatever the model dtype."""
    cfg = model.cfg.replace(dtype=str(jnp.dtype(dtype)), param_dtype=str(jnp.dtype(param_dtype or dtype)))
    return model_from_params(cfg, host_params(model), "cast_model")


def random_params(cfg: ModelConfig, seed: int = 0, scale: float = 1.0) -> dict:
    """Random parameters for `cfg` drawn in numpy (no jax compilation at all), for demos and tests
    that need a model in a second and whose outputs are meaningless.

    Every variable is drawn as its declared `Init` says (models/initializers.py, the scheme
    `Walrus(cfg, rngs=...)` uses: kernels truncated normal with std 1/sqrt(fan_in), the T5 bias
    table and position embedding 0.02 x truncated normal, LoRA B, biases 0, norm scales 1, RoPE
    frequencies fixed), with numpy's generator instead of the model's compiled one, so the values
    differ from the model's; `scale` multiplies every random std. Returns a nested dict for
    `model_from_params`.
    """
    rng = np.random.default_rng(seed)
    out: dict[tuple[str, ...], np.ndarray] = {}
    for path, var in variables(abstract_model(cfg)).items():
        out[path] = initializers.of(var).numpy_value(rng, tuple(var.get_value().shape), scale)
    return unflatten(out, sep=None)


def random_model(cfg: ModelConfig, seed: int = 0, scale: float = 1.0):
    """A Walrus model with `random_params` (fast to build; for demos and tests)."""
    return model_from_params(cfg, random_params(cfg, seed, scale), f"random_params(seed={seed})")


def fingerprint(params: Any) -> dict[str, list[int]]:
    """{'a/b/kernel': [shape...]} for every parameter leaf (arrays or ShapeDtypeStructs)."""
    return {k: [int(d) for d in np.shape(v)] for k, v in flatten(params).items()}
