"""wj.from_pretrained through a local stand-in for the hub (tests/hub_standin.py): every released
layout (.pt, .pth fine-tune with finetuning_mods, .safetensors, a local folder) loads by id with the
same numbers as the converter CLI + load_pretrained; a second call converts nothing and imports no
torch; a process killed in the middle of the download or of the conversion leaves a state the next
call repairs; a damaged cached conversion is converted again; bad input is one clear line."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

import walrus_jax as wj
from hub_standin import StandinHub
from tools.convert_torch_ckpt import cli
from walrus_jax.checkpoints import hub as hublib
from walrus_jax.checkpoints import pretrained
from walrus_jax.checkpoints.load import load_pretrained
from walrus_jax.errors import DataError, describe

FIX = os.path.join(os.path.dirname(__file__), "fixtures")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FT_VOCAB = {"closed_boundary": 0, "open_boundary": 1, "bias_correction": 2,
            **{f"field_{i}": i for i in range(3, 14)}}


def _case(name):
    c = np.load(os.path.join(FIX, f"{name}_expected.npz"))
    return c, json.loads(str(c["config_json"]))


def _yaml(model_section, vocab=None, mods=None, datasets=None) -> bytes:
    doc = {"model": model_section, "data": {}}
    if vocab is not None:
        doc["data"]["field_index_map_override"] = vocab
    if datasets:
        doc["data"]["module_parameters"] = {"well_dataset_info": {d: {"include_filters": []} for d in datasets}}
    if mods is not None:
        doc["finetuning_mods"] = mods
        doc["checkpoint"] = {"load_chkpt_after_finetuning_expansion": True}
    return yaml.safe_dump(doc).encode()


def _flat(model):
    return {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model))}


def _assert_same_model(a, b):
    assert a.cfg == b.cfg
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)
    assert (a.vocab is None) == (b.vocab is None)
    if a.vocab is not None:
        assert a.vocab.to_dict() == b.vocab.to_dict()


def _forward(model, case):
    x = np.moveaxis(np.moveaxis(case["x"], 2, -1), 0, 1)  # (T,B,C,sp) -> (B,T,sp,C)
    return np.asarray(model(jnp.asarray(x), case["state_labels"], case["bcs"][0]))


@pytest.fixture(scope="module")
def stand(tmp_path_factory):
    """The stand-in hub with one repository per layout, and the environment pointing at it."""
    import huggingface_hub.constants as hf_constants
    import torch
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("hub")
    small, small_meta = _case("small_ckpt")
    ft, ft_meta = _case("finetune_ckpt")
    sd = torch.load(os.path.join(FIX, "small_ckpt.pt"), map_location="cpu", weights_only=True)["app"]["model"]
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"))
    small_yaml = _yaml(small_meta["config"])
    ft_yaml = _yaml(ft_meta["config"], FT_VOCAB, mods=ft_meta["ft_options"], datasets=["post_neutron_star_merger"])
    h = StandinHub()
    small_pt = {"walrus.pt": os.path.join(FIX, "small_ckpt.pt"), "extended_config.yaml": small_yaml,
                "README.md": b"# small\n"}
    h.add_repo("org/small_pt", small_pt)
    h.add_repo("org/ft_pth", {"coalesced.pth": os.path.join(FIX, "finetune_ckpt.pt"), "extended_config.yaml": ft_yaml})
    h.add_repo("org/small_st", {"model.safetensors": str(d / "model.safetensors"), "extended_config.yaml": small_yaml})
    h.add_repo("org/no_yaml", {"walrus.pt": os.path.join(FIX, "small_ckpt.pt")})
    h.add_repo("org/no_ckpt", {"extended_config.yaml": small_yaml, "README.md": b"x"})
    h.add_repo("org/private", small_pt, token="hf_right")
    h.add_repo("org/kill_download", small_pt)
    h.add_repo("org/kill_convert", small_pt)
    h.add_repo("org/damaged", small_pt)
    h.add_repo("org/disk_full", small_pt)
    url = h.start()
    env = {"HF_ENDPOINT": url, "HF_HOME": str(d / "hf_home"), "HF_HUB_CACHE": str(d / "hf_home" / "hub"),
           "WALRUS_JAX_PRETRAINED_CACHE": str(d / "converted"), "HF_HUB_DISABLE_TELEMETRY": "1",
           "PYTHONPATH": ROOT + os.pathsep + os.path.dirname(__file__), "JAX_PLATFORMS": "cpu"}
    mp = pytest.MonkeyPatch()
    for k, v in env.items():
        mp.setenv(k, v)
    for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        mp.delenv(k, raising=False)
    mp.setattr(hf_constants, "HF_HUB_CACHE", env["HF_HUB_CACHE"])  # read by huggingface_hub at import
    mp.setattr(hf_constants, "HF_HUB_OFFLINE", False)

    # The reference: the same files through the converter CLI + load_pretrained.
    files = {"small.yaml": small_yaml, "ft.yaml": ft_yaml}
    for name, text in files.items():
        (d / name).write_bytes(text)
    refs = {}
    for key, (ckpt, cfg) in {"small": (os.path.join(FIX, "small_ckpt.pt"), "small.yaml"),
                             "ft": (os.path.join(FIX, "finetune_ckpt.pt"), "ft.yaml"),
                             "st": (str(d / "model.safetensors"), "small.yaml")}.items():
        out = cli.convert(ckpt, str(d / cfg), str(d / f"ref_{key}"), log=lambda s: None)
        refs[key] = load_pretrained(out)
    yield dict(hub=h, dir=d, env=env, refs=refs, small=small, ft=ft, small_yaml=small_yaml, ft_yaml=ft_yaml)
    mp.undo()
    h.stop()


def _subprocess(stand, code, extra_env=None, timeout=240):
    env = dict(os.environ, **stand["env"], **(extra_env or {}))
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _entries(stand, repo):
    d = os.path.join(stand["env"]["WALRUS_JAX_PRETRAINED_CACHE"], repo.replace("/", "--"))
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


# ------------------------------------------------------------------------------ layouts
@pytest.mark.parametrize("repo,ref", [("org/small_pt", "small"), ("org/small_st", "st")])
def test_layouts_load_by_id_as_the_converter_does(stand, repo, ref):
    model = wj.from_pretrained(repo)
    _assert_same_model(model, stand["refs"][ref])
    assert model.vocab is None and not model.cfg.resize_66_to_64
    assert any(e.startswith(("walrus-", "model-")) for e in _entries(stand, repo))


def test_finetune_with_finetuning_mods_vocabulary_and_resize(stand):
    """coalesced.pth + a YAML with finetuning_mods, field_index_map_override and the
    post_neutron_star_merger dataset: per-axis RoPE and the APE from the keys (checked against
    the mods), the vocabulary from the YAML, the 66 <-> 64 resize switched on."""
    model = wj.from_pretrained("hf://org/ft_pth@main")
    ref = stand["refs"]["ft"]
    _assert_same_model(model, ref)
    assert model.cfg.learned_rope == "per_axis" and model.cfg.ape_grid == (32, 32, 1)
    assert model.cfg.resize_66_to_64 and model.vocab.to_dict() == FT_VOCAB
    y, y_ref = _forward(model, stand["ft"]), _forward(ref, stand["ft"])
    assert np.abs(y - y_ref).max() <= 1e-6 * np.abs(y_ref).max()
    oracle = np.moveaxis(np.moveaxis(stand["ft"]["y_nojitter"], 0, 1), 2, -1)
    assert np.abs(y - oracle).max() / np.abs(oracle).max() <= 1e-5  # last axis 32: no resize


def test_finetuning_mods_that_the_checkpoint_lacks_are_refused(stand, tmp_path):
    """A YAML whose finetuning_mods ask for an APE the checkpoint does not hold (saved before the
    expansion): one error naming the mod, nothing cached."""
    _, meta = _case("small_ckpt")
    folder = tmp_path / "released"
    folder.mkdir()
    shutil.copy(os.path.join(FIX, "small_ckpt.pt"), folder / "walrus.pt")
    (folder / "extended_config.yaml").write_bytes(_yaml(meta["config"], mods={"ape_shape": [32, 32, 1]}))
    local = os.path.join(stand["env"]["WALRUS_JAX_PRETRAINED_CACHE"], "local")
    before = sorted(os.listdir(local)) if os.path.isdir(local) else []
    with pytest.raises(DataError, match=r"finetuning_mods.ape_shape=\[32, 32, 1\] .*missing \(no `ape` key\)"):
        wj.from_pretrained(str(folder))
    assert [e for e in sorted(os.listdir(local)) if not e.endswith(".lock")] == \
        [e for e in before if not e.endswith(".lock")]


def test_local_released_folder_converted_once(stand, tmp_path):
    folder = tmp_path / "walrus_download"
    folder.mkdir()
    shutil.copy(os.path.join(FIX, "finetune_ckpt.pt"), folder / "coalesced.pth")
    (folder / "extended_config.yaml").write_bytes(stand["ft_yaml"])
    model = wj.from_pretrained(str(folder))
    _assert_same_model(model, stand["refs"]["ft"])
    path = hublib.resolve(str(folder))
    assert hublib.in_cache(path) and os.path.dirname(path).endswith("local")
    marker = os.path.join(path, pretrained.MARKER)
    before = os.stat(marker).st_mtime_ns
    assert hublib.resolve(str(folder)) == path and os.stat(marker).st_mtime_ns == before  # not converted again
    assert hublib.resolve(path) == path  # a converted directory is used as it is


# ------------------------------------------------------------------------------ the cache
def test_second_call_converts_nothing_and_imports_no_torch(stand):
    wj.from_pretrained("org/small_pt")  # converted (here or by an earlier test)
    marker = os.path.join(hublib.resolve("org/small_pt"), pretrained.MARKER)
    before = os.stat(marker).st_mtime_ns
    n_log = len(stand["hub"].log)
    p = _subprocess(stand, """
        import json, os, sys
        import walrus_jax as wj
        m = wj.from_pretrained("org/small_pt")
        online = "torch" in sys.modules
        os.environ["HF_HUB_OFFLINE"] = "1"       # no network at all: the last resolution of main
        m2 = wj.from_pretrained("org/small_pt", dtype="bfloat16")
        print(json.dumps({"torch": online or "torch" in sys.modules, "n_states": m.cfg.n_states,
                          "dtype": m2.cfg.param_dtype}))
    """)
    out, err = p.communicate(timeout=240)
    assert p.returncode == 0, err
    got = json.loads(out.strip().splitlines()[-1])
    assert got == {"torch": False, "n_states": 8, "dtype": "bfloat16"}
    assert os.stat(marker).st_mtime_ns == before  # the conversion was not redone
    calls = stand["hub"].log[n_log:]
    assert not [c for c in calls if "/resolve/" in c[1]], calls  # nothing downloaded
    assert len([c for c in calls if c[1].startswith("/api/models/org/small_pt/")]) == 1  # one resolution, online


def test_kill_during_download_is_repaired(stand):
    import huggingface_hub.constants as hf_constants

    h, name = stand["hub"], "org/kill_download/walrus.pt"
    size = os.path.getsize(os.path.join(FIX, "small_ckpt.pt"))
    h.stall(name, size // 2)
    p = _subprocess(stand, """
        import huggingface_hub.constants as c
        c.DOWNLOAD_CHUNK_SIZE = 64 * 1024   # write to disk as the bytes come, as a 5 GB download does
        import walrus_jax as wj
        wj.from_pretrained("org/kill_download")
    """)
    try:
        t0 = time.time()
        while h.sent.get(name, 0) < size // 2 and time.time() - t0 < 180 and p.poll() is None:
            time.sleep(0.2)
        assert h.sent.get(name, 0) >= size // 2, p.communicate(timeout=5)
        time.sleep(1.0)  # let the client write what it received
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        h.release()
    assert p.returncode == -signal.SIGKILL
    blobs = os.path.join(hf_constants.HF_HUB_CACHE, "models--org--kill_download", "blobs")
    partial = [f for f in os.listdir(blobs) if f.endswith(".incomplete")]
    assert partial and os.path.getsize(os.path.join(blobs, partial[0])) > 0
    assert not [e for e in _entries(stand, "org/kill_download") if not e.startswith(".")]  # nothing converted
    model = wj.from_pretrained("org/kill_download")
    _assert_same_model(model, stand["refs"]["small"])
    # huggingface_hub downloads into a file unique to each process, so the killed one's part is
    # an orphan: gone once the blob is complete.
    assert not [f for f in os.listdir(blobs) if f.endswith(".incomplete")]


@pytest.mark.slow
def test_kill_during_conversion_is_repaired_once(stand):
    p = _subprocess(stand, """
        import os, signal
        from walrus_jax.checkpoints import convert as conv
        groups = conv.assemble_groups

        def killed_after_first_group(*a, **k):
            for i, g in enumerate(groups(*a, **k)):
                if i == 1:
                    os.kill(os.getpid(), signal.SIGKILL)   # kill -9 with params/base written
                yield g

        conv.assemble_groups = killed_after_first_group
        import walrus_jax as wj
        wj.from_pretrained("org/kill_convert")
    """)
    _, err = p.communicate(timeout=240)
    assert p.returncode == -signal.SIGKILL, err
    left = _entries(stand, "org/kill_convert")
    assert [e for e in left if pretrained.PARTIAL_TAG in e]  # the dead conversion's temporary folder
    assert not [e for e in left if not e.startswith(".")]  # and no converted directory
    # Two processes repair it at once: one converts (under the lock), the other waits and loads.
    repairers = [_subprocess(stand, """
        import logging, walrus_jax as wj
        logging.basicConfig(level=logging.INFO, format="LOG %(message)s")
        wj.from_pretrained("org/kill_convert")
    """) for _ in range(2)]
    logs = [r.communicate(timeout=240) for r in repairers]
    assert [r.returncode for r in repairers] == [0, 0], logs
    text = "".join(out + err for out, err in logs)
    assert text.count("left by an interrupted conversion") == 1 and text.count("parameter groups in") == 1, text
    left = _entries(stand, "org/kill_convert")
    assert not [e for e in left if pretrained.PARTIAL_TAG in e]
    _assert_same_model(wj.from_pretrained("org/kill_convert"), stand["refs"]["small"])


def test_damaged_conversion_is_converted_again(stand):
    path = hublib.resolve("org/damaged")
    params = os.path.join(path, pretrained.PARAMS_DIR)
    shutil.rmtree(os.path.join(params, "layer_001"))  # a missing group: found before loading
    assert hublib.resolve("org/damaged") == path and os.path.isdir(os.path.join(params, "layer_001"))
    for root, _, files in os.walk(os.path.join(params, "base")):  # unreadable arrays: found while loading
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"garbage")
    _assert_same_model(wj.from_pretrained("org/damaged"), stand["refs"]["small"])


def test_full_disk_while_converting_leaves_nothing(stand, monkeypatch):
    """A write failing with ENOSPC in the middle of the conversion: the OS error (one line for the
    command line), no converted directory and no temporary folder left; the next call converts."""
    import errno

    real = pretrained._fsync_write

    def full(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(pretrained, "_fsync_write", full)
    with pytest.raises(OSError) as info:
        wj.from_pretrained("org/disk_full")
    assert info.value.errno == errno.ENOSPC and "the disk is full" in describe(info.value)
    assert not [e for e in _entries(stand, "org/disk_full") if not e.endswith(".lock")]
    monkeypatch.setattr(pretrained, "_fsync_write", real)
    _assert_same_model(wj.from_pretrained("org/disk_full"), stand["refs"]["small"])


# ------------------------------------------------------------------------------ bad input
def _one_line_error(call, exc, match):
    with pytest.raises(exc) as info:
        call()
    msg = describe(info.value)
    assert "\n" not in msg, msg
    assert pytest.importorskip("re").search(match, msg), msg
    return msg


def test_bad_input_is_one_clear_line(stand, monkeypatch):
    err = _one_line_error(lambda: wj.from_pretrained("org/nope"), hublib.HubError, r"no such model repository")
    assert "list_pretrained" in err and "is not a local path" in err
    _one_line_error(lambda: wj.from_pretrained("org/small_pt", revision="v9"), hublib.HubError,
                    r"revision 'v9' does not exist")
    _one_line_error(lambda: wj.from_pretrained("hf://org/no_yaml"), DataError, r"has no extended_config.yaml")
    _one_line_error(lambda: wj.from_pretrained("org/no_ckpt"), DataError, r"holds no checkpoint \(\*\.pt")
    _one_line_error(lambda: wj.from_pretrained("org/private"), hublib.HubError, r"private and no valid token")
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    _one_line_error(lambda: wj.from_pretrained("org/private"), hublib.HubError, r"refused the credentials")
    monkeypatch.delenv("HF_TOKEN")
    _one_line_error(lambda: wj.from_pretrained("./not/here"), FileNotFoundError, r"does not exist and is not a hub")
    for repo in ("org/nope", "org/no_yaml", "org/no_ckpt", "org/private"):
        assert not _entries(stand, repo), repo  # nothing half-written
    # No network: a repository never converted fails; one converted before loads from the cache.
    hublib.resolve("org/small_pt")  # converted here (or by an earlier test), with the network
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:1")
    _one_line_error(lambda: wj.from_pretrained("org/never_seen"), hublib.HubError,
                    r"cannot be reached .* no converted copy is cached")
    hublib.resolve("org/small_pt")  # resolves from refs/main
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _one_line_error(lambda: wj.from_pretrained("org/no_ckpt"), hublib.HubError, r"offline mode .* no converted copy")


def test_jobs_take_a_repo_id(stand, monkeypatch):
    """--config.checkpoint=ORG/NAME (rollout job) and --config.init_from=ORG/NAME (fine-tuning) reach
    their jobs as the converted directory; a missing repository is one `error:` line."""
    from walrus_jax import main
    from walrus_jax.inference import rollout_job
    from walrus_jax.training import loop

    seen = {}
    monkeypatch.setattr(rollout_job, "run_rollout_job", lambda c, w: seen.setdefault("checkpoint", c.checkpoint))
    monkeypatch.setattr(loop, "train", lambda c, w: seen.setdefault("init_from", c.init_from))
    cfg = main.load_config(os.path.join(ROOT, "configs", "rollout.py") + ":tiny", ["checkpoint=org/small_pt"])
    main.run(cfg, str(stand["dir"] / "job"), mode="rollout")
    cfg = main.load_config(os.path.join(ROOT, "configs", "finetune.py"), ["init_from=hf://org/ft_pth"])
    main.run(cfg, str(stand["dir"] / "job"), mode="train")
    assert seen == {"checkpoint": hublib.resolve("org/small_pt"), "init_from": hublib.resolve("org/ft_pth")}
    from walrus_jax.checkpoints.load import read_weights

    assert read_weights(seen["init_from"]).vocab.to_dict() == FT_VOCAB
    p = subprocess.run([sys.executable, "-m", "walrus_jax.main", "--config", "configs/rollout.py",
                        "--config.checkpoint=org/nope", "--config.data=x.hdf5", "--workdir", str(stand["dir"] / "j2")],
                       cwd=ROOT, env=dict(os.environ, **stand["env"], WALRUS_JAX_HUGE_PAGES="0"),
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("error: config.checkpoint='org/nope'"), p.stderr


def test_list_pretrained():
    known = wj.list_pretrained()
    assert [k.repo_id for k in known][0] == "polymathic-ai/walrus" and len(known) == 9
    assert all(k.repo_id.startswith("polymathic-ai/walrus") and k.description and k.dims for k in known)


def test_readme_hub_to_plot_runs(stand, tmp_path):
    """README's first code block, as written, against the stand-in serving a tiny random model as
    polymathic-ai/walrus and a small Well file in place of shear_flow.hdf5."""
    import re

    from conftest import write_test_dataset
    from hub_standin import released_files

    stand["hub"].add_repo("polymathic-ai/walrus", released_files(wj.ModelConfig.tiny(n_states=67)))
    folder = write_test_dataset(str(tmp_path), "flow", (32, 32), n_traj=1, n_steps=27)
    data = os.path.join(folder, "data", "train", "flow.hdf5")
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    code = re.search(r"## From the hub to a plotted rollout\n\n```python\n(.*?)```", text, re.S).group(1)
    assert len(code.strip().splitlines()) <= 6 and code.count("\n\n") == 0
    code = code.replace('"shear_flow.hdf5"', repr(data)).replace('"rollout.png"', repr(str(tmp_path / "rollout.png")))
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["preds"].shape == (1, 20, 32, 32, 3) and np.isfinite(np.asarray(scope["preds"])).all()
    assert os.path.getsize(tmp_path / "rollout.png") > 1000


# ------------------------------------------------------------------------------ sharing
def _fake_upload(stand, monkeypatch):
    """HfApi.create_repo / upload_folder writing into the stand-in hub (it serves downloads only)."""
    import huggingface_hub

    pushed = []

    def upload_folder(self, *, repo_id, folder_path, **kw):
        files = {os.path.relpath(os.path.join(r, f), folder_path): os.path.join(r, f)
                 for r, _, fs in os.walk(folder_path) for f in fs}
        pushed.append((repo_id, sorted(files)))
        sha = stand["hub"].add_repo(repo_id, files)
        return type("Commit", (), {"commit_url": f"{self.endpoint}/{repo_id}/commit/{sha}"})()

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: repo_id)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return pushed


def test_save_pretrained_push_to_hub_round_trip(stand, tmp_path, monkeypatch):
    """A model saved in walrus_jax's own format and pushed loads back by id, as it is (no conversion)."""
    pushed = _fake_upload(stand, monkeypatch)
    model = stand["refs"]["ft"]
    out = wj.save_pretrained(model, str(tmp_path / "mine"))
    url = wj.push_to_hub(out, "me/my_finetune")
    assert url.endswith(stand["hub"].repos["me/my_finetune"]["refs"]["main"]) and pretrained.MARKER in pushed[0][1]
    back = wj.from_pretrained("me/my_finetune")
    _assert_same_model(back, model)
    assert not _entries(stand, "me/my_finetune") or _entries(stand, "me/my_finetune") == ["refs"]  # nothing converted
    with pytest.raises(FileNotFoundError, match="not a folder written by wj.save_pretrained"):
        wj.push_to_hub(str(tmp_path), "me/other")


def test_lora_workdir_pushes_only_adapters_naming_their_base(stand, tmp_path, monkeypatch):
    """save_pretrained(LoRA workdir): the adapter delta + the base it names (the hub repository the
    run's init_from came from); from_pretrained of the pushed repository fetches both."""
    from walrus_jax.checkpoints import adapters
    from walrus_jax.checkpoints.load import read_weights
    from walrus_jax.checkpoints.params import flatten, random_params, unflatten
    from walrus_jax.checkpoints.train_state import Checkpointer

    pushed = _fake_upload(stand, monkeypatch)
    base_dir = hublib.resolve("org/small_pt")
    base = read_weights(base_dir)
    lora_cfg = base.cfg.replace(lora_rank=2)
    params = flatten(random_params(lora_cfg, seed=3))
    params.update(flatten(base.params))  # the frozen base; the adapters random (as if trained)
    workdir = tmp_path / "lora_run"
    ck = Checkpointer(str(workdir / "checkpoints"), keep=1, async_save=False)
    ck.save(5, {"params": unflatten(params)},
            {"model_config": lora_cfg.to_dict(), "vocab": base.vocab.to_dict(), "config": {"init_from": base_dir},
             adapters.META_KEY: {"fingerprint": adapters.fingerprint(base.params), "n_states": base.cfg.n_states}})
    ck.close()
    out = wj.save_pretrained(str(workdir), str(tmp_path / "delta"))
    with open(os.path.join(out, hublib.BASE_FILE)) as f:
        assert json.load(f)["base"] == "org/small_pt@" + stand["hub"].repos["org/small_pt"]["refs"]["main"]
    wj.push_to_hub(out, "me/lora")
    assert sorted(pushed[-1][1]) == sorted([adapters.DELTA_FILE, adapters.ARRAYS_FILE, hublib.BASE_FILE])
    back = wj.from_pretrained("me/lora")
    _assert_same_model(back, wj.load_pretrained(base_dir, adapters=str(workdir)))
    assert back.cfg.lora_rank == 2
