"""The converted format (walrus_jax.checkpoints.pretrained) through load_pretrained (= load.load_model),
save_pretrained and model_vocabulary: round trips, dtype and mesh options, and clear errors for missing,
incomplete, foreign or damaged directories."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import walrus_jax as wj
from walrus_jax.checkpoints import pretrained
from walrus_jax.checkpoints.load import load_pretrained
from walrus_jax.data.fields import FieldVocabulary

FIX = os.path.join(os.path.dirname(__file__), "fixtures")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = {"closed_boundary": 0, "open_boundary": 1, "bias_correction": 2, "pressure": 3, "density": 5}


def _flat_values(model):
    return {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model))}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model with the oracle weights' config shape (from weights_small.npz) saved once."""
    d = tmp_path_factory.mktemp("pretrained")
    c = np.load(os.path.join(FIX, "case_2d_periodic.npz"))
    meta = json.loads(str(c["config_json"]))
    cfg = wj.ModelConfig.from_torch_config(meta["config"], n_states=meta["config"]["n_states"])
    from walrus_jax.checkpoints.convert import model_from_state_dict  # no slow eager random init

    model = model_from_state_dict(cfg, dict(np.load(os.path.join(FIX, "weights_small.npz"))))
    out = pretrained.save_pretrained(model, str(d / "ckpt"), vocabulary=FieldVocabulary(VOCAB))
    return dict(dir=d, path=out, model=model, case=c)


def test_save_load_round_trip_and_oracle(saved):
    model = load_pretrained(saved["path"])
    assert model.cfg == saved["model"].cfg
    a, b = _flat_values(saved["model"]), _flat_values(model)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    c = saved["case"]
    x = np.moveaxis(np.moveaxis(c["x"], 2, -1), 0, 1)
    y = np.asarray(model(jnp.asarray(x), c["state_labels"], c["bcs"][0]))
    ref = np.moveaxis(np.moveaxis(c["y_nojitter"], 0, 1), 2, -1)
    assert np.abs(y - ref).max() / np.abs(ref).max() <= 1e-5


def test_loading_hands_freed_host_memory_back(saved, monkeypatch):
    """Both loading paths end by returning the C heap's freed pages (the per-group reads and the
    per-variable host arrays would otherwise stay resident beside the weights)."""
    from walrus_jax import host_memory

    calls = []
    monkeypatch.setattr(host_memory, "release_free_memory", lambda: calls.append(1) or True)
    model = load_pretrained(saved["path"])
    assert len(calls) == 1
    wj.convert.load_state_dict(model, wj.convert.to_state_dict(saved["model"]))
    assert len(calls) == 2


def test_vocabulary_on_model_and_by_directory(saved, monkeypatch):
    model = load_pretrained(saved["path"])
    v = pretrained.model_vocabulary(saved["path"])
    assert isinstance(v, FieldVocabulary) and v.to_dict() == VOCAB and v.n_states == 6
    assert model.vocab == v and hash(model.vocab) == hash(v)
    # the vocabulary is a static attribute: jitting the model with it compiles once for two calls
    traces = []

    @nnx.jit(static_argnums=(2, 3))
    def fwd(m, x, fi, bcs):
        traces.append(1)
        return m(x, np.asarray(fi), np.asarray(bcs))

    x = jnp.ones((1, 2, 32, 32, 2))
    fwd(model, x, (3, 5), ((2, 2), (2, 2)))
    fwd(model, x * 2, (3, 5), ((2, 2), (2, 2)))
    assert len(traces) == 1
    # read_weights (fine-tuning's init_from, the eval and rollout jobs) reads the stored vocabulary
    from walrus_jax.checkpoints.load import read_weights

    assert read_weights(saved["path"]).vocab.to_dict() == VOCAB


def test_dtype_and_overrides(saved):
    m = load_pretrained(saved["path"], dtype="bfloat16", remat="full")
    assert m.cfg.param_dtype == m.cfg.dtype == "bfloat16" and m.cfg.remat == "full"
    flat = _flat_values(m)
    assert flat.pop("processor/blocks/space/rope_freqs").dtype == np.float32  # fixed buffer stays exact
    assert {str(v.dtype) for v in flat.values()} == {"bfloat16"}
    ref = _flat_values(saved["model"])["processor/blocks/space/fused/kernel"]
    np.testing.assert_array_equal(flat["processor/blocks/space/fused/kernel"], ref.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match=r"dtype='float16'; expected None or one of \('float32', 'bfloat16'\)"):
        load_pretrained(saved["path"], dtype="float16")
    with pytest.raises(ValueError, match=r"\['hidden_dim'\] change parameter shapes"):
        load_pretrained(saved["path"], hidden_dim=32)
    with pytest.raises(ValueError, match="rules= needs mesh="):
        load_pretrained(saved["path"], rules={"embed": None})


def test_sharded_restore_on_two_cpu_devices(saved):
    """Restored straight onto a ('data', 'fsdp') mesh: 'embed' axes split over fsdp, equal values."""
    script = textwrap.dedent(f"""
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
        import jax, numpy as np
        from flax import nnx
        from walrus_jax.checkpoints.load import load_pretrained
        mesh = jax.make_mesh((1, 2), ("data", "fsdp"))
        path = {saved['path']!r}
        m = load_pretrained(path, mesh=mesh)
        ref = load_pretrained(path)
        got = {{"/".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(nnx.state(m))}}
        want = {{"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(ref))}}
        for k, a in got.items():
            np.testing.assert_array_equal(np.asarray(a), want[k], err_msg=k)
        k = got["processor/blocks/space/fused/kernel"]       # (layers, embed, fused)
        assert tuple(k.sharding.spec) == (None, "fsdp", None), k.sharding.spec
        assert k.addressable_shards[0].data.shape == (3, 32, 448)
        assert tuple(got["processor/blocks/time/rel_bias"].sharding.spec) == (None, None, None)
        # an explicit rules table: everything replicated
        names = ["embed", "layers", "qkv", "fused", "attn", "mlp", "heads", "head_dim", "buckets", "inter",
                 "vocab", "kh", "kw", "kd", "rope", "rope_axes", "tok_h", "tok_w", "tok_d"]
        r = load_pretrained(path, mesh=mesh, rules={{n: None for n in names}})
        assert r.processor.blocks.space.fused.kernel[...].sharding.spec == jax.sharding.PartitionSpec(None, None, None)
        try:
            load_pretrained(path, mesh=mesh, rules={{"embed": "model"}})
        except ValueError as e:
            assert "names a mesh axis the mesh lacks" in str(e), e
        else:
            raise AssertionError("bad rules accepted")
        print("SHARDED-OK")
    """)
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "SHARDED-OK" in r.stdout, r.stdout + r.stderr


# ------------------------------------------------------------------------------ bad directories
def test_missing_file_and_foreign_directories(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere does not exist .*tools.convert_torch_ckpt"):
        load_pretrained(str(tmp_path / "nowhere"))
    with pytest.raises(pretrained.PretrainedFormatError, match=r"walrus.pt is a file, not a converted checkpoint"):
        (tmp_path / "walrus.pt").write_bytes(b"PK")
        load_pretrained(str(tmp_path / "walrus.pt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(pretrained.PretrainedFormatError, match=r"marker walrus_jax_pretrained.json is missing \(it is empty\)"):
        load_pretrained(str(tmp_path / "empty"))
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "model.safetensors").write_bytes(b"x")
    with pytest.raises(pretrained.PretrainedFormatError, match=r"holds \['model.safetensors'\], not a converter output"):
        load_pretrained(str(tmp_path / "foreign"))
    (tmp_path / "workdir" / "checkpoints").mkdir(parents=True)
    with pytest.raises(pretrained.PretrainedFormatError, match="looks like a walrus_jax training workdir"):
        load_pretrained(str(tmp_path / "workdir"))
    bad = tmp_path / "other_marker"
    shutil.copytree(saved["path"], bad)
    (bad / pretrained.MARKER).write_text(json.dumps({"format": "something.else"}))
    with pytest.raises(pretrained.PretrainedFormatError, match="not a walrus_jax converted-checkpoint marker"):
        load_pretrained(str(bad))


def test_incomplete_directories_are_rejected(saved, tmp_path):
    # an interrupted conversion's temporary directory: everything but the marker
    partial = tmp_path / f".ckpt{pretrained.PARTIAL_TAG}123-abcd"
    shutil.copytree(saved["path"], partial)
    (partial / pretrained.MARKER).unlink()
    with pytest.raises(pretrained.PretrainedFormatError, match="temporary directory of an interrupted conversion"):
        load_pretrained(str(partial))
    # a marker but a missing part
    for part in (pretrained.PARAMS_DIR, pretrained.CONFIG_FILE):
        d = tmp_path / f"no_{part}"
        shutil.copytree(saved["path"], d)
        (shutil.rmtree if part == pretrained.PARAMS_DIR else os.unlink)(d / part)
        with pytest.raises(pretrained.PretrainedFormatError, match=f"incomplete converted checkpoint, {part} is missing"):
            load_pretrained(str(d))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # Orbax's event loop after a failed read
def test_damaged_or_mismatched_contents(saved, tmp_path):
    # config.json that does not describe the stored arrays: every mismatch named
    d = tmp_path / "wrong_cfg"
    shutil.copytree(saved["path"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["n_states"] = 12
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(pretrained.PretrainedFormatError) as e:
        load_pretrained(str(d))
    assert "embed/d2/proj1: checkpoint shape (8, 8, 8, 10, 32), model expects (8, 8, 8, 12, 32)" in str(e.value)
    assert "debed/d3/proj2_bias: checkpoint shape (10,), model expects (12,)" in str(e.value)
    # truncated Orbax data files
    d = tmp_path / "damaged"
    shutil.copytree(saved["path"], d)
    for root, _, files in os.walk(d / pretrained.PARAMS_DIR):
        for f in files:
            p = os.path.join(root, f)
            if os.path.getsize(p) > 10_000:
                with open(p, "r+b") as fh:
                    fh.truncate(100)
    with pytest.raises(pretrained.PretrainedFormatError, match="Orbax parameter checkpoint cannot be read"):
        load_pretrained(str(d))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # Orbax's event loop after a failed read
def test_save_refuses_to_overwrite_and_bad_vocabulary(saved):
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite"):
        pretrained.save_pretrained(saved["model"], saved["path"])
    with pytest.raises(ValueError, match=r"rows \[\('density', 10\)\] are outside \[0, n_states=10\)"):
        pretrained.save_pretrained(saved["model"], str(saved["dir"] / "v"), vocabulary={"density": 10})
    assert not os.path.exists(saved["dir"] / "v")
    loaded = load_pretrained(saved["path"])
    again = pretrained.save_pretrained(loaded, saved["path"], overwrite=True)  # vocabulary: the model's
    assert pretrained.model_vocabulary(again).to_dict() == VOCAB
    assert [e for e in os.listdir(saved["dir"]) if pretrained.PARTIAL_TAG in e] == []
