"""What the training job derives from its ml_collections config (configs/*.py), and the checks that
need no data and no compute (they run before the workdir, its lock or any array exists)."""
from __future__ import annotations

import jax

from walrus_jax import sharding
from walrus_jax.errors import ConfigError
from walrus_jax.models.config import ModelConfig
from walrus_jax.training import optim, steps


def model_config(config) -> ModelConfig:
    """The frozen ModelConfig described by `config.model` (placeholders -> None)."""
    return ModelConfig.from_dict(config.model.to_dict())


def micro_batch_size(config) -> int:
    """Samples per micro-step: data.batch_size split over data.dataset_draws independent draws."""
    return int(config.data.batch_size) // int(config.data.dataset_draws)


def micro_steps_per_update(config) -> int:
    """Micro-steps per optimizer update: train.grad_accum micro-batches of data.dataset_draws draws each."""
    return int(config.train.grad_accum) * int(config.data.dataset_draws)


def step_options(config) -> steps.StepOptions:
    t = config.train
    return steps.StepOptions(loss_multiplier=float(t.loss_multiplier), eps=float(t.normalization_eps),
                             jitter=bool(t.jitter), minimum_context=int(t.minimum_context),
                             grad_accum=micro_steps_per_update(config), rollout_steps=int(t.rollout_steps),
                             rollout_stop_gradient=bool(t.rollout_stop_gradient))


def output_steps(config) -> int:
    """Frames after each training window: data.n_steps_output, at least train.rollout_steps."""
    return max(int(config.data.n_steps_output), int(config.train.rollout_steps))


def validate_config(config) -> None:
    """Errors that need no data and no compute (raised before anything is built)."""
    t = config.train
    optim.make_schedule(t)  # raises on bad lengths (warmup + cooldown longer than the run, ...)
    optim.optimizer_config(t)  # raises on grad_accum < 1, clip_norm <= 0, an unknown optimizer
    if config.data.normalization not in ("sample", "global"):
        raise ConfigError(f"config data.normalization={config.data.normalization!r}; expected 'sample' (per-sample "
                          "RMS) or 'global' (the dataset's stats.yaml)")
    if t.minimum_context < 0 or config.data.n_steps_input <= t.minimum_context:
        raise ConfigError(f"config data.n_steps_input={config.data.n_steps_input} must exceed train.minimum_context="
                          f"{t.minimum_context} (>= 0): the first minimum_context predictions are not scored")
    if int(t.rollout_steps) < 1:
        raise ConfigError(f"config train.rollout_steps={t.rollout_steps}: expected >= 1 (1: the one-step loss)")
    _check_lora(config.lora)
    if config.lora.rank > 0 and not config.init_from:
        raise ConfigError(f"config lora.rank={config.lora.rank} needs config.init_from (a base checkpoint to adapt)")
    if config.checkpoint.every < 0:
        raise ConfigError(f"config checkpoint.every must be >= 0 (0 = only at the end), got {config.checkpoint.every}")
    _check_batch(config)
    sharding.rules_dict(config.sharding.rules)
    model_config(config)  # raises on an invalid architecture
    if config.init_from:
        from walrus_jax.checkpoints.load import check_path

        check_path(config.init_from)


def _check_lora(lo) -> None:
    """The lora section: rank > 0 (adapters) or 0 (full fine-tuning, and then none of the adapter
    settings given); known targets; alpha > 0; dropout in [0, 1)."""
    from walrus_jax.models.config import LORA_TARGETS

    if not isinstance(lo.rank, int) or lo.rank < 0:
        raise ConfigError(f"config lora.rank={lo.rank!r}: expected a positive integer (adapters of that rank) or 0 "
                          "(no adapters: full fine-tuning)")
    unknown = [t for t in lo.targets if t not in LORA_TARGETS]
    if unknown or not lo.targets:
        raise ConfigError(f"config lora.targets={tuple(lo.targets)}: unknown {unknown}; choose a non-empty subset of "
                          f"{LORA_TARGETS}")
    if lo.rank == 0 and tuple(lo.targets) != LORA_TARGETS:
        raise ConfigError(f"config lora.rank=0 with lora.targets={tuple(lo.targets)}: rank 0 means no adapters (a full "
                          "fine-tune of every parameter); give lora.rank > 0 for adapters, or drop the :lora variant "
                          "for a full fine-tune")
    if lo.rank > 0 and not float(lo.alpha) > 0:
        raise ConfigError(f"config lora.alpha={lo.alpha}: expected > 0 (the adapters' scale is alpha / rank)")
    if not 0.0 <= float(lo.dropout) < 1.0:
        raise ConfigError(f"config lora.dropout={lo.dropout}: expected a value in [0, 1)")


def _check_batch(config) -> None:
    """The micro-batch must split evenly over dataset draws, mesh devices and processes."""
    draws = config.data.dataset_draws
    if draws < 1 or config.data.batch_size % draws:
        raise ConfigError(f"config data.dataset_draws={draws} must be >= 1 and divide data.batch_size="
                          f"{config.data.batch_size} (each draw is one micro-step of batch_size / dataset_draws)")
    mesh_shape = sharding.mesh_shape(config.mesh, jax.device_count())
    n = mesh_shape[0] * mesh_shape[1]
    micro = micro_batch_size(config)
    what = f"data.batch_size={config.data.batch_size}" + (f" / data.dataset_draws={draws} = {micro}" if draws > 1 else "")
    if micro % n:
        raise ConfigError(f"config {what} is not divisible by the mesh's {n} devices (mesh.data={mesh_shape[0]} × "
                          f"mesh.fsdp={mesh_shape[1]}): the batch is sharded over both axes")
    if micro % jax.process_count():
        raise ConfigError(f"config {what} is not divisible by the {jax.process_count()} processes")
