"""main.py: configs (locked, variants, overrides) and bad input that fails before any compute."""
import os
import subprocess
import sys

import pytest

from walrus_jax import main
from walrus_jax.data.resolve import resolve_data
from walrus_jax.training import config as train_config
from walrus_jax.training import optim

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")


def test_every_config_loads_and_has_the_public_keys():
    for name in ("demo", "tiny", "walrus_1p3b", "finetune"):
        c = main.load_config(os.path.join(REPO, "configs", f"{name}.py"))
        for key in ("train.steps", "mesh.data", "mesh.fsdp", "checkpoint.every", "init_from"):
            node = c
            for part in key.split("."):
                node = node[part]
        optim.make_schedule(c.train)  # every shipped schedule fits its run
    c = main.load_config(os.path.join(REPO, "configs", "walrus_1p3b.py"))
    assert (c.model.hidden_dim, c.model.n_blocks, c.train.lr, c.train.eps, c.train.grad_accum) == (1408, 40, 2e-4,
                                                                                                    1e-10, 4)
    assert main.load_config(os.path.join(REPO, "configs", "walrus_1p3b.py:medium")).model.hidden_dim == 768
    ft = main.load_config(os.path.join(REPO, "configs", "finetune.py"))
    assert (ft.finetune.learned_rope, ft.train.lr, ft.train.warmup_factor, ft.model.drop_path) == ("per_axis", 1e-4,
                                                                                                     0.01, 0.0)
    assert main.load_config(os.path.join(REPO, "configs", "finetune.py:fixed_rope")).finetune.learned_rope == "none"
    demo = os.path.join(REPO, "configs", "demo.py")
    for n in (1, 12, 37, 400, 5000):  # warmup / cooldown follow the run length unless set
        optim.make_schedule(main.load_config(demo, [f"train.steps={n}"]).train)


def test_overrides_apply_and_unknown_keys_fail():
    c = main.load_config(TINY, ["train.steps=17", "mesh.fsdp=1", "model.ape_grid=(4,4,1)"])
    assert c.train.steps == 17 and c.mesh.fsdp == 1 and tuple(c.model.ape_grid) == (4, 4, 1)
    with pytest.raises(Exception, match="stpes"):
        main.load_config(TINY, ["train.stpes=3"])
    with pytest.raises(Exception, match="lr"):
        main.load_config(TINY, ["train.lr=fast"])
    with pytest.raises(Exception, match="unknown variant 'nope'"):  # absl wraps it in IllegalFlagValueError
        main.load_config(TINY + ":nope")


def test_bad_mesh_and_init_from_fail_early(tmp_path):
    with pytest.raises(ValueError, match=r"mesh.data × mesh.fsdp = 3 × 1 = 3 does not match the 1 available"):
        train_config.validate_config(main.load_config(TINY, ["mesh.data=3", "mesh.fsdp=1"]))
    with pytest.raises(FileNotFoundError, match="init_from='/nonexistent/ckpt' does not exist"):
        train_config.validate_config(main.load_config(TINY, ["init_from=/nonexistent/ckpt"]))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="not a walrus_jax workdir"):
        train_config.validate_config(main.load_config(TINY, [f"init_from={empty}"]))
    with pytest.raises(ValueError, match="train.warmup_epochs \\+ train.cooldown_epochs = 2 pseudo-epochs exceeds"):
        train_config.validate_config(main.load_config(TINY, ["train.steps=1"]))
    with pytest.raises(ValueError, match="data.n_steps_input=1 must exceed train.minimum_context=1"):
        train_config.validate_config(main.load_config(TINY, ["data.n_steps_input=1"]))
    with pytest.raises(ValueError, match="data.dataset_draws=3 must be >= 1 and divide data.batch_size=8"):
        train_config.validate_config(main.load_config(TINY, ["data.dataset_draws=3"]))
    c = main.load_config(TINY, ["data.dataset_draws=2", "train.grad_accum=3"])
    train_config.validate_config(c)
    assert train_config.micro_batch_size(c) == 4 and train_config.micro_steps_per_update(c) == 6
    with pytest.raises(ValueError, match="data.normalization='rms'; expected 'sample'"):
        train_config.validate_config(main.load_config(TINY, ["data.normalization=rms"]))
    with pytest.raises(FileNotFoundError, match="data.root='/nonexistent/data' does not exist"):
        resolve_data(main.load_config(TINY, ["data.root=/nonexistent/data"]))


def test_batch_not_divisible_by_the_mesh_fails_before_compute(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-m", "walrus_jax.main", "--config", TINY, "--workdir", str(tmp_path / "w"),
                          "--config.data.batch_size=6", "--config.mesh.data=2", "--config.mesh.fsdp=4",
                          "--config.data.root=/nonexistent"], env=env, capture_output=True, text=True, timeout=300,
                         cwd=REPO)
    assert out.returncode != 0
    assert "data.batch_size=6 is not divisible by the mesh's 8 devices (mesh.data=2 × mesh.fsdp=4)" in out.stderr
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_finetune_steps_alone_keeps_the_release_schedule_proportions():
    ft = os.path.join(REPO, "configs", "finetune.py")
    s = optim.make_schedule(main.load_config(ft).train)  # the release's schedule, unchanged
    assert (s.max_epochs, s.warmup_epochs, s.cooldown_epochs, s.steps_per_epoch) == (51, 20, 10, 500)
    for n, want in [(1000, (50, 20, 10, 20)), (51, (51, 20, 10, 1)), (10, (10, 4, 2, 1)), (1, (1, 0, 0, 1))]:
        c = main.load_config(ft + ":lora", [f"train.steps={n}"])
        s = optim.make_schedule(c.train)
        assert (s.max_epochs, s.warmup_epochs, s.cooldown_epochs, s.steps_per_epoch) == want, n
        lrs = [float(s(u)) for u in range(n)]
        assert all(v > 0 for v in lrs) and max(lrs) <= c.train.lr  # the whole run inside the schedule
    # explicit settings still win
    s = optim.make_schedule(main.load_config(ft, ["train.steps=1000", "train.steps_per_epoch=100",
                                                  "train.warmup_epochs=2", "train.cooldown_epochs=1"]).train)
    assert (s.max_epochs, s.warmup_epochs, s.cooldown_epochs, s.steps_per_epoch) == (10, 2, 1, 100)
