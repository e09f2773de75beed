"""Full-size conversion benchmark: time and peak memory of `tools.convert_torch_ckpt` on a 1.3B
checkpoint with the released keys and shapes (random values).

    python -m tools.bench.convert                          # float32 and bfloat16 outputs
    python -m tools.bench.convert --dtypes float32 --load  # also time load_pretrained
    python -m tools.bench.convert --tmp /scratch           # where the ~10 GB of temporary files go
    python -m tools.bench.convert --dtypes float32 --forward   # + a forward through load_pretrained

1. A random state_dict with exactly the keys and shapes of
   tests/fixtures/pretrained_state_dict_manifest.json (857 tensors, 1,286,199,487 float32 values)
   is generated tensor by tensor into a disk-backed buffer (np.memmap, never all in anonymous
   memory) and saved as the released format `torch.save({"app": {"model": sd}})` (~5.1 GB).
2. The converter runs as a subprocess (`python -m tools.convert_torch_ckpt`) for each output dtype;
   its wall time and peak resident set (`/usr/bin/time -v`: it counts the file-backed pages of the
   memory-mapped checkpoint as well as anonymous memory) are recorded.
3. Optionally `walrus_jax.load_pretrained` runs in a subprocess (time, peak RSS).
4. Optionally (`--forward`) a further subprocess loads the converted weights with `load_pretrained`
   and runs the released model's forward on the side-by-side benchmark's input (2D 128x128, both
   axes periodic, T=6, 4 fields, batch 1, eval, jitter off, `wj.jit`): the resident set right after
   loading and the peak while compiling and running (MiB, measured as the side-by-side benchmark
   measures the original), the first call (compile included) and the median of `--repeats` timed
   forwards; with numpy's float32 matmul rate measured just before in its own process.
Prints a Markdown table; all temporary files are deleted at the end (also on failure).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from walrus_jax.huge_pages import reexec_with_huge_pages

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MANIFEST = os.path.join(ROOT, "tests", "fixtures", "pretrained_state_dict_manifest.json")
YAML = os.path.join(ROOT, "tests", "fixtures", "walrus_extended_config.yaml")


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _du(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def make_checkpoint(path: str, scratch: str, seed: int = 0) -> tuple[int, int]:
    """Writes a random released-format checkpoint; returns (n_tensors, n_values)."""
    import torch

    with open(MANIFEST) as f:
        shapes = {k: tuple(v) for k, v in json.load(f)["shapes"].items()}
    n_values = sum(int(np.prod(s)) for s in shapes.values())
    buf = np.memmap(scratch, dtype=np.float32, mode="w+", shape=(n_values,))
    rng = np.random.default_rng(seed)
    sd, off = {}, 0
    for k, s in shapes.items():
        n = int(np.prod(s))
        view = buf[off:off + n]
        view[:] = rng.standard_normal(n, dtype=np.float32) * np.float32(0.02)
        if k.endswith("rotary_emb.freqs"):
            view[:] = (np.linspace(1.0, 128.0, n) * np.pi).astype(np.float32)
        sd[k] = torch.from_numpy(view).view(s)
        off += n
    buf.flush()
    torch.save({"app": {"model": sd}}, path)
    del sd, buf
    return len(shapes), n_values


def run_child(cmd: list[str], label: str) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes of the child, stdout). Peak RSS from `/usr/bin/time -v` (that
    child alone) where it exists, else getrusage of the waited children (the maximum so far)."""
    timer = shutil.which("time") or ("/usr/bin/time" if os.path.exists("/usr/bin/time") else None)
    full = [timer, "-v"] + cmd if timer else cmd
    t0 = time.time()
    r = subprocess.run(full, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{label} failed (exit {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr) if timer else None
    peak = int(m.group(1)) * 1024 if m else resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return wall, peak, r.stdout


MATMUL_CHILD = """
import time, numpy as np
a = np.random.default_rng(0).standard_normal((4096, 4096), dtype=np.float32)
a @ a; t = time.perf_counter(); a @ a
print('MATMUL', 2 * 4096 ** 3 / (time.perf_counter() - t) / 1e9)
"""

# Memory as the side-by-side benchmark records it (MiB from /proc/self/status): the resident set once
# the weights are loaded, and the peak while compiling and running (the kernel's peak counter is reset
# after loading through /proc/self/clear_refs).
FORWARD_CHILD = """
import gc, json, statistics, sys, time
import numpy as np
def mib(key):
    with open('/proc/self/status') as f:
        return int(next(l for l in f if l.startswith(key + ':')).split()[1]) / 1024
import jax, walrus_jax as wj
from flax import nnx
from walrus_jax.checkpoints.load import load_pretrained
t = time.perf_counter()
model = load_pretrained(sys.argv[1], dtype=sys.argv[2])
[v.get_value().block_until_ready() for _, v in nnx.to_flat_state(nnx.state(model))]
gd, st = nnx.split(model)
del model
gc.collect()
load_s, loaded, load_peak = time.perf_counter() - t, mib('VmRSS'), mib('VmHWM')
try:
    open('/proc/self/clear_refs', 'w').write('5')
except OSError:
    pass
x = jax.random.normal(jax.random.key(0), (1, 6, 128, 128, 4)).astype(sys.argv[2])
fields, bcs = np.arange(3, 7), ((2, 2), (2, 2))
f = wj.jit(lambda st, x: nnx.merge(gd, st)(x, fields, bcs))
t = time.perf_counter(); f(st, x).block_until_ready(); first = time.perf_counter() - t
times = []
for _ in range(int(sys.argv[3])):
    t = time.perf_counter(); f(st, x).block_until_ready(); times.append(time.perf_counter() - t)
print('FORWARD', json.dumps(dict(load_s=round(load_s, 1), rss_loaded_mib=round(loaded),
      peak_loading_mib=round(load_peak), first_call_s=round(first, 1), forward_s=round(statistics.median(times), 1),
      peak_running_mib=round(mib('VmHWM')))))
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--tmp", default=None, help="directory for the temporary files (default: the system temp dir)")
    p.add_argument("--load", action="store_true", help="also time walrus_jax.load_pretrained on the output")
    p.add_argument("--forward", action="store_true",
                   help="also run the released model's forward through load_pretrained (time, memory)")
    p.add_argument("--repeats", type=int, default=1, help="timed forwards after the first call (--forward)")
    p.add_argument("--json", default=None, help="write the rows to this file")
    args = p.parse_args(argv)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]

    base = args.tmp or tempfile.gettempdir()
    need = 5.2e9 * 2 + sum(5.2e9 if d == "float32" else 2.6e9 for d in dtypes)
    free = shutil.disk_usage(base).free
    if free < need:
        print(f"not enough disk in {base}: {_gb(free)} free, the benchmark needs about {_gb(need)}", file=sys.stderr)
        return 1
    avail = None
    try:
        with open("/proc/meminfo") as f:
            avail = int(re.search(r"MemAvailable:\s+(\d+) kB", f.read()).group(1)) * 1024
    except (OSError, AttributeError):
        pass
    if avail is not None and avail < 12e9:
        print(f"only {_gb(avail)} of memory available; the float32 conversion needs about 6-7 GB plus page cache "
              "(continuing)", file=sys.stderr)

    work = tempfile.mkdtemp(prefix="walrus_bench_convert_", dir=base)
    rows = []
    try:
        ckpt = os.path.join(work, "walrus_random.pt")
        t0 = time.time()
        n_t, n_v = make_checkpoint(ckpt, os.path.join(work, "scratch.f32"))
        os.unlink(os.path.join(work, "scratch.f32"))
        size = os.path.getsize(ckpt)
        print(f"random checkpoint: {n_t} tensors, {n_v:,} values, {size:,} bytes ({time.time() - t0:.0f} s to make)",
              flush=True)
        for dt in dtypes:
            out = os.path.join(work, f"out_{dt}")
            wall, peak, log = run_child([sys.executable, "-m", "tools.convert_torch_ckpt", "--checkpoint", ckpt,
                                         "--config", YAML, "--output", out, "--dtype", dt], f"convert --dtype {dt}")
            m_wr = re.search(r"wrote \d+ Orbax parameter groups in ([\d.]+) s", log)
            row = dict(step=f"convert --dtype {dt}", wall_s=round(wall, 1),
                       stream_write_s=float(m_wr.group(1)) if m_wr else None,
                       peak_rss_gb=round(peak / 1e9, 2), rss_over_file=round(peak / size, 2),
                       output_gb=round(_du(out) / 1e9, 2))
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.load:
                # Block on each parameter's own array (get_value): `v[...]` or tree-mapping over the
                # Variables would make copies and double the measured memory.
                code = ("import time; t=time.time(); from flax import nnx; from walrus_jax.checkpoints.load import load_pretrained; "
                        f"m=load_pretrained({out!r}); "
                        "[v.get_value().block_until_ready() for _, v in nnx.to_flat_state(nnx.state(m))]; "
                        "print('load_s', time.time()-t)")
                wall, peak2, _ = run_child([sys.executable, "-c", code], "load_pretrained")
                row = dict(step=f"load_pretrained ({dt})", wall_s=round(wall, 1), stream_write_s=None,
                           peak_rss_gb=round(peak2 / 1e9, 2), rss_over_file=None,
                           output_gb=None)
                rows.append(row)
                print(json.dumps(row), flush=True)
            if args.forward:
                _, _, log = run_child([sys.executable, "-c", MATMUL_CHILD], "numpy matmul")
                matmul = float(log.split("MATMUL", 1)[1].split()[0])
                _, peak, log = run_child([sys.executable, "-c", FORWARD_CHILD, out, dt, str(args.repeats)],
                                      f"forward ({dt})")
                fwd = json.loads(log.split("FORWARD", 1)[1].split("\n", 1)[0])
                fwd["matmul_gflops"] = round(matmul)
                row = dict(step=f"load_pretrained + forward ({dt}): {json.dumps(fwd)}", wall_s=fwd["forward_s"],
                           stream_write_s=None, peak_rss_gb=round(peak / 1e9, 2), rss_over_file=None, output_gb=None)
                rows.append(row)
                print(json.dumps(row), flush=True)
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\ncheckpoint: {size:,} bytes, {n_t} tensors, {n_v:,} float32 values; CPU cores: {os.cpu_count()}\n")
    cols = ["step", "wall_s", "stream_write_s", "peak_rss_gb", "rss_over_file", "output_gb"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join("-" if r[c] is None else str(r[c]) for c in cols) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    reexec_with_huge_pages()  # as `python -m walrus_jax.main` runs (walrus_jax/huge_pages.py)
    sys.exit(main())
