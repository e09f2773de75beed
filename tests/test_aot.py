"""`python -m tools.aot`: the tiny config's train step, eval step and rollout step compiled for a 4-chip
TPU v5e by the TPU compiler on this CPU host (libtpu, compile-only devices), in float32 and bf16."""
from __future__ import annotations

import json
import pathlib

import pytest

from tools.aot import __main__ as aot
from tools.aot import analysis, topologies

# TPU compiles, all in one test worker (the "libtpu" group: pytest.ini). They ask XLA for its least
# optimisation (--optimization_effort -1): ~40 s for the four programs instead of ~7 minutes.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("libtpu")]

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")
KEYS = {"program", "shape", "args_bytes", "temp_bytes", "total_bytes", "hbm_bytes", "fits", "flops", "model_flops",
        "compile_s", "collectives", "host_temp_bytes"}


def _run(tmp_path, *extra):
    out = tmp_path / "report.json"
    rc = aot.cli(["aot", "--topology", "v5e-4", "--config", TINY, "--shapes", "32x32", "--batch_per_chip", "1",
                  "--optimization_effort", "-1", "--json", str(out), *extra])
    return rc, json.loads(out.read_text()) if out.exists() else None


def _check(rows, programs=("train_2d", "eval_2d", "rollout_2d")):
    assert [r["program"] for r in rows] == list(programs)
    for r in rows:
        assert KEYS <= set(r), r.keys()
        assert r["chips"] == 4 and r["hbm_bytes"] == 16 * 2**30 and r["shape"] == [32, 32]
        assert 0 < r["args_bytes"] and 0 <= r["temp_bytes"] and r["total_bytes"] >= r["args_bytes"]
        assert r["flops"] > 0 and r["model_flops"] > 0 and r["compile_s"] > 0 and r["optimization_effort"] == -1
    train = rows[0]
    # The matrix products the program runs, against forward + backward of the analytic count. The
    # tiny model's FLOPs are mostly space attention (1024 tokens, hidden 32), whose flash backward
    # recomputes the logits in both of its kernels: 9 products where the analytic count has 6.
    assert 0.9 <= train["flops_ratio"] <= 1.5, train["flops_ratio"]
    # FSDP over 4 chips: weights are gathered and gradients reduced every step
    coll = train["collectives"]
    assert coll and sum(v["bytes"] for v in coll.values()) > 0, coll


def test_float32_train_step_compiles_for_tpu_and_a_shortfall_is_one_line(tmp_path, capsys):
    # The train step only: its forward is the eval and rollout programs' computation, which the
    # bfloat16 test compiles (float32 products take six bf16 passes on a TPU: 3x the compile time).
    rc, rows = _run(tmp_path, "--hbm_fraction", "1e-9", "--programs", "train")
    err = capsys.readouterr().err
    assert rc == 1
    _check(rows, ["train_2d"])
    assert not rows[0]["fits"]
    lines = [ln for ln in err.splitlines() if ln.startswith("does not fit")]
    assert len(lines) == 1 and lines[0].startswith("does not fit: train_2d needs "), err


def test_bfloat16_programs_fit_and_offload_keeps_block_inputs_on_the_host(tmp_path, capsys):
    rc, rows = _run(tmp_path, "--config.model.dtype=bfloat16", "--config.model.remat=offload")
    out = capsys.readouterr().out
    assert rc == 0, out
    _check(rows)
    assert all(r["fits"] for r in rows)
    assert "train_2d" in out and "v5e:2x2" in out and "dtype bfloat16" in out
    # The train step saves each block's input in host memory; the forward-only programs save nothing.
    train, *forward_only = rows
    assert train["host_temp_bytes"] > 0, train
    assert all(r["host_temp_bytes"] == 0 for r in forward_only)


@pytest.mark.parametrize("argv, message", [
    (["--topology", "v9-8"], "unknown topology 'v9-8'; known: v4-8"),
    (["--topology", "v5e-4", "--shapes", "16"], "--shapes: '16' is not a 2-D or 3-D spatial shape"),
    (["--topology", "v5e-4", "--shapes", "16x16"], "--shapes: '16x16': the model's stride table takes sizes [32, 128"),
    (["--topology", "v5e-4", "--programs", "train,fly"], "--programs: 'train,fly'; choose from"),
    (["--topology", "v5e-4", "--config.model.hiden_dim=3"], "has no key 'hiden_dim'"),
    (["--topology", "v5e-4", "--optimization_effort", "2"], "--optimization_effort=2.0 must be in [-1, 1]"),
])
def test_command_line_mistakes_are_one_line(argv, message, capsys):
    assert aot.cli(["aot", "--config", TINY, *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_topology_names():
    assert topologies.resolve("v5p-64").chips == 32 and topologies.resolve("v4-64").chips == 32
    assert topologies.resolve("v5e-256").chips == 256 and topologies.resolve("v5p:2x2x2").chips == 8
    with pytest.raises(topologies.UnknownTopology):
        topologies.resolve("v5p:2xx2")


def test_one_device_per_chip():
    """As JAX runs a slice: a v4 chip's two TensorCores are one device (megacore) with the chip's HBM."""
    for name, chips in (("v4-8", 4), ("v5p-8", 4), ("v5e-4", 4)):
        topology = topologies.resolve(name)
        assert len(topologies.devices(topology)) == chips
        assert topologies.hbm_per_device(topology, chips) == topology.hbm_bytes


def test_collectives_multiply_loop_bodies_by_their_trip_count():
    """A scan's body runs `n` times: XLA's known_trip_count, or the bound its condition compares with;
    a combined (tuple) all-reduce counts every array, an async start its results."""
    hlo = """HloModule m

%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p = (s32[], f32[4]) parameter(0)
  %ag = f32[8,4]{1,0:T(8,128)} all-gather(f32[2,4]{1,0} %x), dimensions={0}
  ROOT %t = (s32[], f32[4]) tuple(%a, %b)
}

%cond (p: (s32[], f32[4])) -> pred[] {
  %c40 = s32[]{:T(128)} constant(40)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %c40), direction=LT
}

%body2 (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %ags = (f32[2,4]{1,0}, f32[8,4]{1,0}) all-gather-start(f32[2,4]{1,0} %x), dimensions={0}
  ROOT %t = (s32[], f32[4]) tuple(%a, %b)
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %w = (s32[], f32[4]) while(%t0), condition=%cond, body=%body
  %w2 = (s32[], f32[4]) while(%t1), condition=%cond, body=%body2, backend_config={"known_trip_count":{"n":"3"}}
  %ar = (f32[1024]{0}, bf16[8]{0}) all-reduce(f32[1024]{0} %g, bf16[8]{0} %h), to_apply=%add
  ROOT %r = f32[4] get-tuple-element(%w), index=1
}
"""
    got = analysis.collectives(hlo)
    assert got["all-gather"] == {"count": 43.0, "bytes": 43.0 * 8 * 4 * 4}
    assert got["all-reduce"] == {"count": 1.0, "bytes": 4096.0 + 16.0}
