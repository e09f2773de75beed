"""Your own data, end to end through `main`: arrays with a field the release never saw -> a Well
dataset with stats.yaml -> fine-tune a converted checkpoint (global normalization, the released
fine-tuning recipe shortened) -> the rollout job on the fine-tuned workdir."""
import json
import os

import numpy as np
from flax import nnx

import walrus_jax as wj
from walrus_jax import main
from walrus_jax.data import FieldVocabulary, write_dataset

import pytest

pytestmark = pytest.mark.slow  # end-to-end: convert, fine-tune, roll out (the full tier)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _advected_tracer(rng, n_traj=4, n_t=8, n=32):
    """A smooth blob advected diagonally on a periodic 32x32 grid, plus a pressure-like field."""
    x = np.linspace(0, 1, n, endpoint=False)
    xx, yy = np.meshgrid(x, x, indexing="ij")
    tracer = np.empty((n_traj, n_t, n, n), np.float32)
    for j in range(n_traj):
        cx, cy = rng.uniform(0, 1, 2)
        for t in range(n_t):
            dx = (xx - cx - 0.03 * t + 0.5) % 1 - 0.5
            dy = (yy - cy - 0.02 * t + 0.5) % 1 - 0.5
            tracer[j, t] = np.exp(-(dx ** 2 + dy ** 2) / 0.02)
    return {"my_tracer": tracer, "pressure": 1.0 + 0.1 * tracer}


def test_convert_finetune_new_field_then_rollout_job(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    ds_dir = write_dataset(root, "my_system", _advected_tracer(rng), splits={"train": [0, 1, 2], "valid": [3]},
                           boundary_conditions={"x": "periodic", "y": "periodic"}, dt=0.1, spacing=1 / 32)
    assert os.path.isfile(os.path.join(ds_dir, "stats.yaml"))
    # a "converted release": a tiny random model in the converted-checkpoint format
    vocab = FieldVocabulary.released()
    assert "my_tracer" not in vocab
    base = wj.Walrus(wj.ModelConfig.tiny(n_states=vocab.n_states), rngs=nnx.Rngs(0))
    ckpt = wj.save_pretrained(base, str(tmp_path / "ckpt"), vocabulary=vocab)

    ft = main.load_config(os.path.join(REPO, "configs", "finetune.py"), [
        f"init_from={ckpt}", f"data.root={root}", "data.batch_size=2", "data.n_steps_input=3",
        "train.steps=3", "train.steps_per_epoch=1", "train.warmup_epochs=-1", "train.cooldown_epochs=-1",
        "train.log_every=1", "checkpoint.every=3", "checkpoint.async_save=False", "eval.n_trajectories=1",
        "eval.rollout_steps=2", "eval.windows=((1,2),)", "eval.plot=False", "eval.batch_size=1"])
    work = tmp_path / "ft"
    summary = main.run(ft, str(work), "train")
    assert summary["steps_done"] == 3 and np.isfinite(summary["losses"]).all()
    ev = summary["eval"]["datasets"]["my_system"]
    assert ev["n_steps"] == 2 and np.isfinite(ev["vrmse_1_2"]["mean"]) and "mae_1_2" in ev
    meta = json.load(open(work / "checkpoints" / "3" / "meta" / "metadata"))
    assert meta["model_config"]["n_states"] == vocab.n_states + 1  # the new field got a row
    assert "my_tracer" in json.dumps(meta["vocab"])

    ro = main.load_config(os.path.join(REPO, "configs", "rollout.py"), [
        f"checkpoint={work}", f"data={ds_dir}", "split=valid", "n_input_steps=3", "max_rollout_steps=3",
        f"normalization_stats={ds_dir}", "plot=False", "animation=", "windows=((1,3),)"])
    main.run(ro, str(tmp_path / "ro"), "rollout")
    text = open(tmp_path / "ro" / "metrics.json").read()
    json.loads(text)  # strict JSON
    assert "my_tracer" in text and "NaN" not in text
