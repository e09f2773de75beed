"""walrus_jax beside the original PyTorch Walrus on this machine: forward, rollout and train step.

    python -m tools.bench.side_by_side                                   # S,M forward; S rollout; S train
    python -m tools.bench.side_by_side --configs S --train S --rounds 3  # S only, three interleaved rounds
    python -m tools.bench.side_by_side --reference /path/to/reference

The original is a measuring stick only: it is looked for at run time (`--reference`, else
$WALRUS_REFERENCE, else the reference folder next to the checkout, see find_reference) and run in its own processes with its
own scripts (`bench_side.py` for forward / rollout on the same random weights, `train_step_orig.py`
for the training step); walrus_jax never imports it. Without it this prints one line and exits 2.

Each round runs, strictly one after the other, the reference's side-by-side forward / rollout
(original, then walrus_jax, each measurement in its own subprocess) and then, per train config,
the original's train step and walrus_jax's (`tools.bench.train`, same batch, jitter off, AdamW,
clip 10). Rounds interleave the two implementations, so a busy machine slows both alike; the summary
gives per-round ratios and their medians. Memory: peak RSS of each process; for the forward also
the RSS right after loading the weights and the peak while running (the reference's measurements).

Environment: walrus_jax's processes run as `python -m walrus_jax.main` runs, under glibc's huge-page
tunable where that applies (walrus_jax/huge_pages.py; `WALRUS_JAX_HUGE_PAGES=0` measures walrus_jax
without it). The original is then measured both under the tunable (beside walrus_jax, in the same
bench_side.py run, which also checks the outputs agree) and without it, and the summary takes its
better figure of the two in every column: its shorter time and its smaller memory. On this project's
2-core VM the tunable moved the original's times by less than the machine's noise.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

from walrus_jax.huge_pages import glibc_version, huge_page_environment, thp_mode

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_NAMES = {"S": "small", "M": "medium", "tiny": "tiny"}


def find_reference(given: str | None) -> str | None:
    """--reference if given, else $WALRUS_REFERENCE if set, else the 'reference' folder of the checkout's sibling 'shared'."""
    candidates = [given] if given else [os.environ.get("WALRUS_REFERENCE")] if os.environ.get("WALRUS_REFERENCE") \
        else [os.path.join(ROOT, "..", "shared", "reference")]
    for d in candidates:
        if d and os.path.isfile(os.path.join(d, "bench_side.py")):
            return os.path.abspath(d)
    return None


def run(cmd: list[str], log: str, timeout: float, base_env: dict | None = None) -> tuple[int, str]:
    """Runs cmd from the checkout (the reference's scripts use the cwd as the project), output to log,
    in base_env (default: this process's environment)."""
    env = dict(os.environ if base_env is None else base_env, PYTHONDONTWRITEBYTECODE="1")
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with open(log, "w") as fh:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    with open(log) as fh:
        return rc, fh.read()


def environments() -> tuple[dict, list[tuple[str, dict]]]:
    """walrus_jax's environment, and the original's [(name, environment)]: walrus_jax's (measured
    beside it) first, then the plain one when the two differ."""
    tuned = huge_page_environment(os.environ, sys.platform, glibc_version(), thp_mode())
    if tuned is None:
        return dict(os.environ), [("as given", dict(os.environ))]
    return tuned, [("huge pages", tuned), ("plain", dict(os.environ))]


def better_original(rows: list[dict], time_key: str, memory_keys: tuple[str, ...]) -> dict:
    """The original's figures at their best over its environments: the shortest time, the smallest memory."""
    best = dict(min(rows, key=lambda x: x[time_key]))
    for k in memory_keys:
        if all(k in x for x in rows):
            best[k] = min(x[k] for x in rows)
    return best


def forward_round(ref: str, args, work: str, r: int) -> dict | None:
    results = []
    for i, (name, env) in enumerate(args.orig_envs):
        out_dir = os.path.join(work, f"side_{r}_{i}")
        impls = "orig,wj" if i == 0 else "orig"  # walrus_jax once, beside the original in its own environment
        cmd = [sys.executable, os.path.join(ref, "bench_side.py"), "--configs", args.configs, "--impls", impls,
               "--rollout-configs", args.rollout, "--repeats", str(args.repeats), "--size", str(args.size),
               "--T", str(args.t_in), "--C", str(args.fields), "--workdir", out_dir]
        rc, text = run(cmd, os.path.join(work, f"side_{r}_{i}.log"), args.timeout, env)
        res = os.path.join(out_dir, "results.json")
        if rc != 0 or not os.path.exists(res):
            print(f"  round {r}: bench_side.py ({name}) failed (rc {rc}); last output:\n{text[-2000:]}", flush=True)
            return None
        print(f"(bench_side.py, {impls}, {name})\n" + text[text.find("## Forward"):].split("\nresults:")[0], flush=True)
        with open(res) as fh:
            out = json.load(fh)
        for kind in ("forward", "rollout"):
            for x in out[kind]:
                x["env"] = name
        results.append(out)
    merged = {kind: [x for x in results[0][kind] if x["impl"] != "orig"] for kind in ("forward", "rollout")}
    for kind, t, mem in (("forward", "forward_s", ("peak_rss_mb", "rss_loaded_mb")), ("rollout", "rollout_s", ("peak_rss_mb",))):
        for cfg in dict.fromkeys(x["config"] for x in results[0][kind]):
            rows = [x for res in results for x in res[kind] if x["config"] == cfg and x["impl"] == "orig"]
            if rows:
                merged[kind].append(better_original(rows, t, mem))
    return merged


def train_round(ref: str, name: str, args, work: str, r: int) -> dict:
    shape = ["--batch", str(args.batch), "--size", str(args.size), "--t_in", str(args.t_in), "--fields", str(args.fields)]
    row, origs = {}, []
    for i, (env_name, env) in enumerate(args.orig_envs):
        rc, text = run([sys.executable, os.path.join(ref, "train_step_orig.py"), "--config", name, "--steps",
                        str(args.steps)] + shape, os.path.join(work, f"train_orig_{name}_{r}_{i}.log"), args.timeout, env)
        m = re.search(r"median (\d+) ms.*peak RSS (\d+) MB", text)
        if rc == 0 and m:
            origs.append({"orig_s": int(m.group(1)) / 1e3, "orig_rss_mb": float(m.group(2)), "env": env_name})
            print(f"  original {name} train step ({env_name}): {origs[-1]['orig_s']:.2f} s", flush=True)
        else:
            print(f"  round {r}: train_step_orig.py ({env_name}) failed (rc {rc}):\n{text[-1500:]}", flush=True)
    if origs:
        row.update(better_original(origs, "orig_s", ("orig_rss_mb",)))
    js = os.path.join(work, f"train_wj_{name}_{r}.json")
    rc, text = run([sys.executable, "-m", "tools.bench.train", "--models", TRAIN_NAMES[name], "--steps", str(args.steps),
                    "--json", js] + shape, os.path.join(work, f"train_wj_{name}_{r}.log"), args.timeout, args.wj_env)
    if rc == 0 and os.path.exists(js):
        with open(js) as fh:
            w = json.load(fh)["rows"][0]
        row["wj_s"], row["wj_rss_mb"] = w["step_ms"] / 1e3, w["peak_mem_GiB"] * 1024
    else:
        print(f"  round {r}: tools.bench.train failed (rc {rc}):\n{text[-1500:]}", flush=True)
    return row


def tag(orig_row: dict) -> str:
    """Which environment the original's time was measured in, when it was measured in more than one."""
    return f" ({orig_row['env']})" if orig_row.get("env") not in (None, "as given") else ""


def summarise(fwd_rounds: list[dict], train_rounds: dict[str, list[dict]]) -> None:
    print("\n## Summary: walrus_jax vs the original (ratios per round; > 1 means walrus_jax is faster / the "
          "original uses more memory)\n")
    print("| measurement | original | walrus_jax | speed-up (per round) | median speed-up | memory wj/orig |")
    print("|---|---|---|---|---|---|")
    keyed: dict[tuple, list[tuple[dict, dict]]] = {}
    for res in fwd_rounds:
        for kind, rows, t in (("forward", res["forward"], "forward_s"), ("rollout", res["rollout"], "rollout_s")):
            by = {(x["config"], x["impl"]): x for x in rows}
            for (cfg, impl), x in by.items():
                if impl == "wj" and (cfg, "orig") in by:
                    keyed.setdefault((kind, cfg, t), []).append((by[(cfg, "orig")], x))
    for (kind, cfg, t), pairs in keyed.items():
        ups = [o[t] / w[t] for o, w in pairs]
        o, w = pairs[-1]
        if kind == "forward":
            mem = (f"loaded {w['rss_loaded_mb']:.0f}/{o['rss_loaded_mb']:.0f} MB = {w['rss_loaded_mb'] / o['rss_loaded_mb']:.2f}x; "
                   f"peak {w['peak_rss_mb']:.0f}/{o['peak_rss_mb']:.0f} MB = {w['peak_rss_mb'] / o['peak_rss_mb']:.2f}x")
        else:
            mem = f"peak {w['peak_rss_mb']:.0f}/{o['peak_rss_mb']:.0f} MB = {w['peak_rss_mb'] / o['peak_rss_mb']:.2f}x"
        print(f"| {cfg} {kind} | {', '.join(f'{p[0][t]:.3f}{tag(p[0])}' for p in pairs)} s | "
              f"{', '.join(f'{p[1][t]:.3f}' for p in pairs)} s | {', '.join(f'{u:.2f}x' for u in ups)} | "
              f"{statistics.median(ups):.2f}x | {mem} |")
    for name, rows in train_rounds.items():
        rows = [x for x in rows if "orig_s" in x and "wj_s" in x]
        if not rows:
            continue
        ups = [x["orig_s"] / x["wj_s"] for x in rows]
        orig = ", ".join(f"{x['orig_s']:.2f}{tag(x)}" for x in rows)
        wj = ", ".join("%.2f" % x["wj_s"] for x in rows)
        last = rows[-1]
        print(f"| {name} train step | {orig} s | {wj} s | {', '.join(f'{u:.2f}x' for u in ups)} | "
              f"{statistics.median(ups):.2f}x | peak {last['wj_rss_mb']:.0f}/{last['orig_rss_mb']:.0f} MB = "
              f"{last['wj_rss_mb'] / last['orig_rss_mb']:.2f}x |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", default=None, help="folder with the original's bench_side.py")
    ap.add_argument("--configs", default="S,M", help="forward configs (S, M, L, tiny); '' for none")
    ap.add_argument("--rollout", default="S", help="configs that also get a 10-step rollout")
    ap.add_argument("--train", default="S", help="train-step configs (S, M, tiny); '' for none")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5, help="timed forwards per measurement")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--t_in", type=int, default=6)
    ap.add_argument("--fields", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="timed train steps per measurement")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds before one measurement is abandoned")
    ap.add_argument("--workdir", default=None, help="logs and results (default: a new temporary folder)")
    a = ap.parse_args(argv)
    unknown = [c for c in a.train.split(",") if c and c not in TRAIN_NAMES]
    if unknown:
        print(f"side_by_side: --train {a.train!r}: unknown config(s) {unknown}; expected some of {sorted(TRAIN_NAMES)}",
              file=sys.stderr)
        return 2
    ref = find_reference(a.reference)
    if ref is None:
        where = a.reference or os.environ.get("WALRUS_REFERENCE") or os.path.join(ROOT, "..", "shared", "reference")
        print(f"side_by_side: no original Walrus at {where} (expected a folder with bench_side.py): pass "
              "--reference DIR or set WALRUS_REFERENCE", file=sys.stderr)
        return 2
    work = a.workdir or tempfile.mkdtemp(prefix="walrus_side_")
    os.makedirs(work, exist_ok=True)
    print(f"reference: {ref}; logs: {work}; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs", flush=True)
    a.wj_env, a.orig_envs = environments()
    print(f"walrus_jax under GLIBC_TUNABLES={a.wj_env.get('GLIBC_TUNABLES', '')!r}; the original at its better of: "
          + "; ".join(f"{n} (GLIBC_TUNABLES={e.get('GLIBC_TUNABLES', '')!r})" for n, e in a.orig_envs), flush=True)
    fwd_rounds, train_rounds = [], {}
    for r in range(a.rounds):
        print(f"\n# round {r + 1} of {a.rounds}", flush=True)
        if a.configs:
            res = forward_round(ref, a, work, r)
            if res:
                fwd_rounds.append(res)
        for name in filter(None, a.train.split(",")):
            row = train_round(ref, name, a, work, r)
            train_rounds.setdefault(name, []).append(row)
            if "orig_s" in row and "wj_s" in row:
                print(f"{name} train step (batch {a.batch}x{a.t_in}x{a.size}x{a.size}x{a.fields}): original "
                      f"{row['orig_s']:.2f} s, peak {row['orig_rss_mb']:.0f} MB; walrus_jax {row['wj_s']:.2f} s, peak "
                      f"{row['wj_rss_mb']:.0f} MB; speed-up {row['orig_s'] / row['wj_s']:.2f}x; load average "
                      f"{os.getloadavg()[0]:.2f}", flush=True)
    summarise(fwd_rounds, train_rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
