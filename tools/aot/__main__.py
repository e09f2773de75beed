"""Compile a job's programs for a TPU slice on this host, ahead of time, and report what they cost per device.

    python -m tools.aot --topology v5p-64 --config configs/walrus_1p3b.py \
        [--config.model.dtype=bfloat16 --config.mesh.fsdp=8 ...] [--shapes 128x128,128x128x128] \
        [--batch_per_chip 2] [--programs train,eval,rollout] [--optimization_effort -1] [--json report.json]

Needs libtpu (`pip install -e ".[tpu]"`) but no TPU: the slice's compile-only devices
(`jax.experimental.topologies`) carry the job's own mesh (`config.mesh`), and the job's own jitted
programs (`tools/aot/programs.py`) are lowered and compiled for them by the TPU compiler. Per program
it prints, per device (a chip: a v4 chip's two TensorCores are one device, as JAX runs them),
arguments / temporaries / total against HBM and whether it fits (total within --hbm_fraction of HBM;
a program the compiler refuses for memory does not), FLOPs per step counted through the loops against
the analytic model count (`tools/bench/flops.py`), the collectives with their bytes per step, and the
compile time.
`--json FILE` writes one object per program. `--optimization_effort -1` asks XLA for its least
optimisation (its `exec_time_optimization_effort`): the tiny config's train step then compiles ~6x
faster, for a program the compiler optimised less, so its memory figures differ (the tests use it to
check the tool; the figures to quote come from the default, 0).

Exit status 0 when every program fits; otherwise 1 and one line per program naming the shortfall. A
mistake in the command line (an unknown topology, config key or shape) is one `error:` line, status 2.
Only one process at a time can hold libtpu (it locks a file in /tmp); ALLOW_MULTIPLE_LIBTPU_LOAD=1 lifts
that for processes that only compile, as this tool does.
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import flags
from ml_collections import config_flags

from walrus_jax.errors import ConfigError, run_command, verbose_requested

GB = 2**30  # reported in GiB, as HBM sizes are


def define_flags(fv: flags.FlagValues, argv) -> None:
    config_flags.DEFINE_config_file("config", None, "Config file (path.py[:variant]).", flag_values=fv,
                                    lock_config=True, sys_argv=list(argv))
    flags.DEFINE_string("topology", None, "TPU slice: a Cloud TPU name (v5p-64, v4-64, v5e-256) or a chip "
                        "grid (v5p:2x4x4).", flag_values=fv)
    flags.DEFINE_string("shapes", "128x128,128x128x128", "Spatial shapes of the train steps, comma-separated; "
                        "eval and rollout use the first.", flag_values=fv)
    flags.DEFINE_integer("batch_per_chip", None, "Samples per device (a chip), "
                         "default: data.batch_size over the config's mesh.data x mesh.fsdp, -1 counting as "
                         "1.", flag_values=fv)
    flags.DEFINE_string("programs", "train,eval,rollout", "Which programs to compile.", flag_values=fv)
    flags.DEFINE_float("hbm_fraction", 0.9, "A program fits when its per-chip total is at most this "
                       "fraction of the chip's HBM.", flag_values=fv)
    flags.DEFINE_float("optimization_effort", 0.0, "XLA's exec_time_optimization_effort, in [-1, 1]: -1 "
                       "compiles fastest, 0 is the compiler's default.", flag_values=fv)
    flags.DEFINE_string("json", None, "Write the report here (a list, one object per program).", flag_values=fv)
    flags.DEFINE_bool("verbose", False, "Print the traceback of an error.", flag_values=fv)


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    from walrus_jax.models.patching import supported_sizes

    shapes = []
    for item in text.split(","):
        try:
            shape = tuple(int(v) for v in item.strip().lower().split("x"))
        except ValueError:
            shape = ()
        if not 2 <= len(shape) <= 3 or min(shape) < 1:
            raise ConfigError(f"--shapes: {item!r} is not a 2-D or 3-D spatial shape such as 128x128 or 64x64x64")
        sizes = supported_sizes(sum(1 for n in shape if n > 1))
        if any(n > 1 and n not in sizes for n in shape):
            raise ConfigError(f"--shapes: {item!r}: the model's stride table takes sizes {sizes} (or 1) per axis")
        shapes.append(shape)
    return shapes


def default_batch_per_chip(config) -> int:
    groups = max(int(config.mesh.data), 1) * max(int(config.mesh.fsdp), 1)
    return max(int(config.data.batch_size) // groups, 1)


def analyse(program, topology, mesh, hbm_fraction: float, cfg, effort: float = 0.0) -> dict:
    """Lower, compile and measure one program (see the module doc)."""
    import jax

    from tools.aot import analysis, topologies
    from tools.bench.flops import forward_flops
    from walrus_jax.models.config import PERIODIC

    t0 = time.time()
    traced = program.fn.trace(*program.args)  # the TPU forms: the arguments are placed on TPU devices
    devices = mesh.devices.size  # per device below: a chip
    hbm = topologies.hbm_per_device(topology, devices)
    row = {"program": program.name, "topology": topology.name, "chips": topology.chips, "devices": devices,
           "mesh": dict(mesh.shape), "shape": list(program.shape), "global_batch": program.batch,
           "batch_per_device": program.batch // devices, "hbm_bytes": hbm, "optimization_effort": effort}
    try:
        options = {"exec_time_optimization_effort": effort} if effort else None
        compiled = traced.lower().compile(compiler_options=options)
        row.update(analysis.memory(compiled), collectives=analysis.collectives(compiled.as_text()))
    except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses a program over the HBM
        needed = analysis.out_of_memory_bytes(str(e))
        if needed is None:
            raise
        row.update(args_bytes=0, output_bytes=0, temp_bytes=needed, code_bytes=0, total_bytes=needed, host_temp_bytes=0,
                   collectives={}, compile_error=str(e).splitlines()[0])
    row["compile_s"] = time.time() - t0
    row["fits"] = row["total_bytes"] <= hbm_fraction * hbm
    row["flops"] = analysis.jaxpr_flops(traced.jaxpr.jaxpr, "tpu") / devices
    t_in = program.args[1]["input_fields"].shape[1] if program.kind != "rollout" else program.args[2].shape[1]
    fields = len(program.shape) + 2
    bcs = ((PERIODIC, PERIODIC),) * len(program.shape)
    row["model_flops"] = program.forward_passes * forward_flops(cfg, program.shape, t_in, fields, program.batch,
                                                                bcs) / devices
    row["flops_ratio"] = row["flops"] / row["model_flops"]
    return row


def report_line(row: dict) -> str:
    coll = ", ".join(f"{k} {v['count']:.0f}x {v['bytes'] / GB:.2f} GiB" for k, v in sorted(row["collectives"].items()))
    if "compile_error" in row:
        coll = f"(not compiled: {row['compile_error'][:90]})"
    return (f"{row['program']:<11} {'x'.join(map(str, row['shape'])):<12} {row['batch_per_device']:>4} "
            f"{row['args_bytes'] / GB:>8.2f} {row['temp_bytes'] / GB:>8.2f} {row['total_bytes'] / GB:>8.2f} "
            f"{row['hbm_bytes'] / GB:>6.1f} {'yes' if row['fits'] else 'NO':>4} {row['host_temp_bytes'] / GB:>8.2f} "
            f"{row['flops'] / 1e12:>9.2f} {row['model_flops'] / 1e12:>9.2f} {row['flops_ratio']:>5.2f} "
            f"{row['compile_s']:>7.1f}  {coll or '-'}")


HEADER = (f"{'program':<11} {'shape':<12} {'b/dv':>4} {'args GiB':>8} {'temp GiB':>8} {'totalGiB':>8} "
          f"{'HBMGiB':>6} {'fits':>4} {'hostGiB':>8} {'TFLOP/dv':>9} {'model TF':>9} {'ratio':>5} {'compile':>7}  collectives per step")


def main(fv: flags.FlagValues, argv) -> int:
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments: {argv[1:]}")
    if fv.config is None:
        raise ConfigError("--config is required, e.g. --config configs/walrus_1p3b.py")
    if not fv.topology:
        raise ConfigError("--topology is required, e.g. --topology v5p-64")
    from tools.aot import topologies

    try:
        topology = topologies.resolve(fv.topology)
    except topologies.UnknownTopology as e:
        raise ConfigError(str(e)) from None
    shapes = parse_shapes(fv.shapes)
    kinds = tuple(k.strip() for k in fv.programs.split(",") if k.strip())
    unknown = sorted(set(kinds) - {"train", "eval", "rollout"})
    if unknown or not kinds:
        raise ConfigError(f"--programs: {fv.programs!r}; choose from train, eval, rollout")
    if not -1.0 <= fv.optimization_effort <= 1.0:
        raise ConfigError(f"--optimization_effort={fv.optimization_effort} must be in [-1, 1]")
    batch_per_chip = fv.batch_per_chip or default_batch_per_chip(fv.config)
    if batch_per_chip < 1:
        raise ConfigError(f"--batch_per_chip={batch_per_chip} must be at least 1")
    if fv.json and not os.path.isdir(os.path.dirname(os.path.abspath(fv.json))):
        raise ConfigError(f"--json {fv.json}: its directory does not exist")

    try:
        devices = topologies.devices(topology)
    except (ImportError, RuntimeError) as e:
        raise ConfigError(f"cannot build {topology.grid}'s compile-only devices ({str(e).splitlines()[0]}); "
                          "libtpu is needed: pip install -e \".[tpu]\"") from None
    from tools.aot import programs as progs
    from walrus_jax import sharding
    from walrus_jax.training.config import model_config

    mesh = sharding.make_mesh(fv.config.mesh, devices)
    cfg = model_config(fv.config)
    built = progs.build(fv.config, mesh, shapes, batch_per_chip, kinds)
    print(f"{topology.name} ({topology.grid}, {topology.chips} chips, {topology.hbm_bytes / GB:.0f} GiB HBM each; "
          f"{mesh.devices.size} devices), "
          f"mesh {dict(mesh.shape)}, model {cfg.hidden_dim} hidden x {cfg.n_blocks} blocks, "
          f"dtype {cfg.dtype}, remat {cfg.remat}, kernels {cfg.kernels}"
          + (f", optimization effort {fv.optimization_effort:g}" if fv.optimization_effort else ""), flush=True)
    print(HEADER, flush=True)
    rows = []
    for program in built:
        row = analyse(program, topology, mesh, fv.hbm_fraction, cfg, fv.optimization_effort)
        rows.append(row)
        print(report_line(row), flush=True)
    if fv.json:
        with open(fv.json, "w") as f:
            json.dump(rows, f, indent=1)
    short = [r for r in rows if not r["fits"]]
    for r in short:
        print(f"does not fit: {r['program']} needs {r['total_bytes'] / GB:.2f} GiB per device, "
              f"{(r['total_bytes'] - fv.hbm_fraction * r['hbm_bytes']) / GB:.2f} GiB over "
              f"{fv.hbm_fraction:.0%} of {r['hbm_bytes'] / GB:.0f} GiB", file=sys.stderr)
    return 1 if short else 0


def cli(argv=None) -> int:
    from walrus_jax.main import parse_flags

    argv = list(sys.argv if argv is None else argv)
    fv = flags.FlagValues()
    define_flags(fv, argv)
    if any(a in ("--help", "-h") for a in argv[1:]):
        print(__doc__)
        print(fv.get_help())
        return 0
    return run_command(lambda: main(fv, parse_flags(fv, argv)), verbose_requested(argv))


if __name__ == "__main__":
    sys.exit(cli())
