"""HSDP: a (2, 4) mesh on 8 simulated CPU devices trains exactly like one device, with the
shardings the rules table says; two processes (jax.distributed, CPU collectives) match one.

Each scenario runs in a subprocess because the device count is fixed when JAX starts."""
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import main_command, subprocess_env

pytestmark = pytest.mark.slow  # training runs in subprocesses: the full tier

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(n_devices: int) -> dict:
    return subprocess_env(n_devices)


MESH_SCRIPT = textwrap.dedent(r"""
    import json, os, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    from ml_collections import config_dict
    from walrus_jax import sharding
    from walrus_jax.training import optim, setup, steps
    from walrus_jax.training.batches import load_batch
    from walrus_jax.models import ModelConfig

    rules = ()  # sharding.DEFAULT_RULES as they are: embed over fsdp, everything else replicated
    cfg = ModelConfig.tiny(drop_path=0.1)  # hidden 32: divisible by fsdp = 4
    sched = optim.Schedule(base_lr=1e-3, max_epochs=10, warmup_epochs=0, cooldown_epochs=0)
    tx = optim.build(optim.OptimizerConfig(eps=1e-4), sched)
    rng = np.random.default_rng(0)
    batches = [{"input_fields": rng.normal(size=(8, 2, 32, 32, 2)).astype(np.float32),
                "output_fields": rng.normal(size=(8, 1, 32, 32, 2)).astype(np.float32),
                "constant_fields": np.zeros((8, 32, 32, 0), np.float32), "field_indices": np.array([4, 5]),
                "padded_field_mask": np.array([True, True]), "boundary_conditions": np.array([[2, 2], [2, 2]])}
               for _ in range(3)]

    def run(mesh_cfg, devices):
        mesh = sharding.make_mesh(mesh_cfg, devices)
        parts = setup.model_parts(cfg, mesh, rules)
        params, rest = setup.init_params(parts, 0)
        _, state_sh = setup.state_shardings(parts, tx, None, mesh)
        state = jax.jit(lambda p: steps.init_state(p, tx, jax.random.key(0)), out_shardings=state_sh)(params)
        fn = steps.build_train_step(parts.graphdef, tx, sched, steps.StepOptions(), state_sh, parts.rest_shardings)
        losses = []
        for b in batches:
            gb, bcs = load_batch(mesh, b)
            state, m = fn(state, gb, rest, bcs)
            losses.append(float(m["loss"]))
        return mesh, parts, state, losses, gb

    _, _, s1, l1, _ = run(config_dict.ConfigDict(dict(data=1, fsdp=1)), jax.devices()[:1])
    mesh, parts, s8, l8, gb = run(config_dict.ConfigDict(dict(data=2, fsdp=4)), jax.devices())
    p1 = jax.tree_util.tree_flatten_with_path(s1["params"])[0]
    p8 = jax.tree.leaves(s8["params"])
    diffs = {"/".join(str(k.key) for k in path): float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for (path, a), b in zip(p1, p8)}
    specs = {"/".join(str(k.key) for k in path): [list(x) if isinstance(x, tuple) else x for x in a.sharding.spec]
             for path, a in jax.tree_util.tree_flatten_with_path(s8["params"])[0]}
    mu = optim._find(s8["opt_state"], optim.TorchAdamWState).mu  # nested like the params
    mu_same = jax.tree.structure(mu) == jax.tree.structure(s8["params"]) and all(
        a.sharding == b.sharding for a, b in zip(jax.tree.leaves(mu), p8))
    print(json.dumps({"l1": l1, "l8": l8, "diffs": diffs, "specs": specs, "mu_same": mu_same,
                      "batch_spec": [list(x) if isinstance(x, tuple) else x for x in gb["input_fields"].sharding.spec],
                      "mesh": dict(mesh.shape), "param_max": float(max(np.abs(np.asarray(a)).max() for a in p8))}))
""")


@pytest.fixture(scope="session")  # built once: its tests share one worker (xdist_group)
def mesh_result(tmp_path_factory):
    script = tmp_path_factory.mktemp("mesh") / "mesh.py"
    script.write_text(MESH_SCRIPT)
    out = subprocess.run([sys.executable, str(script), REPO], env=_env(8), capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.xdist_group("mesh_result")
def test_mesh_2x4_matches_one_device(mesh_result):
    r = mesh_result
    assert r["mesh"] == {"data": 2, "fsdp": 4}
    # Same losses (the first step sees identical parameters: only summation order differs) ...
    np.testing.assert_allclose(r["l8"], r["l1"], rtol=2e-5)
    # ... and the same parameters after three AdamW updates of lr 1e-3.
    worst = max(r["diffs"].values())
    assert worst < 2e-5, sorted(r["diffs"].items(), key=lambda kv: -kv[1])[:5]


@pytest.mark.xdist_group("mesh_result")
def test_shardings_follow_the_rules(mesh_result):
    specs = mesh_result["specs"]
    # rules: embed -> fsdp, everything else replicated; the stacked layer axis stays unsharded.
    assert specs["processor/blocks/space/fused/kernel"] == [None, "fsdp", None]  # (layers, embed, fused)
    assert specs["processor/blocks/space/ff_out/kernel"] == [None, None, "fsdp"]  # (layers, mlp, embed)
    assert specs["processor/blocks/time/qkv/kernel"] == [None, "fsdp", None]
    assert specs["embed/d2/proj2"] == [None, None, None, None, "fsdp"]  # (kh, kw, kd, inter, embed)
    assert specs["debed/d2/proj2_bias"] == [None]  # vocab: replicated
    assert all("data" not in (s or []) for spec in specs.values() for s in map(lambda x: x if isinstance(x, list) else [x], spec))
    # optimizer moments are laid out like their parameters; the batch is split over both axes
    assert mesh_result["mu_same"]
    assert mesh_result["batch_spec"][0] == ["data", "fsdp"]


def test_mesh_errors_name_the_problem():
    from ml_collections import config_dict

    from walrus_jax import sharding

    with pytest.raises(ValueError, match=r"mesh.data × mesh.fsdp = 3 × 3 = 9 does not match the 8 available"):
        sharding.mesh_shape(config_dict.ConfigDict(dict(data=3, fsdp=3)), 8)
    with pytest.raises(ValueError, match="mesh.fsdp=3 does not divide the 8"):
        sharding.mesh_shape(config_dict.ConfigDict(dict(data=-1, fsdp=3)), 8)
    assert sharding.mesh_shape(config_dict.ConfigDict(dict(data=-1, fsdp=4)), 8) == (2, 4)
    with pytest.raises(ValueError, match="parameters are replicated over 'data'"):
        sharding.rules_dict([("embed", "data")])


# ------------------------------------------------------------------------------ two processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _main_cmd(workdir, data, extra=()):
    return main_command(workdir, data, ["train.steps=3", "checkpoint.every=0", "eval.n_trajectories=0",
                                        "data.batch_size=4", "mesh.data=2", "mesh.fsdp=2"]) + [
            # The k_norm biases have an identically zero gradient (a shift of every key leaves the
            # softmax unchanged): with the release's eps 1e-10 AdamW turns their round-off
            # gradients, which depend on the summation order, into ±lr steps. eps 1e-4 keeps them
            # still, so the comparison measures the sharding, not that amplifier.
            "--config.train.eps=1e-4", *extra]


def test_two_processes_match_one(tmp_path, gray_scott):
    port = _free_port()
    procs = [subprocess.Popen(_main_cmd(tmp_path / "multi", gray_scott, [
        f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"]),
        env=_env(2), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    single = subprocess.run(_main_cmd(tmp_path / "single", gray_scott), env=_env(4), cwd=REPO,
                            capture_output=True, text=True, timeout=900)
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, e[-4000:]
    assert single.returncode == 0, single.stderr[-4000:]
    multi = json.load(open(tmp_path / "multi" / "summary.json"))
    one = json.load(open(tmp_path / "single" / "summary.json"))
    assert multi["steps_done"] == one["steps_done"] == 3
    np.testing.assert_allclose(multi["losses"], one["losses"], rtol=1e-5)
    from walrus_jax.checkpoints.load import read_weights

    import chex

    chex.assert_trees_all_close(read_weights(str(tmp_path / "multi")).params,
                                read_weights(str(tmp_path / "single")).params, rtol=1e-5, atol=1e-6)
