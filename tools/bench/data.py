"""Data-pipeline benchmark: samples/s and MB/s for 1, 2, 4 workers, and RSS over many reads.

    python tools/bench/data.py [--data DIR] [--workers 1,2,4] [--batches 200] [--reads 100000]

DIR is a miniwell output folder (generated with --quick into a temporary folder when absent).
"Workers" are grain processes (worker_count); 1 means one worker process, as 2 and 4. The
pipeline is the training one: mixture sampling, random stride 1-5, inflation, rotation, batch 2,
T_in 6. RSS is the resident set size of a loop of `--reads` WellDataset reads, sampled every
10% of the way (flat = no leak; the_well-style caching is bounded by the file structure).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def bench_pipeline(roots, workers: int, batches: int, batch_size: int, n_in: int) -> tuple[float, float]:
    from walrus_jax.data import make_train_pipeline
    it = make_train_pipeline(roots, batch_size=batch_size, n_steps_input=n_in, max_dt_stride=5, seed=0, cfg=None,
                             worker_count=workers, process_index=0, process_count=1)
    for _ in range(max(4, workers * 3)):  # warm up: start workers, fill buffers
        next(it)
    t0 = time.perf_counter()
    n_samples, n_bytes = 0, 0
    for _ in range(batches):
        b = next(it)
        n_samples += b["input_fields"].shape[0]
        n_bytes += b["input_fields"].nbytes + b["output_fields"].nbytes + b["constant_fields"].nbytes
    dt = time.perf_counter() - t0
    it.close()
    return n_samples / dt, n_bytes / dt / 2 ** 20


def bench_rss(root: str, reads: int) -> list[tuple[int, float]]:
    from walrus_jax.data import WellDataset
    ds = WellDataset(root, 6, 1, 1, 5, split="train", inflate_to_3d=True)
    rng = np.random.default_rng(0)
    marks = []
    t0 = time.perf_counter()
    for i in range(reads):
        ds[int(rng.integers(len(ds)))]
        if (i + 1) % max(1, reads // 10) == 0:
            marks.append((i + 1, _rss_mb()))
    return marks, reads / (time.perf_counter() - t0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=None, help="miniwell folder (default: generate --quick in a temp dir)")
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--n-steps-input", type=int, default=6)
    ap.add_argument("--reads", type=int, default=100_000)
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
    data = args.data
    if data is None or not os.path.isdir(data):
        from walrus_jax.data import miniwell
        data = data or tempfile.mkdtemp(prefix="miniwell_")
        miniwell.main(["--out", data, "--quick"])
    roots = sorted(os.path.join(data, d) for d in os.listdir(data) if os.path.isdir(os.path.join(data, d, "data")))
    print(f"datasets: {[os.path.basename(r) for r in roots]}  (cpus: {os.cpu_count()})")
    print(f"{'workers':>8} {'samples/s':>10} {'MB/s':>8}")
    for w in [int(x) for x in args.workers.split(",") if x]:
        sps, mbs = bench_pipeline(roots, w, args.batches, args.batch_size, args.n_steps_input)
        print(f"{w:>8} {sps:>10.1f} {mbs:>8.1f}", flush=True)
    if args.reads:
        marks, rate = bench_rss(roots[0], args.reads)
        print(f"RSS over {args.reads} reads of {os.path.basename(roots[0])} ({rate:.0f} reads/s, one process):")
        print("  " + "  ".join(f"{n}: {mb:.1f} MB" for n, mb in marks))


if __name__ == "__main__":
    main()
