"""Low-rank adapters: zero adapters compute the base model bitwise, adapter gradients match finite
differences, merged kernels compute the adapted model; end to end through `main` with
configs/finetune.py:lora on a converted checkpoint and data with a new field: frozen parameters
never move, a resumed run repeats the uninterrupted one, the delta reloads (and is refused for
another base), merges into a converted checkpoint, and evaluation / the rollout job run on it."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import walrus_jax as wj
from walrus_jax import main
from walrus_jax.checkpoints import adapters
from walrus_jax.data import FieldVocabulary, write_dataset
from walrus_jax.errors import ConfigError
from walrus_jax.checkpoints.load import read_weights
from walrus_jax.checkpoints.params import flatten, model_from_params, random_params, unflatten

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = wj.ModelConfig.tiny(n_states=8, drop_path=0.0)
LORA = CFG.replace(lora_rank=4, lora_alpha=8.0)
BCS = ((2, 2), (2, 2))
FI = np.array([3, 4, 5], np.int32)


def _flat(tree):
    return flatten(tree)


@pytest.fixture(scope="module")
def base_params():
    return random_params(CFG, seed=0)


def _adapted(base, b_scale: float, seed: int = 1):
    """LORA parameters: the base's, plus adapters A random and B = b_scale · N(0, 1)."""
    flat = _flat(random_params(LORA, seed=seed))
    rng = np.random.default_rng(seed)
    for k in flat:
        if k.endswith("/lora/b"):
            flat[k] = (b_scale * rng.standard_normal(flat[k].shape)).astype(np.float32)
    flat.update(_flat(base))
    return unflatten(flat)


def _split(cfg):
    """(graphdef, non-parameter variables as a pure dict) of a model of `cfg`."""
    graphdef, _, rest = nnx.split(model_from_params(cfg, random_params(cfg)), nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(rest)


@pytest.fixture(scope="module")
def forward():
    """forward(cfg, params, x) -> y: eval mode, no jitter, one compile per config."""
    cache = {}

    def run(cfg, params, x):
        if cfg not in cache:
            graphdef, rest = _split(cfg)
            cache[cfg] = (jax.jit(lambda p, x: nnx.merge(graphdef, p, rest)(x, FI, BCS, None)), set(_flat(rest)))
        f, buffers = cache[cfg]
        return np.asarray(f(unflatten({k: v for k, v in _flat(params).items() if k not in buffers}), x))

    return run


@pytest.fixture(scope="module")
def x():
    return np.asarray(jax.random.normal(jax.random.key(3), (1, 3, 32, 32, 3)))


def test_zero_adapters_compute_the_base_model_bitwise(base_params, forward, x):
    y_base = forward(CFG, base_params, x)
    y_lora = forward(LORA, _adapted(base_params, 0.0), x)
    assert np.array_equal(y_base, y_lora)
    assert np.abs(y_base).max() > 0.1


def test_merged_kernels_compute_the_adapted_model(base_params, forward, x):
    params = _adapted(base_params, 0.05)
    y = forward(LORA, params, x)
    merged, cfg = adapters.merged_params(params, LORA)
    assert cfg == CFG and not any(adapters.is_adapter_path(k) for k in _flat(merged))
    y_merged = forward(CFG, merged, x)
    assert np.abs(y - forward(CFG, base_params, x)).max() > 1e-3  # the adapters do something
    np.testing.assert_allclose(y_merged, y, atol=1e-5, rtol=1e-5)


def test_adapter_gradients_match_central_differences(base_params, x):
    params = _adapted(base_params, 0.05)
    flat = _flat(params)
    lora_keys = sorted(k for k in flat if adapters.is_adapter_path(k))
    graphdef, rest = _split(LORA)
    frozen = {k: v for k, v in flat.items() if k not in lora_keys and k not in _flat(rest)}
    r = np.asarray(jax.random.normal(jax.random.key(4), (1, 3, 32, 32, 3)))

    @jax.jit
    def loss(lp):
        p = unflatten({**frozen, **lp})
        return jnp.mean(nnx.merge(graphdef, p, rest)(x, FI, BCS, None) * r)

    lp = {k: jnp.asarray(flat[k]) for k in lora_keys}
    g = jax.jit(jax.grad(loss))(lp)
    rng = np.random.default_rng(5)
    d = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in lp.items()}
    norm = np.sqrt(sum(np.sum(v ** 2) for v in d.values()))
    d = {k: v / norm for k, v in d.items()}
    eps = 1e-2
    fd = (float(loss({k: lp[k] + eps * d[k] for k in lp})) - float(loss({k: lp[k] - eps * d[k] for k in lp}))) \
        / (2 * eps)
    an = float(sum(np.sum(np.asarray(g[k]) * d[k]) for k in lp))
    assert abs(an) > 1e-6
    assert abs(fd - an) <= 1e-3 * abs(an), (fd, an)  # measured ~3e-4 (float32)
    # every adapter matrix gets a gradient (B != 0, so A's is not zero either)
    assert all(np.abs(np.asarray(g[k])).max() > 0 for k in lora_keys)




# ------------------------------------------------------------------------------ end to end
def _tracer_data(root):
    """A blob advected on a periodic 32x32 grid: a field the release does not know, plus pressure."""
    rng = np.random.default_rng(0)
    g = np.linspace(0, 1, 32, endpoint=False)
    xx, yy = np.meshgrid(g, g, indexing="ij")
    tracer = np.empty((3, 8, 32, 32), np.float32)
    for j in range(3):
        cx, cy = rng.uniform(0, 1, 2)
        for t in range(8):
            tracer[j, t] = np.exp(-(((xx - cx - 0.03 * t + 0.5) % 1 - 0.5) ** 2 + ((yy - cy + 0.5) % 1 - 0.5) ** 2)
                                  / 0.02)
    return write_dataset(root, "blob", {"my_tracer": tracer, "pressure": 1.0 + 0.1 * tracer},
                         splits={"train": [0, 1], "valid": [2]}, boundary_conditions={"x": "periodic", "y": "periodic"},
                         dt=0.1, spacing=1 / 32)


def _ft_config(ckpt, root, eval_trajectories=1):
    return main.load_config(os.path.join(REPO, "configs", "finetune.py:lora"), [
        f"init_from={ckpt}", f"data.root={root}", "data.batch_size=2", "data.n_steps_input=3", "lora.rank=4",
        "lora.dropout=0.1", "train.steps=4", "train.steps_per_epoch=1", "train.warmup_epochs=-1",
        "train.cooldown_epochs=-1", "train.log_every=1", "checkpoint.every=2", "checkpoint.keep=5",
        "checkpoint.async_save=False", f"eval.n_trajectories={eval_trajectories}", "eval.rollout_steps=2",
        "eval.windows=((1,2),)", "eval.plot=False", "eval.batch_size=1"])


@pytest.fixture(scope="session")  # built once: its tests share one worker (xdist_group)
def run(tmp_path_factory):
    """A converted tiny "release", LoRA fine-tuned for 4 steps on data with a new field; and the same
    run resumed from its step-2 checkpoint in another workdir."""
    tmp = tmp_path_factory.mktemp("lora_e2e")
    ds = _tracer_data(tmp / "data")
    vocab = FieldVocabulary.released()
    assert "my_tracer" not in vocab
    cfg = wj.ModelConfig.tiny(n_states=vocab.n_states)
    ckpt = wj.save_pretrained(model_from_params(cfg, random_params(cfg, seed=0)), str(tmp / "ckpt"), vocabulary=vocab)
    work = tmp / "ft"
    summary = main.run(_ft_config(ckpt, tmp / "data"), str(work), "train")
    resumed = tmp / "resumed"
    shutil.copytree(work / "checkpoints" / "2", resumed / "checkpoints" / "2")
    summary_resumed = main.run(_ft_config(ckpt, tmp / "data", eval_trajectories=0), str(resumed), "train")
    return {"tmp": tmp, "ckpt": ckpt, "work": work, "ds": ds, "summary": summary, "resumed": summary_resumed,
            "vocab": vocab}


@pytest.mark.slow
@pytest.mark.xdist_group("lora_run")
def test_lora_finetune_trains_only_adapters_and_new_rows(run):
    s = run["summary"]
    assert s["steps_done"] == 4 and np.isfinite(s["losses"]).all()
    assert np.isfinite(s["eval"]["datasets"]["blob"]["vrmse_1_2"]["mean"])  # in-training evaluation
    from walrus_jax.training import finetune

    trained = read_weights(str(run["work"]))
    base = read_weights(run["ckpt"])
    assert trained.cfg.lora_rank == 4 and trained.cfg.n_states == base.cfg.n_states + 1
    # Rebuilding from base + delta gives the trained parameters bitwise: nothing outside the delta moved.
    delta = adapters.read_delta(str(run["work"] / "adapters"))
    rebuilt = _flat(adapters.apply_delta(base.params, delta))
    got = _flat(trained.params)
    assert set(rebuilt) == set(got)
    for k in got:
        assert np.array_equal(rebuilt[k], np.asarray(got[k])), k
    # ... and what is in it did train: the adapters' B left zero, the new encoder rows moved.
    assert all(np.abs(v).max() > 0 for k, v in delta.arrays.items() if k.endswith("/lora/b"))
    plan = finetune.Plan(_ft_config(run["ckpt"], run["tmp"] / "data"), base)
    plan.finalize_config(base.cfg.n_states + 1)
    n, total = adapters.count_trainable(got, plan.trainable_mask(got))
    assert 0 < n < 0.2 * total
    size = os.path.getsize(run["work"] / "adapters" / adapters.ARRAYS_FILE)
    assert size < 0.1 * sum(np.asarray(v).nbytes for v in got.values())


@pytest.mark.slow
@pytest.mark.xdist_group("lora_run")
def test_resume_repeats_the_uninterrupted_run(run):
    full, resumed = run["summary"], run["resumed"]
    assert resumed["resumed_from_step"] == 2
    np.testing.assert_array_equal(resumed["losses"], full["losses"])

    a = _flat(read_weights(str(run["work"])).params)
    b = _flat(read_weights(str(run["tmp"] / "resumed")).params)
    for k in a:
        assert np.array_equal(np.asarray(a[k]), np.asarray(b[k])), k


@pytest.mark.slow
@pytest.mark.xdist_group("lora_run")
def test_delta_reloads_merges_and_refuses_another_base(run, tmp_path):
    from tools import merge_adapters

    x = np.asarray(jax.random.normal(jax.random.key(0), (1, 3, 32, 32, 2)))
    fi = np.array([run["vocab"].n_states, 3], np.int32)  # the new field's row, and pressure's
    fwd = nnx.jit(lambda m, x: m(x, fi, BCS, None))
    ys = []
    for m in (wj.load_pretrained(run["ckpt"], adapters=str(run["work"])),
              wj.load_pretrained(run["ckpt"], adapters=str(run["work"] / "adapters"))):
        assert "my_tracer" in m.vocab.to_dict()
        ys.append(np.asarray(fwd(m, x)))
    np.testing.assert_array_equal(ys[0], ys[1])
    assert merge_adapters.main(["--base", run["ckpt"], "--adapters", str(run["work"]), "--output",
                                str(tmp_path / "merged")]) == 0
    merged = wj.load_pretrained(str(tmp_path / "merged"))
    assert merged.cfg.lora_rank == 0 and "my_tracer" in json.dumps(merged.vocab.to_dict())
    np.testing.assert_allclose(np.asarray(fwd(merged, x)), ys[0], atol=1e-5, rtol=1e-5)
    # another base: refused in one line
    other = wj.save_pretrained(model_from_params(merged.cfg.replace(n_states=run["vocab"].n_states),
                                                 random_params(merged.cfg.replace(n_states=run["vocab"].n_states), 9)),
                               str(tmp_path / "other"), vocabulary=run["vocab"])
    with pytest.raises(ConfigError, match="trained on another base checkpoint"):
        wj.load_pretrained(other, adapters=str(run["work"] / "adapters"))
    assert merge_adapters.main(["--base", other, "--adapters", str(run["work"]), "--output",
                                str(tmp_path / "m2")]) == 2


@pytest.mark.slow
@pytest.mark.xdist_group("lora_run")
def test_eval_mode_and_rollout_job_on_the_lora_workdir(run):
    ev = main.run(_ft_config(run["ckpt"], run["tmp"] / "data"), str(run["work"]), "eval")
    assert np.isfinite(ev["datasets"]["blob"]["vrmse_1_2"]["mean"])
    ro = main.load_config(os.path.join(REPO, "configs", "rollout.py"), [
        f"checkpoint={run['ckpt']}", f"adapters={run['work'] / 'adapters'}", f"data={run['ds']}", "split=valid", "n_input_steps=3", "max_rollout_steps=2",
        f"normalization_stats={run['ds']}", "plot=False", "animation=", "windows=((1,2),)"])
    main.run(ro, str(run["tmp"] / "ro"), "rollout")
    text = open(run["tmp"] / "ro" / "metrics.json").read()
    assert "my_tracer" in text and "NaN" not in text
