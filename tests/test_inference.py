"""The rollout job (configs/rollout.py, walrus_jax.inference.rollout_job) end to end on a small
Well file and a tiny checkpoint written like a training run's."""
import json
import os

import h5py
import jax
import numpy as np
import pytest
from flax import nnx

from walrus_jax.checkpoints.params import cast_model, random_model
from walrus_jax import normalization
from walrus_jax.inference import metrics, rollout_job, rollouts
from walrus_jax.data.fields import FieldVocabulary
from walrus_jax.data.writer import WellField, axis_boundaries, write_well_file
from walrus_jax.models.config import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 32
T_TOTAL = 8


def write_data(path, field_name="pressure", n_traj=2, n_steps=T_TOTAL, seed=0):
    """A 2D Well file: x periodic, y [WALL, OPEN]; a scalar, a vector and a constant 'mask' field."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 2 * np.pi, N, endpoint=False)
    t = np.arange(n_steps, dtype=np.float32) * 0.1
    phase = rng.uniform(0, 2 * np.pi, size=(n_traj, 1, 1, 1))
    base = np.sin(x[None, None, :, None] + phase + t[None, :, None, None]) * np.cos(x[None, None, None, :])
    p = (base + 0.1 * rng.normal(size=base.shape)).astype(np.float32)  # (B, T, N, N)
    vel = np.stack([np.cos(base), -base], axis=-1).astype(np.float32)  # (B, T, N, N, 2)
    mask = np.zeros((n_traj, N, N), np.float32)
    mask[:, :3, :3] = 1.0
    bounds = {**axis_boundaries("x", N, "PERIODIC", "PERIODIC"), **axis_boundaries("y", N, "WALL", "OPEN")}
    write_well_file(path, dataset_name="toy_flow", n_trajectories=n_traj, time=t,
                    coords={"x": x.astype(np.float32), "y": x.astype(np.float32)},
                    t0_fields={field_name: WellField(p), "mask": WellField(mask, time_varying=False)},
                    t1_fields={"velocity": WellField(vel)}, boundaries=bounds)
    return path


def save_checkpoint(workdir, model, vocab):
    from walrus_jax.checkpoints.train_state import Checkpointer

    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    ck = Checkpointer(os.path.join(workdir, "checkpoints"), keep=1, async_save=False)
    ck.save(1, {"params": params}, {"model_config": model.cfg.to_dict(), "vocab": vocab.to_dict()})
    ck.close()
    return workdir


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    from walrus_jax.main import load_config, run

    tmp = tmp_path_factory.mktemp("rollout_job")
    data = write_data(str(tmp / "data" / "toy.hdf5"))
    vocab = FieldVocabulary.released()
    model = random_model(ModelConfig.tiny(n_states=len(vocab)), seed=1, scale=0.5)
    ckpt = save_checkpoint(str(tmp / "train_run"), model, vocab)
    config = load_config(os.path.join(ROOT, "configs", "rollout.py") + ":tiny",
                         [f"checkpoint={ckpt}", f"data={data}"])
    assert config.mode == "rollout"
    out = str(tmp / "out")
    report = run(config, out, mode="rollout")
    return dict(tmp=tmp, data=data, model=model, vocab=vocab, ckpt=ckpt, config=config, out=out, report=report)


def test_outputs_written(job):
    out, rep = job["out"], job["report"]
    with open(os.path.join(out, "metrics.json")) as f:
        saved = json.load(f)
    assert saved["n_steps"] == 3 and saved["trajectories"] == [0, 1] and saved["n_input_steps"] == 4
    assert saved["field_names"] == ["pressure", "velocity_x", "velocity_y"]
    for name in ("panels", "vrmse", "animation"):
        path = rep["plots"][name]
        assert os.path.getsize(path) > 1000, path
    with open(rep["plots"]["animation"], "rb") as f:
        assert f.read(4) == b"GIF8"
    assert set(saved["metrics"]["vrmse"]["windows"]) == {"1"}  # 1-20 / 21-60 do not fit in 3 steps
    assert len(saved["metrics"]["spectral_nmse_bin0"]["per_step_mean"]) == 3


def test_predictions_are_the_rollout_and_metrics_match(job):
    from walrus_jax.data.well import WellDataset

    out, model, vocab = job["out"], job["model"], job["vocab"]
    src = WellDataset(job["data"], vocab=vocab)
    pred_ds = WellDataset(os.path.join(out, "predictions", "toy_flow"), vocab=vocab)
    assert pred_ds.n_trajectories == 2
    with h5py.File(os.path.join(out, "predictions", "toy_flow", "traj_1.hdf5")) as f:
        assert int(f.attrs["walrus_n_input_steps"]) == 4 and int(f.attrs["walrus_source_trajectory"]) == 1
    truth_traj = [src.trajectory(j) for j in range(2)]
    pred_traj = [pred_ds.trajectory(j) for j in range(2)]  # files sorted: traj_0, traj_1
    fields = np.stack([t["fields"] for t in truth_traj])
    consts = np.stack([t["constant_fields"] for t in truth_traj])
    written = np.stack([t["fields"] for t in pred_traj])
    assert written.shape == (2, 7, N, N, 3)
    np.testing.assert_array_equal(written[:, :4], fields[:, :4])  # the history is the source's
    np.testing.assert_array_equal(pred_traj[0]["constant_fields"], truth_traj[0]["constant_fields"])
    np.testing.assert_array_equal(pred_traj[0]["boundary_conditions"], truth_traj[0]["boundary_conditions"])
    # The predictions equal a direct rollout of the same weights.
    mask = normalization.mask_from_constants(consts, ["mask"])
    direct = np.asarray(rollouts.rollout(model, fields[:, :4], field_indices=truth_traj[0]["field_indices"],
                                  bcs=truth_traj[0]["boundary_conditions"], n_steps=3, constant_fields=consts,
                                  mask=mask))
    np.testing.assert_allclose(written[:, 4:], direct, rtol=1e-5, atol=1e-5)
    assert (written[:, 4:, :3, :3] == 0).all()  # masked points
    # metrics.json = the metric of what was written, against the (masked) truth.
    truth = np.where(mask[:, None, ..., None], 0.0, fields[:, 4:7])
    vr = np.asarray(metrics.vrmse(written[:, 4:], truth))  # (B, 3, C)
    rep = job["report"]["metrics"]["vrmse"]
    np.testing.assert_allclose(rep["per_step"]["pressure"], vr[..., 0].mean(0), rtol=1e-4)
    np.testing.assert_allclose(rep["windows"]["1"]["mean"], vr[:, 0].mean(), rtol=1e-4)
    pers = np.asarray(metrics.vrmse(np.repeat(fields[:, 3:4], 3, 1), truth))
    np.testing.assert_allclose(job["report"]["persistence"]["vrmse"]["per_step_mean"], pers.mean((0, 2)), rtol=1e-4)


@pytest.mark.slow
def test_ensemble_job_writes_the_mean_and_its_calibration(job):
    """--config.ensemble.members=4: predictions are the members' mean; metrics.json holds CRPS,
    spread-skill and rank histograms computed from the members (recomputed here from a direct
    ensemble rollout with the job's keys)."""
    from walrus_jax.data.well import WellDataset
    from walrus_jax.main import load_config, run

    config = load_config(os.path.join(ROOT, "configs", "rollout.py") + ":tiny",
                         [f"checkpoint={job['ckpt']}", f"data={job['data']}", "ensemble.members=4",
                          "ensemble.perturbation=0.05", "plot=False"])
    out = str(job["tmp"] / "out_ensemble")
    report = run(config, out, mode="rollout")
    src = WellDataset(job["data"], vocab=job["vocab"])
    traj = [src.trajectory(j) for j in range(2)]
    fields, consts = np.stack([t["fields"] for t in traj]), np.stack([t["constant_fields"] for t in traj])
    mask = normalization.mask_from_constants(consts, ["mask"])
    keys = jax.random.split(jax.random.fold_in(jax.random.key(0), 0), 4)
    members = np.asarray(rollouts.rollout_ensemble(
        job["model"], fields[:, :4], keys, field_indices=traj[0]["field_indices"],
        bcs=traj[0]["boundary_conditions"], n_steps=3, constant_fields=consts, mask=mask, perturbation=0.05))
    with h5py.File(os.path.join(out, "predictions", "toy_flow", "traj_0.hdf5")) as f:
        assert int(f.attrs["walrus_n_input_steps"]) == 4
    pred_ds = WellDataset(os.path.join(out, "predictions", "toy_flow"), vocab=job["vocab"])
    written = np.stack([pred_ds.trajectory(j)["fields"] for j in range(2)])[:, 4:]
    np.testing.assert_allclose(written, members.mean(0), rtol=1e-5, atol=1e-5)
    truth = np.where(mask[:, None, ..., None], 0.0, fields[:, 4:7])
    ens = report["ensemble"]
    assert report["prediction"] == "ensemble mean" and ens["members"] == 4
    crps = np.asarray(metrics.crps(members, truth))
    np.testing.assert_allclose(ens["metrics"]["crps"]["per_step"]["pressure"], crps[..., 0].mean(0), rtol=1e-4)
    ratio = np.asarray(metrics.spread_skill(members, truth))
    np.testing.assert_allclose(ens["metrics"]["spread_skill"]["windows"]["1"]["mean"], ratio[:, 0].mean(), rtol=1e-4)
    hist = ens["rank_histogram"]["1"]["velocity_x"]
    assert len(hist) == 5 and abs(sum(hist) - 1) < 1e-6
    with open(os.path.join(out, "metrics.json")) as f:
        assert json.load(f)["ensemble"]["members"] == 4


@pytest.mark.parametrize("override, message", [
    ("ensemble.members=1", "an ensemble needs at least 2"),
    ("ensemble.jitter=False", "need perturbation > 0"),
])
def test_bad_ensemble_settings_are_config_errors(job, override, message):
    from walrus_jax.errors import ConfigError
    from walrus_jax.main import load_config, run

    extra = [override] + (["ensemble.members=3"] if "jitter" in override else [])
    config = load_config(os.path.join(ROOT, "configs", "rollout.py") + ":tiny",
                         [f"checkpoint={job['ckpt']}", f"data={job['data']}", *extra])
    with pytest.raises(ConfigError, match=message):
        run(config, str(job["tmp"] / "out_bad_ensemble"), mode="rollout")


def test_vocabulary_mismatch_is_a_clear_error(job):
    from walrus_jax.main import load_config, run

    bad = write_data(str(job["tmp"] / "bad" / "bad.hdf5"), field_name="my_new_field")
    config = load_config(os.path.join(ROOT, "configs", "rollout.py") + ":tiny",
                         [f"checkpoint={job['ckpt']}", f"data={bad}"])
    with pytest.raises(ValueError, match=r"different field vocabularies.*my_new_field"):
        run(config, str(job["tmp"] / "out_bad"), mode="rollout")


def test_history_longer_than_trajectory_is_a_clear_error(job):
    from walrus_jax.main import load_config, run

    config = load_config(os.path.join(ROOT, "configs", "rollout.py") + ":tiny",
                         [f"checkpoint={job['ckpt']}", f"data={job['data']}", "n_input_steps=8"])
    with pytest.raises(ValueError, match=r"trajectories have 8 frames.*n_input_steps=8 needs at least 9"):
        run(config, str(job["tmp"] / "out_short"), mode="rollout")


def test_missing_keys_are_clear_errors(tmp_path):
    from walrus_jax.main import load_config

    config = load_config(os.path.join(ROOT, "configs", "rollout.py"), [])
    with pytest.raises(ValueError, match="config.checkpoint is required"):
        rollout_job.run_rollout_job(config, str(tmp_path))


def test_random_params_and_cast():
    cfg = ModelConfig.tiny(n_states=10)
    m = random_model(cfg, seed=0)
    assert float(m.encoder_dummy[...][0]) == 1.0
    m16 = cast_model(m, "bfloat16")
    leaves = jax.tree.leaves(nnx.state(m16, nnx.Param))
    assert {str(v.dtype) for v in leaves} == {"bfloat16"}
    a = np.asarray(nnx.state(m, nnx.Param)["processor"]["blocks"]["space"]["fused"]["kernel"][...])
    b = np.asarray(nnx.state(m16, nnx.Param)["processor"]["blocks"]["space"]["fused"]["kernel"][...], np.float32)
    np.testing.assert_allclose(b, a, rtol=2 ** -8)
