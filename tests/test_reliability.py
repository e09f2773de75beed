"""What a user can get wrong (or what the machine can do to them) ends in one clear line.

Each case asserts the message (naming the file, key or flag given), a non-zero exit where there is
a command line, and that nothing already there was lost. Command lines run in-process through
their main functions; two cases run a real subprocess (no traceback, exit status 2, --verbose).
"""
from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import warnings

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import yaml
from conftest import main_command, subprocess_env

from walrus_jax import errors, main, workdir_lock
from walrus_jax.inference import rollouts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")
TINY = os.path.join(ROOT, "configs", "tiny.py")
SMALL_PT = os.path.join(FIX, "small_ckpt.pt")


def _one_error_line(err: str, *parts: str) -> str:
    """stderr holds exactly one non-empty line, `error: ...`, containing every part; no traceback."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for p in parts:
        assert p in lines[0], (p, lines[0])
    return lines[0]


def _cli(argv, capsys) -> tuple[int, str]:
    rc = main.cli(["walrus_jax.main"] + argv)
    return rc, capsys.readouterr().err


def _tree(path) -> dict:
    """{relative path: bytes} of every file under path."""
    out = {}
    for d, _, files in os.walk(path):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, path)] = open(p, "rb").read()
    return out


@pytest.fixture(scope="module")
def small_yaml(tmp_path_factory):
    meta = json.loads(str(np.load(os.path.join(FIX, "small_ckpt_expected.npz"))["config_json"]))
    path = tmp_path_factory.mktemp("yaml") / "small.yaml"
    path.write_text(yaml.safe_dump({"model": meta["config"]}))
    return str(path)


# ------------------------------------------------------------------------------ walrus_jax.main
def test_main_config_mistakes_are_one_line(tmp_path, capsys):
    work = str(tmp_path / "w")
    rc, err = _cli(["--config", TINY, "--config.train.stpes=5", "--workdir", work], capsys)
    assert rc == 2
    _one_error_line(err, "--config.train.stpes", "'stpes'", "did you mean 'steps'")
    rc, err = _cli(["--config", TINY, "--config.trian.steps=5", "--workdir", work], capsys)
    assert rc == 2 and "did you mean 'train'" in _one_error_line(err, "--config.trian.steps")
    rc, err = _cli(["--config", TINY, "--config.train.steps=abc", "--workdir", work], capsys)
    assert rc == 2 and "train.steps=abc" in _one_error_line(err)
    binary = tmp_path / "binary.py"
    binary.write_bytes(bytes(range(256)) * 4)
    rc, err = _cli(["--config", str(binary), "--workdir", work], capsys)
    assert rc == 2 and "binary file" in _one_error_line(err, str(binary))
    rc, err = _cli(["--config", str(tmp_path / "nope.py"), "--workdir", work], capsys)
    assert rc == 2 and "no such file" in _one_error_line(err, str(tmp_path / "nope.py"))
    rc, err = _cli(["--config", TINY + ":nope", "--workdir", work], capsys)
    assert rc == 2 and "unknown variant 'nope'" in _one_error_line(err)
    rc, err = _cli(["--config.train.steps=5", "--workdir", work], capsys)
    assert rc == 2 and "--config is required" in _one_error_line(err)
    rc, err = _cli(["--config", TINY, "--nosuchflag=1", "--workdir", work], capsys)
    assert rc == 2 and "nosuchflag" in _one_error_line(err)
    assert not os.path.exists(work)  # nothing was created for a bad command line


def test_main_workdir_naming_a_file(tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    rc, err = _cli(["--config", TINY, "--workdir", str(f)], capsys)
    assert rc == 2 and "is a file, not a directory" in _one_error_line(err, str(f))
    assert f.read_text() == "mine"


def test_main_subprocess_exit_status_and_verbose(tmp_path):
    cmd = [sys.executable, "-m", "walrus_jax.main", "--config", TINY, "--config.train.stpes=5",
           "--workdir", str(tmp_path / "w")]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop(errors.VERBOSE_ENV, None)
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert out.returncode == 2
    _one_error_line(out.stderr, "--config.train.stpes")
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**env, errors.VERBOSE_ENV: "1"},
                         timeout=300)
    assert out.returncode == 2 and "Traceback" in out.stderr and "error: --config.train.stpes" in out.stderr


# ------------------------------------------------------------------------------ errors.run_command
def test_environment_errors_are_one_line_and_bugs_keep_their_traceback(capsys):
    def full_disk():
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/ckpt/3/state")
        except OSError as e:
            raise RuntimeError("checkpoint save failed") from e

    assert errors.run_command(full_disk) == 2
    _one_error_line(capsys.readouterr().err, "No space left on device", "disk is full", "/data/ckpt/3/state")

    def tensorstore_style():  # how Orbax/TensorStore words a failed write: text, no OSError
        raise ValueError('OUT_OF_RANGE: Error writing "x/0": Failed writing: "/ro/ckpt/d/ab": Failed to write '
                         "10 bytes [os_error_code='30']")

    assert errors.run_command(tensorstore_style) == 2
    _one_error_line(capsys.readouterr().err, "Read-only file system", "/ro/ckpt/d/ab")

    def bug():
        raise ValueError("an internal mistake")

    with pytest.raises(ValueError, match="an internal mistake"):
        errors.run_command(bug)
    assert errors.run_command(lambda: (_ for _ in ()).throw(errors.ConfigError("config x: bad")), verbose=True) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith("error: config x: bad")


def test_background_thread_errors_do_not_bury_the_message(capsys):
    import threading

    def thread_fails_then(exc):
        def body():
            t = threading.Thread(target=lambda: 1 / 0)
            t.start()
            t.join()
            if exc is not None:
                raise exc
        return body

    assert errors.run_command(thread_fails_then(OSError(errno.EROFS, "Read-only file system", "/ro/x"))) == 2
    _one_error_line(capsys.readouterr().err, "Read-only file system", "/ro/x")
    assert errors.run_command(thread_fails_then(None)) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "note: 1 error(s)" in err and "ZeroDivisionError" in err and "--verbose" in err


# ------------------------------------------------------------------------------ the converter
def _convert(argv, capsys):
    from tools.convert_torch_ckpt import cli

    rc = cli.main(argv)
    return rc, capsys.readouterr().err


def test_overwrite_never_deletes_user_files_or_inputs(tmp_path, small_yaml, capsys):
    mine = tmp_path / "my_results"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    before = _tree(mine)
    rc, err = _convert(["--checkpoint", SMALL_PT, "--config", small_yaml, "--output", str(mine), "--overwrite"],
                       capsys)
    assert rc == 2 and "not an earlier converted checkpoint" in _one_error_line(err, str(mine), "thesis.tex")
    assert _tree(mine) == before
    # The directory holding the inputs themselves.
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    pt, yml = inputs / "walrus.pt", inputs / "extended_config.yaml"
    pt.write_bytes(open(SMALL_PT, "rb").read())
    yml.write_text(open(small_yaml).read())
    before = _tree(inputs)
    rc, err = _convert(["--checkpoint", str(pt), "--config", str(yml), "--output", str(inputs), "--overwrite"],
                       capsys)
    assert rc == 2 and "contains the input --checkpoint" in _one_error_line(err, str(inputs))
    assert _tree(inputs) == before


def test_nonfinite_weights_are_refused_naming_the_tensor(tmp_path, small_yaml, capsys):
    ckpt = torch.load(SMALL_PT, map_location="cpu", weights_only=True)
    sd = ckpt["app"]["model"]
    key = sorted(k for k in sd if k.startswith("blocks.0.") and sd[k].ndim >= 2)[0]
    sd[key] = sd[key].clone()
    sd[key].view(-1)[3] = float("nan")
    sd[key].view(-1)[5] = float("inf")
    bad = tmp_path / "nan.pt"
    torch.save(ckpt, str(bad))
    out = tmp_path / "out"
    rc, err = _convert(["--checkpoint", str(bad), "--config", small_yaml, "--output", str(out)], capsys)
    assert rc == 2
    _one_error_line(err, str(bad), f"'{key}'", "1 NaN and 1 Inf", "--allow-nonfinite")
    assert not out.exists() and not [e for e in os.listdir(tmp_path) if e.startswith(".out")]
    rc, err = _convert(["--checkpoint", str(bad), "--config", small_yaml, "--output", str(out), "--allow-nonfinite"],
                       capsys)
    assert rc == 0 and (out / "walrus_jax_pretrained.json").is_file()


def test_converter_unreadable_inputs(tmp_path, small_yaml, capsys):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    rc, err = _convert(["--checkpoint", str(empty), "--config", small_yaml, "--output", str(tmp_path / "o")], capsys)
    assert rc == 2 and "the file is empty" in _one_error_line(err, str(empty))
    binary = tmp_path / "config.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    rc, err = _convert(["--checkpoint", SMALL_PT, "--config", str(binary), "--output", str(tmp_path / "o")], capsys)
    assert rc == 2 and "not a YAML text file" in _one_error_line(err, str(binary))
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------ miniwell
def test_miniwell_out_naming_a_file(tmp_path, capsys):
    from walrus_jax.data import miniwell

    f = tmp_path / "data"
    f.write_text("mine")
    assert miniwell.main(["--out", str(f), "--quick", "--systems", "gray_scott"]) == 2
    _one_error_line(capsys.readouterr().err, f"--out {f}", "is a file")
    assert f.read_text() == "mine"


# ------------------------------------------------------------------------------ workdir lock
def test_workdir_lock_names_the_holder_and_takes_over_stale_locks(tmp_path, caplog):
    work = str(tmp_path / "w")
    with workdir_lock.hold(work) as info:
        with pytest.raises(workdir_lock.WorkdirLockedError) as e:
            workdir_lock.acquire(work)
        msg = str(e.value)
        assert f"pid {os.getpid()}" in msg and f"host {socket.gethostname()}" in msg and "started 20" in msg
        assert info["pid"] == os.getpid()
    assert not os.path.exists(os.path.join(work, workdir_lock.LOCK_NAME))  # released
    # A lock left by a process that is gone (same host): taken over with a warning.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with open(os.path.join(work, workdir_lock.LOCK_NAME), "w") as f:
        json.dump({"pid": dead.pid, "host": socket.gethostname(), "started": 0.0, "token": "old"}, f)
    with caplog.at_level("WARNING"), workdir_lock.hold(work) as info:
        assert info["pid"] == os.getpid()
    assert any("stale lock" in r.message and f"pid {dead.pid}" in r.message for r in caplog.records)
    # Another host's lock cannot be checked from here: refused, naming the file to delete.
    with open(os.path.join(work, workdir_lock.LOCK_NAME), "w") as f:
        json.dump({"pid": 1, "host": "some-other-host", "started": 0.0, "token": "x"}, f)
    with pytest.raises(workdir_lock.WorkdirLockedError, match="host some-other-host.*delete .*walrus_jax.lock"):
        workdir_lock.acquire(work)


def test_second_trainer_fails_at_once(tmp_path, capsys):
    work = tmp_path / "w"
    with workdir_lock.hold(str(work)):
        rc, err = _cli(["--config", TINY, "--workdir", str(work), "--config.data.root=/nonexistent"], capsys)
    assert rc == 2
    _one_error_line(err, "is in use by another training job", f"pid {os.getpid()}")
    assert sorted(os.listdir(work)) == []  # the holder's workdir is untouched (its lock released above)


# ------------------------------------------------------------------------------ corrupt checkpoints
def test_corrupt_checkpoint_is_moved_aside_and_its_step_saved_again(tmp_path):
    from walrus_jax.checkpoints.train_state import Checkpointer

    d = str(tmp_path / "ck")
    state = {"w": jnp.arange(6.0)}
    ck = Checkpointer(d, keep=5, async_save=False)
    for s in (1, 2):
        ck.save(s, jax.tree.map(lambda x: x * s, state), {"note": s})
    ck.close()
    for root, _, files in os.walk(os.path.join(d, "2", "state")):
        for f in files:
            open(os.path.join(root, f), "wb").close()  # every file of checkpoint 2 emptied
    sh = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), state)
    ck = Checkpointer(d, keep=5, async_save=False)
    step, restored, meta, _ = ck.restore_latest(abstract)
    assert step == 1 and meta["note"] == 1
    assert [m["step"] for m in ck.moved_aside] == [2] and os.path.isdir(ck.moved_aside[0]["moved_to"])
    assert os.path.basename(ck.moved_aside[0]["moved_to"]).startswith("2.corrupt-")
    assert ck.steps() == [1]
    ck.save(2, restored, {"note": "again"})  # no StepAlreadyExistsError, not skipped
    ck.close()
    assert Checkpointer(d, keep=5, async_save=False).steps() == [1, 2]


# ------------------------------------------------------------------------------ non-finite rollouts
def _diverging(x, fi, bcs, jitter=None):
    return 1e6 * x  # normalized deltas a million times too large: values grow ~1e6x per step


def test_rollout_api_reports_the_first_nonfinite_step():
    x = np.random.default_rng(0).normal(size=(2, 2, 32, 32, 3)).astype(np.float32)
    kw = dict(field_indices=np.array([0, 1, 2]), bcs=((2, 2), (2, 2)), n_steps=8)
    p, finite = rollouts.rollout(_diverging, x, on_nonfinite="ignore", return_finite=True, **kw)
    p = np.asarray(p)
    first = rollouts.first_nonfinite(finite)
    assert finite.shape == (2, 8, 3) and first is not None
    t = first[0]
    assert 0 < t < 8 and finite[:, :t].all() and np.isfinite(p[:, :t]).all()
    assert not np.isfinite(p[first[1][0], t, ..., first[2]]).all()
    np.testing.assert_array_equal(finite, np.isfinite(p).all(axis=(2, 3)))  # the in-scan flags are exact
    with pytest.warns(RuntimeWarning, match=f"prediction step {t + 1} of 8 holds NaN/Inf"):
        rollouts.rollout(_diverging, x, **kw)
    with pytest.raises(rollouts.NonFiniteRolloutError, match=f"step {t + 1} of 8") as e:
        rollouts.rollout(_diverging, x, on_nonfinite="raise", chunk_size=1, **kw)
    assert e.value.step == t and e.value.predictions.shape == p.shape
    assert not e.value.finite[:, -1].any()  # stopped: the last steps never ran
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a finite rollout says nothing
        rollouts.rollout(lambda x, fi, bcs, jitter=None: 0.1 * x, x, **kw)


def _toy_data(path, scale=1.0, n_frames=16):
    from walrus_jax.data.writer import WellField, axis_boundaries, write_well_file

    rng = np.random.default_rng(0)
    n = 32
    g = np.linspace(0, 2 * np.pi, n, endpoint=False, dtype=np.float32)
    t = np.arange(n_frames, dtype=np.float32) * 0.1
    p = np.sin(g[None, None, :, None] + t[None, :, None, None] + rng.uniform(0, 6, (2, 1, 1, 1))) * np.cos(g)
    p = (scale * (p + 0.1 * rng.normal(size=p.shape))).astype(np.float32)
    write_well_file(path, dataset_name="toy", n_trajectories=2, time=t, coords={"x": g, "y": g},
                    t0_fields={"pressure": WellField(p), "density": WellField(1.0 + 0.0 * p + 0.01 * p ** 2)},
                    boundaries={**axis_boundaries("x", n, "PERIODIC", "PERIODIC"),
                                **axis_boundaries("y", n, "PERIODIC", "PERIODIC")})
    return path


@pytest.fixture(scope="module")
def exploding_checkpoint(tmp_path_factory):
    """A tiny model whose decoder bias is 1000: each step adds 1000 x the frame-to-frame RMS, so
    values grow ~500x per step and the RMS statistics overflow float32 near step 8."""
    from test_inference import save_checkpoint

    from walrus_jax.checkpoints.params import model_from_params, random_params
    from walrus_jax.data.fields import FieldVocabulary
    from walrus_jax.models.config import ModelConfig

    vocab = FieldVocabulary.released()
    cfg = ModelConfig.tiny(n_states=len(vocab))
    params = random_params(cfg, seed=1, scale=0.5)
    params["debed"]["d2"]["proj2_bias"][:] = 1e3
    d = tmp_path_factory.mktemp("exploding")
    return save_checkpoint(str(d / "ckpt"), model_from_params(cfg, params), vocab), str(d)


def _rollout_config(ckpt, data, *overrides):
    return main.load_config(os.path.join(ROOT, "configs", "rollout.py") + ":tiny",
                            [f"checkpoint={ckpt}", f"data={data}", "plot=False", "max_rollout_steps=10",
                             *overrides])


def test_rollout_job_divergence_fails_naming_trajectory_step_field(exploding_checkpoint, capsys):
    ckpt, d = exploding_checkpoint
    data = _toy_data(os.path.join(d, "data", "toy.hdf5"))
    out = os.path.join(d, "out_error")
    rc, err = _cli(["--config", os.path.join(ROOT, "configs", "rollout.py") + ":tiny", f"--config.checkpoint={ckpt}",
                    f"--config.data={data}", "--config.plot=False", "--config.max_rollout_steps=10",
                    "--workdir", out], capsys)
    assert rc == 2
    line = _one_error_line(err, "diverged", "trajectory 0", "field 'pressure'", "on_nonfinite=truncate")
    step = int(line.split("prediction step ")[1].split()[0])
    assert 2 <= step <= 10
    assert not os.path.exists(os.path.join(out, "metrics.json"))
    assert not os.path.exists(os.path.join(out, "predictions"))


def test_rollout_job_truncate_writes_only_finite_steps_and_strict_json(exploding_checkpoint):
    from walrus_jax.data.well import WellDataset

    ckpt, d = exploding_checkpoint
    data = _toy_data(os.path.join(d, "data2", "toy.hdf5"))
    out = os.path.join(d, "out_truncate")
    report = main.run(_rollout_config(ckpt, data, "on_nonfinite=truncate"), out, mode="rollout")
    n = report["n_steps"]
    assert report["n_steps_requested"] == 10 and 1 <= n < 10
    assert report["nonfinite"] == {"trajectory": 0, "step": n + 1, "field": "pressure"}

    def no_constants(token):
        raise AssertionError(f"metrics.json is not strict JSON: {token}")

    with open(os.path.join(out, "metrics.json")) as f:
        saved = json.load(f, parse_constant=no_constants)
    assert saved["nonfinite"]["step"] == n + 1 and saved["n_steps"] == n
    assert set(saved["windows_skipped"]) == {"1-20", "21-60"} and "1" in saved["metrics"]["vrmse"]["windows"]
    assert "needs 20 steps, the rollout has" in saved["windows_skipped"]["1-20"]
    ds = WellDataset(os.path.join(out, "predictions", "toy"))  # the project's reader accepts them
    for j in range(2):
        fields = ds.trajectory(j)["fields"]
        assert fields.shape[0] == 4 + n and np.isfinite(fields).all()
    with h5py.File(os.path.join(out, "predictions", "toy", "traj_0.hdf5")) as f:
        assert int(f.attrs["walrus_n_input_steps"]) == 4


def test_rollout_job_checkpoint_errors_name_config_checkpoint(tmp_path, capsys):
    data = _toy_data(str(tmp_path / "toy.hdf5"), n_frames=8)
    for ckpt, why in ((tmp_path / "nope", "does not exist"), (tmp_path / "toy.hdf5", "is a file")):
        rc, err = _cli(["--config", os.path.join(ROOT, "configs", "rollout.py"), f"--config.checkpoint={ckpt}",
                        f"--config.data={data}", "--workdir", str(tmp_path / "out")], capsys)
        assert rc == 2
        line = _one_error_line(err, f"config.checkpoint='{ckpt}'", why)
        assert "init_from" not in line
    (tmp_path / "empty").mkdir()
    rc, err = _cli(["--config", os.path.join(ROOT, "configs", "rollout.py"), f"--config.checkpoint={tmp_path / 'empty'}",
                    f"--config.data={data}", "--workdir", str(tmp_path / "out")], capsys)
    assert rc == 2 and "init_from" not in _one_error_line(err, "config.checkpoint=")


# ------------------------------------------------------------------------------ preemption (SIGTERM)
# No periodic checkpoint before step 20 and asynchronous saves: what survives SIGTERM is the save
# the signal asked for, complete before the process ends.
SIGTERM_OVERRIDES = ["train.steps=24", "checkpoint.every=20", "checkpoint.async_save=True", "eval.n_trajectories=0",
                     "data.batch_size=2", "train.log_every=1"]


def _metric_rows(workdir) -> list[dict]:
    return [json.loads(ln) for ln in open(os.path.join(workdir, "metrics.jsonl"))]


@pytest.mark.slow
def test_sigterm_saves_the_step_releases_the_lock_and_resumes_bitwise(tmp_path):
    import signal
    import time

    from conftest import write_test_dataset

    data = str(tmp_path / "data")
    write_test_dataset(data, "toy", (32, 32), n_traj=2, n_steps=14)
    env = subprocess_env(cache=tmp_path / "jaxcache")
    full = subprocess.run(main_command(tmp_path / "full", data, SIGTERM_OVERRIDES), env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert full.returncode == 0, full.stderr[-3000:]

    work = tmp_path / "stopped"
    p = subprocess.Popen(main_command(work, data, SIGTERM_OVERRIDES), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not (work / "metrics.jsonl").exists() or len(open(work / "metrics.jsonl").readlines()) < 3:
        assert p.poll() is None, p.stderr.read()[-3000:]
        assert time.time() - t0 < 900
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 128 + signal.SIGTERM, err[-3000:]  # 143: "ended by SIGTERM", not "finished"
    last = err.strip().splitlines()[-1]
    summary = json.load(open(work / "summary.json"))
    k = summary["steps_done"]
    assert 3 <= k < 20 and summary["stopped_by"] == "SIGTERM" and summary["eval"] is None
    ck = work / "checkpoints" / str(k)
    assert last == (f"stopped: SIGTERM received; training stopped after optimizer step {k} of 24, checkpoint {ck}; "
                    "run the same command to resume")
    assert "Traceback" not in err
    assert (ck / "commit_success.txt").exists() or os.listdir(work / "checkpoints") == [str(k)]
    assert not (work / workdir_lock.LOCK_NAME).exists()
    assert [r["step"] for r in _metric_rows(work)] == list(range(1, k + 1))

    resumed = subprocess.run(main_command(work, data, SIGTERM_OVERRIDES), env=env, cwd=ROOT, capture_output=True,
                             text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = json.load(open(tmp_path / "full" / "summary.json")), json.load(open(work / "summary.json"))
    assert b["resumed_from_step"] == k and b["steps_done"] == 24 and b["stopped_by"] is None
    np.testing.assert_array_equal(b["losses"], a["losses"])  # bitwise: no step lost or repeated
    assert _metric_rows(work) == _metric_rows(tmp_path / "full")  # each step once, same values


def test_resume_cuts_the_metrics_log_back_to_the_restored_step(tmp_path):
    from walrus_jax.training.reporting import MetricsWriter

    w = MetricsWriter(str(tmp_path), True)
    for s in range(1, 7):
        w.write(s, {"train/loss": float(s)})
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "train/lo')  # the line a killed run left cut off
    w = MetricsWriter(str(tmp_path), True, start_step=4)  # resumed from checkpoint 4
    assert w.tb.purge_step == 5  # TensorBoard drops the earlier events of steps >= 5
    for s in range(5, 7):
        w.write(s, {"train/loss": 10.0 + s})
    w.close()
    rows = _metric_rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["train/loss"] for r in rows] == [1.0, 2.0, 3.0, 4.0, 15.0, 16.0]
    MetricsWriter(str(tmp_path), True, start_step=0).close()  # a fresh run in this workdir starts a new log
    assert _metric_rows(tmp_path) == []


# ------------------------------------------------------------------------------ remote data: clean exit
@pytest.mark.slow
def test_training_and_rollout_from_http_exit_0(tmp_path):
    """HDF5 files read through HTTP are closed before the interpreter shuts down (HDF5 closing them
    from its own exit handler afterwards crashed the process: exit 139 after a complete run)."""
    from conftest import write_test_dataset

    from walrus_jax.data.serve import serving

    data = str(tmp_path / "data")
    write_test_dataset(data, "toy", (32, 32), n_traj=2, n_steps=14)
    env = subprocess_env()
    work = tmp_path / "w"
    overrides = ["train.steps=2", "checkpoint.every=0", "eval.n_trajectories=0", "data.batch_size=2"]
    with serving(data) as srv:
        out = subprocess.run(main_command(work, f"{srv.url}/", overrides), env=env, cwd=ROOT, capture_output=True,
                             text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
        assert json.load(open(work / "summary.json"))["steps_done"] == 2
        ro = subprocess.run([sys.executable, "-m", "walrus_jax.main", "--config",
                             os.path.join(ROOT, "configs", "rollout.py") + ":tiny", "--workdir", str(tmp_path / "ro"),
                             f"--config.checkpoint={work}", f"--config.data={srv.url}/toy", "--config.split=train",
                             "--config.plot=False",
                             "--config.max_rollout_steps=4"], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=900)
        assert ro.returncode == 0, ro.stderr[-3000:]


# ------------------------------------------------------------------------------ adapter deltas
@pytest.fixture(scope="module")
def delta_dir(tmp_path_factory):
    """A small adapter delta (tiny model, rank 2, one new field) as tools.merge_adapters exports it."""
    from walrus_jax.checkpoints import adapters
    from walrus_jax.checkpoints.params import random_params
    from walrus_jax.data.fields import FieldVocabulary
    from walrus_jax.models.config import ModelConfig

    vocab = FieldVocabulary.released().to_dict()
    n = len(vocab)
    vocab["my_tracer"] = n
    cfg = ModelConfig.tiny(n_states=n + 1, lora_rank=2, lora_targets=("time.qkv", "space.fused"))
    params = random_params(cfg, seed=3)
    base_fp = adapters.fingerprint({"w": np.zeros(3)})
    delta = adapters.delta_from_params(params, cfg, n, vocab, base_fp)
    return adapters.write_delta(str(tmp_path_factory.mktemp("delta") / "adapters"), delta)


def _damaged_copy(src, dst, edit) -> str:
    import shutil

    shutil.copytree(src, dst)
    edit(dst)
    return str(dst)


def _edit_json(change):
    def edit(d):
        meta = json.load(open(os.path.join(d, "adapters.json")))
        change(meta)
        json.dump(meta, open(os.path.join(d, "adapters.json"), "w"), indent=1)
    return edit


def _swap_two_rows(meta):
    v = meta["vocab"]
    a, b = sorted(v)[:2]
    v[a], v[b] = v[b], v[a]


def _cut(name, keep):
    def edit(d):
        p = os.path.join(d, name)
        data = open(p, "rb").read()
        open(p, "wb").write(data[:int(len(data) * keep)])
    return edit


def _add_to_one_array(d):
    p = os.path.join(d, "adapters.npz")
    with np.load(p) as z:
        arrays = {k: z[k] for k in z.files}
    k = sorted(arrays)[0]
    arrays[k] = arrays[k] + np.float32(1e-3)
    np.savez(p, **arrays)


@pytest.mark.parametrize("case,edit,file,words", [
    ("alpha", _edit_json(lambda m: m["model_config"].update(lora_alpha=64.0)), "adapters.json", "edited"),
    ("rank", _edit_json(lambda m: m["model_config"].update(lora_rank=3)), "adapters.json", "edited"),
    ("targets", _edit_json(lambda m: m["model_config"].update(lora_targets=["time.qkv"])), "adapters.json", "edited"),
    ("vocab", _edit_json(_swap_two_rows), "adapters.json", "edited"),
    ("no_digest", _edit_json(lambda m: m.pop("digest")), "adapters.json", "no digest"),
    ("array", _add_to_one_array, "adapters.npz", "arrays differ"),
    ("npz_cut", _cut("adapters.npz", 0.6), "adapters.npz", "damaged"),
    ("json_cut", _cut("adapters.json", 0.5), "adapters.json", "not readable as JSON"),
])
def test_edited_or_truncated_delta_is_refused_naming_the_file(delta_dir, tmp_path, capsys, case, edit, file, words):
    from tools import merge_adapters

    from walrus_jax.checkpoints import adapters

    assert adapters.read_delta(delta_dir).cfg.lora_alpha == 16.0  # the untouched delta reads
    bad = _damaged_copy(delta_dir, tmp_path / case, edit)
    with pytest.raises(errors.DataError, match=words) as e:
        adapters.read_delta(bad)
    assert os.path.join(bad, file) in str(e.value)
    rc = merge_adapters.main(["--base", str(tmp_path / "base"), "--adapters", bad, "--export-delta",
                              str(tmp_path / "out")])
    assert rc == 2
    _one_error_line(capsys.readouterr().err, os.path.join(bad, file))


def test_merge_adapters_never_writes_into_its_inputs_and_asks_before_replacing(delta_dir, tmp_path, capsys):
    from tools import merge_adapters

    base = tmp_path / "base"
    base.mkdir()
    (base / "keep.txt").write_text("mine")
    before = _tree(base), _tree(delta_dir)
    for flag, out in [("--output", base), ("--output", os.path.join(delta_dir, "merged")),
                      ("--export-delta", delta_dir), ("--export-delta", base / "sub"), ("--output", tmp_path)]:
        rc = merge_adapters.main(["--base", str(base), "--adapters", delta_dir, flag, str(out), "--overwrite"])
        assert rc == 2
        _one_error_line(capsys.readouterr().err, f"{flag} {out}", "overlaps the input")
    other = tmp_path / "other_delta"
    other.mkdir()
    (other / "adapters.json").write_text("{}")
    rc = merge_adapters.main(["--base", str(base), "--adapters", delta_dir, "--export-delta", str(other)])
    assert rc == 2
    _one_error_line(capsys.readouterr().err, f"--export-delta {other}", "pass --overwrite")
    assert (other / "adapters.json").read_text() == "{}"
    assert (_tree(base), _tree(delta_dir)) == before


def test_write_dataset_overwrite_replaces_only_its_own_output(tmp_path):
    from walrus_jax.data.from_arrays import write_dataset

    u = np.random.default_rng(0).normal(size=(2, 6, 8, 8)).astype(np.float32)
    kw = dict(splits={"train": [0], "valid": [1]}, boundary_conditions={"x": "periodic", "y": "periodic"}, dt=0.1,
              spacing=0.125)
    final = write_dataset(tmp_path, "toy", {"u": u}, **kw)
    write_dataset(tmp_path, "toy", {"u": 2 * u}, overwrite=True, **kw)  # its own output: replaced
    with h5py.File(os.path.join(final, "data", "train", "toy.hdf5")) as f:
        assert f["t0_fields/u"][0, 0, 0, 0] == 2 * u[0, 0, 0, 0]
    (tmp_path / "toy" / "notes.txt").write_text("mine")
    with pytest.raises(errors.UserError, match=r"holds \['notes.txt'\], which write_dataset did not write") as e:
        write_dataset(tmp_path, "toy", {"u": u}, overwrite=True, **kw)
    assert final in str(e.value) and (tmp_path / "toy" / "notes.txt").read_text() == "mine"
    (tmp_path / "other").write_text("a file")
    with pytest.raises(errors.UserError, match="not a dataset folder"):
        write_dataset(tmp_path, "other", {"u": u}, overwrite=True, **kw)
    assert (tmp_path / "other").read_text() == "a file"


@pytest.mark.parametrize("overrides,words", [
    (["lora.rank=-4"], "lora.rank=-4: expected a positive integer"),
    (["lora.rank=0"], "lora.rank=0 with lora.targets=('time.qkv', 'space.fused'): rank 0 means no adapters"),
    (["lora.targets=('time.qkv','space.nope')"], "unknown ['space.nope']"),
    (["lora.alpha=0.0"], "lora.alpha=0.0: expected > 0"),
])
def test_invalid_lora_settings_are_config_errors(tmp_path, overrides, words):
    from walrus_jax.training.config import validate_config

    c = main.load_config(os.path.join(ROOT, "configs", "finetune.py") + ":lora", overrides)
    with pytest.raises(errors.ConfigError) as e:
        validate_config(c)
    assert words in str(e.value)


# ------------------------------------------------------------------------------ eval: config vs checkpoint
def test_eval_with_a_contradicting_model_section_is_one_line(tmp_path, capsys):
    from walrus_jax.checkpoints.load import read_weights
    from walrus_jax.checkpoints.params import random_params
    from walrus_jax.checkpoints.train_state import Checkpointer
    from walrus_jax.data.fields import FieldVocabulary
    from walrus_jax.inference.evaluation import check_model_section
    from walrus_jax.training.config import model_config

    config = main.load_config(TINY)
    vocab = FieldVocabulary.released()
    cfg = model_config(config).replace(n_states=len(vocab) + 1)  # the data grew the vocabulary: not a contradiction
    work = tmp_path / "w"
    ck = Checkpointer(str(work / "checkpoints"), keep=2, async_save=False)
    ck.save(2, {"params": random_params(cfg, seed=0)}, {"model_config": cfg.to_dict(), "vocab": vocab.to_dict(),
                                                        "opt_step": 2})
    ck.close()
    check_model_section(config, read_weights(str(work)))  # the config it was trained with: fine
    rc, err = _cli(["--config", TINY, "--mode", "eval", "--workdir", str(work), "--config.model.hidden_dim=48"],
                   capsys)
    assert rc == 2
    _one_error_line(err, "--mode=eval", f"checkpoint {work / 'checkpoints' / '2'}",
                    f"model.hidden_dim: checkpoint {cfg.hidden_dim} vs config 48", "pass the config it was trained with")
    rc, err = _cli(["--config", os.path.join(ROOT, "configs", "demo.py"), "--mode", "eval", "--workdir", str(work)],
                   capsys)
    assert rc == 2 and "model.hidden_dim: checkpoint" in _one_error_line(err, "contradicts checkpoint")


def test_asyncio_errors_are_held_and_dropped_after_the_command(capsys):
    import logging

    def failed_tasks():
        for _ in range(50):  # how asyncio reports a task whose exception nobody retrieved
            try:
                raise RuntimeError("Event loop is closed")
            except RuntimeError:
                logging.getLogger("asyncio").error("Task exception was never retrieved", exc_info=True)

    assert errors.run_command(failed_tasks) == 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("note: 50 error(s)") and "Event loop is closed" in lines[0], err
    code = ("import logging, sys, threading; from walrus_jax import errors\n"
            "logging.basicConfig()\n"
            "errors.quiet_after_command(False)\n"
            "logging.getLogger('asyncio').error('Task exception was never retrieved', exc_info=RuntimeError('x'))\n"
            "t = threading.Thread(target=lambda: 1 / 0); t.start(); t.join()\n"
            "class C:\n    def __del__(self): raise RuntimeError('Event loop is closed')\n"
            "c = C(); del c\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(), cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0 and out.stderr == "", out.stderr


# ------------------------------------------------------------------------------ unclear cases: one line each
def test_adapter_delta_given_as_a_whole_checkpoint_says_so(delta_dir, tmp_path, capsys):
    from walrus_jax.inference.rollout_job import run_rollout_job
    from walrus_jax.training.config import validate_config

    with pytest.raises(errors.PathError, match="is an adapter delta .*pass it as adapters= together with the base"):
        validate_config(main.load_config(os.path.join(ROOT, "configs", "finetune.py"), [f"init_from={delta_dir}"]))
    data = _toy_data(str(tmp_path / "toy.hdf5"))
    rc = errors.run_command(lambda: run_rollout_job(_rollout_config(delta_dir, data), str(tmp_path / "ro")))
    assert rc == 2
    _one_error_line(capsys.readouterr().err, f"config.checkpoint='{delta_dir}' is an adapter delta")


def test_serve_missing_folder_file_or_busy_port_is_one_line(tmp_path, capsys):
    from walrus_jax.data import serve

    assert serve.main([str(tmp_path / "nope")]) == 2
    _one_error_line(capsys.readouterr().err, str(tmp_path / "nope"), "no such folder")
    (tmp_path / "f").write_text("x")
    assert serve.main([str(tmp_path / "f")]) == 2
    _one_error_line(capsys.readouterr().err, str(tmp_path / "f"), "is a file")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        assert serve.main([str(tmp_path), "--port", str(port)]) == 2
    _one_error_line(capsys.readouterr().err, f"--port {port}", "is in use")


def test_remote_and_file_data_roots_are_one_line(tmp_path, capsys):
    from walrus_jax.data import stats
    from walrus_jax.data.from_arrays import write_dataset
    from walrus_jax.data.resolve import resolve_data
    from walrus_jax.data.serve import serving

    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("<html><body>nothing here</body></html>")
    with serving(str(site)) as srv:
        with pytest.raises(errors.PathError, match="answers with a page that links to no entries"):
            resolve_data(main.load_config(TINY, [f"data.root={srv.url}/"]))
        assert stats.main([f"{srv.url}/flow"]) == 2
        _one_error_line(capsys.readouterr().err, f"{srv.url}/flow: a URL", "local dataset folder")
    with pytest.raises(errors.PathError, match="is a file: expected a folder holding dataset folders"):
        resolve_data(main.load_config(TINY, [f"data.root={site / 'index.html'}"]))
    with pytest.raises(errors.PathError, match="is a file; the root of write_dataset is the folder"):
        write_dataset(site / "index.html", "toy", {"u": np.zeros((1, 4, 8, 8))}, dt=0.1, spacing=0.1,
                      boundary_conditions={"x": "periodic", "y": "periodic"})


def test_text_files_given_as_numpy_files_are_named(tmp_path, capsys):
    from tools import check_train_oracle

    from walrus_jax.data import from_arrays_cli

    txt = tmp_path / "u.npz"
    txt.write_text("this is not numpy\n")
    rc = from_arrays_cli.main(["--file", str(tmp_path / "o.hdf5"), "--name", "t", "--field", f"u={txt}", "--dt", "0.1",
                               "--spacing", "0.1", "--bc", "x=periodic"])
    assert rc == 2
    _one_error_line(capsys.readouterr().err, str(txt), "not a NumPy .npy/.npz file", "(a text file)")
    yml = tmp_path / "oracle.yaml"
    yml.write_text("model:\n  hidden_dim: 32\n")
    assert check_train_oracle.main([str(yml)]) == 2
    _one_error_line(capsys.readouterr().err, str(yml), "not a NumPy .npz file", "training oracle file")


def test_field_shapes_that_misread_the_axes_say_how_they_were_read():
    from walrus_jax.data.from_arrays import write_arrays

    kw = dict(dataset_name="t", boundary_conditions={"x": "periodic", "y": "periodic"}, dt=0.1, spacing=0.1)
    with pytest.raises(errors.DataError, match=r"field 'u' of shape \(6, 8, 8\) \(tensor rank 0\) was read as "
                                               r"\(n_trajectories, n_time, x\).*array\[None\]"):
        write_arrays("/nonexistent/a.hdf5", {"u": np.zeros((6, 8, 8))}, **kw)  # no trajectory axis
    with pytest.raises(errors.DataError, match=r"no entry for axes \['z'\].*last axis holds the 2 components of a "
                                               r"vector, give it as a vector"):
        write_arrays("/nonexistent/a.hdf5", {"v": np.zeros((1, 6, 8, 8, 2))}, **kw)  # a vector as a scalar


def test_a_full_disk_seen_only_in_a_library_thread_is_the_one_line(capsys):
    import threading

    def write_fails_in_a_thread():
        def writer():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/out/.partial/params/d/1234")
        t = threading.Thread(target=writer)
        t.start()
        t.join()
        raise RuntimeError("Event loop is closed")  # what the caller sees afterwards

    assert errors.run_command(write_fails_in_a_thread) == 2
    _one_error_line(capsys.readouterr().err, "the disk is full", "/out/.partial/params/d/1234")


def test_stop_request_sets_a_flag_once_then_signals_act_at_once():
    import signal

    from walrus_jax.training.preemption import StopRequest

    # Python's own Ctrl-C handler, as in a job run from a shell (a test worker may ignore SIGINT)
    runner_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
        with StopRequest() as stop:
            assert not stop.now(0) and stop.exit_status == 0
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: no KeyboardInterrupt, the update finishes
            assert stop.now(1) and stop.signal == signal.SIGINT and stop.exit_status == 130
            with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C interrupts at once
                os.kill(os.getpid(), signal.SIGINT)
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    finally:
        signal.signal(signal.SIGINT, runner_handler)
