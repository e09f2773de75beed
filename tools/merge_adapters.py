"""Fold low-rank adapters into their base: a converted checkpoint that runs like any release.

    python -m tools.merge_adapters --base ckpt/ --adapters runs/ft_lora --output ckpt_merged/ [--overwrite]
    python -m tools.merge_adapters --base ckpt/ --adapters runs/ft_lora --export-delta delta/

--base: the converted release (or walrus_jax workdir) the adapters were trained on; --adapters: a
LoRA fine-tuning workdir (its newest checkpoint) or an exported delta (WORKDIR/adapters). The merged
kernels are W + A B · alpha / rank; new vocabulary rows, learned RoPE / APE come along, and the
output's vocabulary is the fine-tuned one. `walrus_jax.load_pretrained(OUTPUT)` reads it.
--export-delta writes only the delta (adapters.json + adapters.npz, a few MB) instead.
A delta made for another base, or an edited or damaged one, is refused (one line, exit status 2).
The output never goes into (or around) the --base or --adapters folders, and an existing output
is replaced only with --overwrite (--output: only an earlier converted checkpoint; --export-delta:
only an earlier delta).
"""
from __future__ import annotations

import argparse
import os
import sys

from walrus_jax.errors import ConfigError, quiet_after_command, run_command, verbose_requested


def check_output(flag: str, output: str, inputs: dict) -> None:
    """ConfigError when `output` is, lies inside or holds one of the inputs ({flag: path})."""
    out = os.path.realpath(output)
    for name, path in inputs.items():
        real = os.path.realpath(path)
        if out == real or out.startswith(real.rstrip(os.sep) + os.sep) or real.startswith(out.rstrip(os.sep) + os.sep):
            raise ConfigError(f"{flag} {output} overlaps the input {name} {path}: choose an output folder outside "
                              "the base and the adapters (they would be replaced or changed)")


def check_delta_output(directory: str, overwrite: bool) -> None:
    """--export-delta: an existing delta is replaced only with --overwrite; a file is never."""
    from walrus_jax.checkpoints import adapters

    if os.path.lexists(directory) and not os.path.isdir(directory):
        raise ConfigError(f"--export-delta {directory}: exists and is not a folder")
    existing = [f for f in (adapters.DELTA_FILE, adapters.ARRAYS_FILE) if os.path.lexists(os.path.join(directory, f))]
    if existing and not overwrite:
        raise ConfigError(f"--export-delta {directory}: already holds an adapter delta ({', '.join(existing)}); pass "
                          "--overwrite to replace it")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="converted checkpoint (or workdir) the adapters were trained on")
    ap.add_argument("--adapters", required=True, help="LoRA fine-tuning workdir or exported adapter delta")
    out = ap.add_mutually_exclusive_group(required=True)
    out.add_argument("--output", help="directory of the merged converted checkpoint")
    out.add_argument("--export-delta", help="directory to write the delta (after checking it against --base)")
    ap.add_argument("--overwrite", action="store_true", help="replace an earlier converted checkpoint at --output "
                    "(or an earlier delta at --export-delta)")
    ap.add_argument("--verbose", action="store_true", help="show the traceback of an error")
    args = ap.parse_args(argv)

    def go():
        from walrus_jax.checkpoints import adapters
        from walrus_jax.checkpoints.load import load_model, read_weights
        from walrus_jax.checkpoints.pretrained import save_pretrained

        inputs = {"--base": args.base, "--adapters": args.adapters}
        if args.export_delta:
            check_output("--export-delta", args.export_delta, inputs)
            check_delta_output(args.export_delta, args.overwrite)
            delta = adapters.read_delta(args.adapters)
            adapters.check_base(delta, adapters.fingerprint(read_weights(args.base).params), args.base)
            path = adapters.write_delta(args.export_delta, delta)
            print(f"wrote the adapter delta ({len(delta.arrays)} arrays) to {path}")
            return 0
        check_output("--output", args.output, inputs)
        model = adapters.merge_model(load_model(args.base, adapters=args.adapters))
        path = save_pretrained(model, args.output, overwrite=args.overwrite,
                               info={"merged_from": {"base": args.base, "adapters": args.adapters}})
        print(f"wrote the merged checkpoint to {path}")
        return 0

    return run_command(go, args.verbose)


if __name__ == "__main__":
    rc = main()
    quiet_after_command(verbose_requested(sys.argv))
    sys.exit(rc)
