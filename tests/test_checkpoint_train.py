"""Checkpoints: kill -9 between checkpoints then restart == an uninterrupted run; a truncated
latest checkpoint falls back to the previous one; a workdir of another architecture is refused."""
import json
import logging
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = dict(os.environ)
    e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
    e["JAX_PLATFORMS"] = "cpu"
    # The three runs compile the same step: share it through JAX's persistent cache.
    e["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jaxcache"))
    e["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return e


@pytest.fixture(scope="module")
def data(tmp_path_factory, env):
    out = tmp_path_factory.mktemp("mw")
    subprocess.run([sys.executable, "-m", "walrus_jax.data.miniwell", "--out", str(out), "--quick",
                    "--systems", "gray_scott"], check=True, capture_output=True, env=env, cwd=REPO)
    return str(out)


OVERRIDES = ["train.steps=6", "checkpoint.every=2", "checkpoint.keep=5", "eval.n_trajectories=0",
             "data.batch_size=2"]


def _cmd(workdir, data):
    return [sys.executable, "-m", "walrus_jax.main", "--config", os.path.join(REPO, "configs", "tiny.py"),
            "--workdir", str(workdir), f"--config.data.root={data}"] + [f"--config.{o}" for o in OVERRIDES]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data, env):
    root = tmp_path_factory.mktemp("runs")
    full = subprocess.run(_cmd(root / "full", data), env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert full.returncode == 0, full.stderr[-4000:]
    # Interrupted: kill -9 as soon as checkpoint 4 is complete (between checkpoints 4 and 6).
    p = subprocess.Popen(_cmd(root / "killed", data), env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    ck = root / "killed" / "checkpoints" / "4" / "commit_success.txt"
    t0 = time.time()
    while not ck.exists():
        assert p.poll() is None, "the run ended before it could be killed: " + p.stderr.read()[-3000:]
        assert time.time() - t0 < 900
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (root / "killed" / "summary.json").exists()
    resumed = subprocess.run(_cmd(root / "killed", data), env=env, cwd=REPO, capture_output=True, text=True,
                             timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    return root


def _params(workdir):
    from walrus_jax import finetune

    return finetune.load_base(str(workdir)).params


def test_kill_and_resume_equals_uninterrupted(runs):
    full = json.load(open(runs / "full" / "summary.json"))
    killed = json.load(open(runs / "killed" / "summary.json"))
    assert full["resumed_from_step"] is None
    assert killed["resumed_from_step"] in (4,)
    assert full["steps_done"] == killed["steps_done"] == 6
    assert len(killed["losses"]) == 6
    np.testing.assert_array_equal(killed["losses"], full["losses"])
    a, b = _params(runs / "full"), _params(runs / "killed")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def _abstract_state(workdir):
    """The abstract train state of the tiny run (no compute)."""
    from walrus_jax import main, optim, sharding, train

    config = main.load_config(os.path.join(REPO, "configs", "tiny.py"), OVERRIDES)
    mesh = sharding.make_mesh(config.mesh)
    meta_cfg = json.load(open(workdir / "checkpoints" / "6" / "meta" / "metadata"))["model_config"]
    from walrus_jax.models import ModelConfig

    parts = train.abstract_model(ModelConfig.from_dict(meta_cfg), mesh, config.sharding.rules)
    tx = optim.make_optimizer(config.train)
    state_abs, sh = train.state_shardings(parts, tx, mesh)
    return train.with_shardings(state_abs, sh)


def test_truncated_latest_checkpoint_falls_back(runs, tmp_path, caplog):
    import shutil

    from walrus_jax.checkpointing import Checkpointer

    work = tmp_path / "copy"
    shutil.copytree(runs / "full", work)
    ck = Checkpointer(str(work / "checkpoints"), keep=5, async_save=False)
    assert ck.steps() == [2, 4, 6]
    abstract = _abstract_state(work)
    good = ck.restore_latest(abstract)
    assert good[0] == 6
    # Truncate every array data file of checkpoint 6 to half its size.
    files = [os.path.join(d, f) for d, _, fs in os.walk(work / "checkpoints" / "6" / "state") for f in fs
             if "/d/" in os.path.join(d, f)]
    assert files
    for f in files:
        size = os.path.getsize(f)
        with open(f, "r+b") as fh:
            fh.truncate(size // 2)
    with caplog.at_level(logging.WARNING):
        step, state, meta, data_state = Checkpointer(str(work / "checkpoints"), keep=5,
                                                     async_save=False).restore_latest(abstract)
    assert step == 4 and meta["opt_step"] == 4 and int(state["step"]) == 4
    assert any("checkpoint" in r.message and "/6" in r.message and "falling back" in r.message
               for r in caplog.records)
    assert data_state is not None


def test_other_architecture_is_refused_before_compute(runs, data):
    from walrus_jax import checkpointing, main, train

    config = main.load_config(os.path.join(REPO, "configs", "tiny.py"),
                              OVERRIDES + [f"data.root={data}", "model.hidden_dim=64"])
    t = time.time()
    with pytest.raises(checkpointing.CheckpointMismatchError, match=r"hidden_dim: checkpoint 32 vs config 64"):
        train.train(config, str(runs / "full"))
    assert time.time() - t < 60  # nothing was compiled


def test_finetune_from_a_workdir_extends_the_vocabulary(runs):
    """init_from a training workdir: new field rows = mean of the base field rows, APE = 0,
    learnable per-axis RoPE from the base frequencies, so on the old fields the fine-tuning model
    starts out computing exactly what the base model computes."""
    import jax.numpy as jnp
    from flax import nnx

    from walrus_jax import finetune, main, sharding, train
    from walrus_jax.models import Walrus

    config = main.load_config(os.path.join(REPO, "configs", "tiny.py"), OVERRIDES + [
        f"init_from={runs / 'full'}", "finetune.learned_rope=per_axis", "finetune.ape=True",
        "model.ape_grid=(32,32,1)", "finetune.freeze=('embed',)"])
    plan = finetune.prepare(config)
    assert plan.model_cfg.hidden_dim == 32 and plan.model_cfg.learned_rope == "per_axis"
    assert plan.train_config(config.train).lr == pytest.approx(0.5 * config.train.lr)
    vocab = plan.vocab.extend(["my_new_field"])
    cfg = plan.finalize_config(vocab.n_states)
    assert cfg.n_states == plan.base.cfg.n_states + 1 == vocab.index("my_new_field") + 1
    mesh = sharding.make_mesh(config.mesh)
    parts = train.abstract_model(cfg, mesh, config.sharding.rules)
    fresh, rest = train.init_model(parts, 1)
    params = plan.initial_params(parts, fresh)
    base = plan.base.params
    n = plan.base.cfg.n_states
    p1, b1 = np.asarray(params["embed"]["d2"]["proj1"]), np.asarray(base["embed"]["d2"]["proj1"])
    np.testing.assert_array_equal(p1[..., :n, :], b1)
    np.testing.assert_allclose(p1[..., n, :], b1[..., 3:, :].mean(axis=-2), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(params["debed"]["d2"]["proj2_bias"])[n],
                               np.asarray(base["debed"]["d2"]["proj2_bias"])[3:].mean(), rtol=1e-6, atol=1e-7)
    assert not np.asarray(params["ape"]).any()
    mask = plan.trainable_mask(parts.params_abstract)
    assert not any(jax.tree.leaves(mask["embed"])) and all(jax.tree.leaves(mask["processor"]))
    # Same outputs on the old fields (gray_scott's A, B), jitter off.
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(1, 2, 32, 32, 2)), jnp.float32)
    fi = jnp.asarray([vocab.index("A"), vocab.index("B")])
    bcs = ((2, 2), (2, 2))
    new_model = nnx.merge(parts.graphdef, params, rest)
    base_model = Walrus(plan.base.cfg, rngs=nnx.Rngs(0))
    g, _, r = nnx.split(base_model, nnx.Param, ...)
    base_model = nnx.merge(g, jax.tree.map(jnp.asarray, base), r)
    np.testing.assert_allclose(new_model(x, fi, bcs), base_model(x, fi, bcs), rtol=1e-5, atol=1e-5)
    with pytest.raises(KeyError, match="finetune.freeze entry 'encoderz' matches no parameter"):
        finetune.Plan(main.load_config(os.path.join(REPO, "configs", "tiny.py"), [
            f"init_from={runs / 'full'}", "finetune.freeze=('encoderz',)"]), plan.base).trainable_mask(
            parts.params_abstract)
