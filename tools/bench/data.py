"""Data-pipeline benchmark: samples/s and MB/s for 1, 2, 4 workers, and RSS over many reads.

    python tools/bench/data.py [--data DIR] [--workers 1,2,4] [--batches 200] [--reads 100000]
    python tools/bench/data.py --remote [--latency-ms 20] [--workers 1,2,4] [--processes 1,2,4] [--batches 40]

DIR is a miniwell output folder (generated with --quick into a temporary folder when absent).
"Workers" are grain processes (worker_count); 1 means one worker process, as 2 and 4. The
pipeline is the training one: mixture sampling, random stride 1-5, inflation, rotation, batch 2,
T_in 6. RSS is the resident set size of a loop of `--reads` WellDataset reads, sampled every
10% of the way (flat = no leak; the_well-style caching is bounded by the file structure).

--remote: the same pipeline reading a generated 128x128 dataset (pressure + velocity, 2 files) from
local disk and from a local HTTP server (walrus_jax.data.serve, range requests) that adds
--latency-ms to every request: samples/s and MB/s of both per worker count. Then, with 1, 2 and 4
simulated processes (each process's pipeline in turn, with its own empty cache of open files, as
on separate machines), the bytes and requests each host fetched from the server for the same
global batches: per-host reading makes bytes per host fall as 1/processes.
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


def write_bench_data(folder: str, res: int = 128, n_files: int = 2, n_traj: int = 4, n_steps: int = 24) -> list[str]:
    """A 2D dataset of res x res pressure + velocity frames (12 B/point/frame: 192 KiB a frame at 128)."""
    from walrus_jax.data.writer import WellField, axis_boundaries, write_well_file
    rng = np.random.default_rng(0)
    bnd = {**axis_boundaries("x", res, "PERIODIC", "PERIODIC"), **axis_boundaries("y", res, "PERIODIC", "PERIODIC")}
    for i in range(n_files):
        write_well_file(os.path.join(folder, "bench_2d", "data", "train", f"bench_2d_{i}.hdf5"),
                        dataset_name="bench_2d", n_trajectories=n_traj, time=np.arange(n_steps) * 0.1,
                        coords={"x": np.linspace(0, 1, res), "y": np.linspace(0, 1, res)},
                        t0_fields={"pressure": WellField(rng.normal(size=(n_traj, n_steps, res, res)).astype(np.float32))},
                        t1_fields={"velocity": WellField(
                            rng.normal(size=(n_traj, n_steps, res, res, 2)).astype(np.float32))},
                        boundaries=bnd)
    return [os.path.join(folder, "bench_2d")]


def bench_hosts(urls, n_proc: int, batches: int, batch_size: int, n_in: int, server) -> tuple[float, float, float]:
    """Mean bytes (MiB) and requests per host, and samples per host, fetched for `batches` global batches."""
    from walrus_jax.data import filesystem, make_train_pipeline
    mib, reqs = [], []
    for p in range(n_proc):
        filesystem.close_all()  # each host starts with no open files, as on its own machine
        server.reset_counts()
        it = make_train_pipeline(urls, batch_size=batch_size, n_steps_input=n_in, max_dt_stride=5, seed=0, cfg=None,
                                 process_index=p, process_count=n_proc)
        n = sum(next(it)["input_fields"].shape[0] for _ in range(batches))
        it.close()
        c = server.reset_counts()
        mib.append(c["bytes"] / 2 ** 20)
        reqs.append(c["requests"])
    return float(np.mean(mib)), float(np.mean(reqs)), n


def main_remote(args) -> None:
    from walrus_jax.data import filesystem
    from walrus_jax.data.serve import serving
    folder = args.data or tempfile.mkdtemp(prefix="bench_remote_")
    if not os.path.isdir(os.path.join(folder, "bench_2d")):
        write_bench_data(folder)
    roots = [os.path.join(folder, "bench_2d")]
    size = sum(os.path.getsize(os.path.join(roots[0], "data", "train", f))
               for f in os.listdir(os.path.join(roots[0], "data", "train")))
    print(f"dataset: bench_2d, 128x128, pressure + velocity, {size / 2 ** 20:.1f} MiB in 2 files; batch "
          f"{args.batch_size}, T_in {args.n_steps_input}, stride 1-5; {args.batches} batches; cpus {os.cpu_count()}; "
          f"block {filesystem.BLOCK_SIZE // 1024} KiB")
    with serving(folder, latency_ms=args.latency_ms) as srv:
        urls = [f"{srv.url}/bench_2d"]
        print(f"\n{'workers':>8} {'local samples/s':>16} {'local MB/s':>11} {'http samples/s':>15} {'http MB/s':>10} "
              f"{'local/http':>11}   (http: +{args.latency_ms:g} ms per request)")
        for w in [int(x) for x in args.workers.split(",") if x]:
            ls, lm = bench_pipeline(roots, w, args.batches, args.batch_size, args.n_steps_input)
            rs, rm = bench_pipeline(urls, w, args.batches, args.batch_size, args.n_steps_input)
            print(f"{w:>8} {ls:>16.1f} {lm:>11.1f} {rs:>15.1f} {rm:>10.1f} {ls / rs:>10.2f}x", flush=True)
        print(f"\n{'processes':>9} {'MiB/host':>9} {'requests/host':>14} {'samples/host':>13} {'MiB/host vs 1':>14}")
        base = None
        for p in [int(x) for x in args.processes.split(",") if x]:
            mib, reqs, n = bench_hosts(urls, p, args.batches, args.batch_size, args.n_steps_input, srv)
            base = base or mib
            print(f"{p:>9} {mib:>9.2f} {reqs:>14.1f} {n:>13} {mib / base:>14.3f}", flush=True)
        filesystem.close_all()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=None, help="miniwell folder (default: generate --quick in a temp dir)")
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=None, help="default 2; --remote: 4 (divisible by 4 processes)")
    ap.add_argument("--n-steps-input", type=int, default=6)
    ap.add_argument("--reads", type=int, default=100_000)
    ap.add_argument("--remote", action="store_true", help="local disk vs a local HTTP server (module doc)")
    ap.add_argument("--latency-ms", type=float, default=20.0, help="--remote: added to every HTTP request")
    ap.add_argument("--processes", default="1,2,4", help="--remote: simulated processes for bytes per host")
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
    if args.remote:
        args.batch_size = args.batch_size or 4
        return main_remote(args)
    args.batch_size = args.batch_size or 2
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
