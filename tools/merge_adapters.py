"""Fold low-rank adapters into their base: a converted checkpoint that runs like any release.

    python -m tools.merge_adapters --base ckpt/ --adapters runs/ft_lora --output ckpt_merged/ [--overwrite]
    python -m tools.merge_adapters --base ckpt/ --adapters runs/ft_lora --export-delta delta/

--base: the converted release (or walrus_jax workdir) the adapters were trained on; --adapters: a
LoRA fine-tuning workdir (its newest checkpoint) or an exported delta (WORKDIR/adapters). The merged
kernels are W + A B · alpha / rank; new vocabulary rows, learned RoPE / APE come along, and the
output's vocabulary is the fine-tuned one. `walrus_jax.load_pretrained(OUTPUT)` reads it.
--export-delta writes only the delta (adapters.json + adapters.npz, a few MB) instead.
A delta made for another base is refused (one line, exit status 2).
"""
from __future__ import annotations

import argparse
import sys

from walrus_jax.errors import run_command


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="converted checkpoint (or workdir) the adapters were trained on")
    ap.add_argument("--adapters", required=True, help="LoRA fine-tuning workdir or exported adapter delta")
    out = ap.add_mutually_exclusive_group(required=True)
    out.add_argument("--output", help="directory of the merged converted checkpoint")
    out.add_argument("--export-delta", help="directory to write the delta (after checking it against --base)")
    ap.add_argument("--overwrite", action="store_true", help="replace an earlier converted checkpoint at --output")
    ap.add_argument("--verbose", action="store_true", help="show the traceback of an error")
    args = ap.parse_args(argv)

    def go():
        from walrus_jax.checkpoints import adapters
        from walrus_jax.checkpoints.load import read_weights
        from walrus_jax.checkpoints.pretrained import save_pretrained

        if args.export_delta:
            delta = adapters.read_delta(args.adapters)
            adapters.check_base(delta, adapters.fingerprint(read_weights(args.base).params), args.base)
            path = adapters.write_delta(args.export_delta, delta)
            print(f"wrote the adapter delta ({len(delta.arrays)} arrays) to {path}")
            return 0
        model = adapters.merge_model(adapters.load(args.base, args.adapters))
        path = save_pretrained(model, args.output, overwrite=args.overwrite,
                               info={"merged_from": {"base": args.base, "adapters": args.adapters}})
        print(f"wrote the merged checkpoint to {path}")
        return 0

    return run_command(go, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
