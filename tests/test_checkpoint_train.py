"""Checkpoints: kill -9 between checkpoints then restart == an uninterrupted run; a truncated
latest checkpoint falls back to the previous one; a workdir of another architecture is refused."""
import json
import logging
import os
import signal
import subprocess
import time

import chex
import jax
import numpy as np
import pytest
from conftest import main_command, subprocess_env

# Training runs in subprocesses: the full tier. One test worker runs the module and its fixtures live
# for the worker's session (a module fixture is rebuilt when the worker comes back to the module), so
# the runs that every test reads are made once.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("checkpoint_train")]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    # The three runs compile the same step: share it through JAX's persistent cache.
    return subprocess_env(cache=tmp_path_factory.mktemp("jaxcache"))


@pytest.fixture(scope="session")
def data(gray_scott):
    return gray_scott


# Two-step rollout training (train.rollout_steps=2): the resumed run must also restore what the
# rollout loss reads (windows with two output frames, a key per step).
OVERRIDES = ["train.steps=6", "checkpoint.every=2", "checkpoint.keep=5", "eval.n_trajectories=0",
             "data.batch_size=2", "train.rollout_steps=2", "train.rollout_stop_gradient=False"]


def _cmd(workdir, data):
    return main_command(workdir, data, OVERRIDES)


@pytest.fixture(scope="session")
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
    from walrus_jax.checkpoints.load import read_weights

    return read_weights(str(workdir)).params


def test_kill_and_resume_equals_uninterrupted(runs):
    full = json.load(open(runs / "full" / "summary.json"))
    killed = json.load(open(runs / "killed" / "summary.json"))
    assert full["resumed_from_step"] is None
    assert killed["resumed_from_step"] in (4,)
    assert full["steps_done"] == killed["steps_done"] == 6
    assert len(killed["losses"]) == 6
    np.testing.assert_array_equal(killed["losses"], full["losses"])
    chex.assert_trees_all_equal(_params(runs / "full"), _params(runs / "killed"))


def _abstract_state(workdir):
    """The abstract train state of the tiny run (no compute)."""
    from walrus_jax import main, sharding
    from walrus_jax.training import optim, setup

    config = main.load_config(os.path.join(REPO, "configs", "tiny.py"), OVERRIDES)
    mesh = sharding.make_mesh(config.mesh)
    meta_cfg = json.load(open(workdir / "checkpoints" / "6" / "meta" / "metadata"))["model_config"]
    from walrus_jax.models import ModelConfig

    parts = setup.model_parts(ModelConfig.from_dict(meta_cfg), mesh, config.sharding.rules)
    tx = optim.build(optim.optimizer_config(config.train), optim.make_schedule(config.train))
    state_abs, sh = setup.state_shardings(parts, tx, None, mesh)
    return setup.with_shardings(state_abs, sh)


def test_truncated_latest_checkpoint_falls_back(runs, tmp_path, caplog):
    import shutil

    from walrus_jax.checkpoints.train_state import Checkpointer

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
    from walrus_jax import main
    from walrus_jax.checkpoints import train_state
    from walrus_jax.training.loop import train

    config = main.load_config(os.path.join(REPO, "configs", "tiny.py"),
                              OVERRIDES + [f"data.root={data}", "model.hidden_dim=64"])
    t = time.time()
    with pytest.raises(train_state.CheckpointMismatchError, match=r"hidden_dim: checkpoint 32 vs config 64"):
        train(config, str(runs / "full"))
    assert time.time() - t < 60  # nothing was compiled


def test_finetune_from_a_workdir_extends_the_vocabulary(runs):
    """init_from a training workdir, as the original fine-tunes: the new field's rows keep the fresh
    model's initialization, every copied encoder input column is scaled by sqrt(n_old / n_new), the
    decoder's copied rows are unchanged, the APE starts at 5e-3 N(0, 1), learnable per-axis RoPE
    starts from the base frequencies, and frozen parts get no updates."""
    from walrus_jax import main, sharding
    from walrus_jax.training import finetune, setup

    config = main.load_config(os.path.join(REPO, "configs", "tiny.py"), OVERRIDES + [
        f"init_from={runs / 'full'}", "finetune.learned_rope=per_axis", "finetune.ape=True",
        "model.ape_grid=(32,32,1)", "finetune.freeze=('embed',)"])
    plan = finetune.prepare(config)
    assert plan.model_cfg.hidden_dim == 32 and plan.model_cfg.learned_rope == "per_axis"
    vocab = plan.vocab.extend(["my_new_field"])
    cfg = plan.finalize_config(vocab.n_states)
    n = plan.base.cfg.n_states
    assert cfg.n_states == n + 1 == vocab.index("my_new_field") + 1
    mesh = sharding.make_mesh(config.mesh)
    parts = setup.model_parts(cfg, mesh, config.sharding.rules)
    fresh, rest = setup.init_params(parts, 1)
    fresh = jax.tree.map(np.asarray, fresh)
    params = plan.initial_params(parts, fresh, seed=0)
    base = plan.base.params
    p1, b1 = np.asarray(params["embed"]["d2"]["proj1"]), np.asarray(base["embed"]["d2"]["proj1"])
    np.testing.assert_allclose(p1[..., :n, :], b1 * np.sqrt(n / (n + 1)), rtol=1e-6)
    np.testing.assert_array_equal(p1[..., n, :], fresh["embed"]["d2"]["proj1"][..., n, :])
    np.testing.assert_array_equal(np.asarray(params["debed"]["d2"]["proj2_bias"])[:n],
                                  np.asarray(base["debed"]["d2"]["proj2_bias"]))
    ape = np.asarray(params["ape"])
    assert ape.shape == (32, 32, 1, 32) and 4e-3 < ape.std() < 6e-3 and abs(ape.mean()) < 5e-4
    rope = np.asarray(params["processor"]["blocks"]["space"]["rope_freqs"])  # (layers, 3 axes, n_f)
    np.testing.assert_array_equal(rope, fresh["processor"]["blocks"]["space"]["rope_freqs"])
    assert (rope[:, 0] == rope[:, 1]).all() and (rope[:, 1] == rope[:, 2]).all()
    mask = plan.trainable_mask(parts.params_abstract)
    assert not any(jax.tree.leaves(mask["embed"])) and all(jax.tree.leaves(mask["processor"]))
    with pytest.raises(ValueError, match="finetune.freeze entry 'encoderz' matches no parameter"):
        finetune.Plan(main.load_config(os.path.join(REPO, "configs", "tiny.py"), [
            f"init_from={runs / 'full'}", "finetune.freeze=('encoderz',)"]), plan.base).trainable_mask(
            parts.params_abstract)
