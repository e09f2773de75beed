"""tools.convert_torch_ckpt: the oracle checkpoints through the CLI and load_pretrained, the 1.3B
manifest against the abstract model, and every kind of bad input (each a clear error naming the
culprit, never a half-written output directory)."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import torch
import yaml

import walrus_jax as wj
from tools.convert_torch_ckpt import cli
from walrus_jax.checkpoints import convert as conv
from walrus_jax.checkpoints import params as parameters
from walrus_jax.checkpoints import pretrained
from walrus_jax.checkpoints.load import load_pretrained
from walrus_jax.models.config import ModelConfig

FIX = os.path.join(os.path.dirname(__file__), "fixtures")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASED_PARAMS = 1_286_199_487  # oracle manifest: every float32 element of walrus.pt's state_dict


def _case(name):
    c = np.load(os.path.join(FIX, f"{name}_expected.npz"))
    return c, json.loads(str(c["config_json"]))


def _write_yaml(path, model_section, vocab=None):
    doc = {"model": model_section}
    if vocab is not None:
        doc["data"] = {"field_index_map_override": vocab}
    with open(path, "w") as f:
        yaml.safe_dump(doc, f)
    return str(path)


def _state_dict(name):
    return torch.load(os.path.join(FIX, f"{name}.pt"), map_location="cpu", weights_only=True)["app"]["model"]


def _rel_err(model, case):
    """max |y - y_ref| / max |y_ref| of the converted model against the oracle's y_nojitter."""
    import jax.numpy as jnp

    x = np.moveaxis(np.moveaxis(case["x"], 2, -1), 0, 1)  # (T,B,C,sp) -> (B,T,sp,C)
    ref = np.moveaxis(np.moveaxis(case["y_nojitter"], 0, 1), 2, -1)
    y = np.asarray(model(jnp.asarray(x), case["state_labels"], case["bcs"][0])).astype(np.float32)
    assert y.shape == ref.shape
    return float(np.abs(y - ref).max() / np.abs(ref).max())


def _no_leftovers(parent, name):
    """Nothing named like the output (neither DIR nor a temporary .DIR.partial-*) exists in parent."""
    return [e for e in os.listdir(parent) if e == name or e.startswith(f".{name}{pretrained.PARTIAL_TAG}")]


FT_VOCAB = {f"field_{i}": i for i in range(14)}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("convert")
    small, small_meta = _case("small_ckpt")
    ft, ft_meta = _case("finetune_ckpt")
    small_yaml = _write_yaml(d / "small.yaml", small_meta["config"])
    ft_yaml = _write_yaml(d / "ft.yaml", ft_meta["config"], FT_VOCAB)
    return dict(dir=d, small=small, ft=ft, small_yaml=small_yaml, ft_yaml=ft_yaml, small_meta=small_meta)


@pytest.fixture(scope="module")
def small_dir(work):
    """small_ckpt.pt converted once through the real command line (a subprocess)."""
    out = str(work["dir"] / "small_out")
    r = subprocess.run([sys.executable, "-m", "tools.convert_torch_ckpt", "--checkpoint",
                        os.path.join(FIX, "small_ckpt.pt"), "--config", work["small_yaml"], "--output", out],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "every key maps, every shape matches" in r.stdout and "[  59/59] 100.0%" in r.stdout
    assert "vocabulary: none" in r.stdout  # the YAML has no data section: said, and recorded
    return out


# ------------------------------------------------------------------------------ oracle parity
@pytest.mark.slow
def test_small_ckpt_cli_subprocess_matches_oracle(work, small_dir):
    model = load_pretrained(small_dir)
    assert model.cfg.n_states == 8 and model.cfg.hidden_dim == 96 and model.cfg.n_blocks == 2
    assert model.cfg.learned_rope == "none" and model.cfg.ape_grid is None
    assert _rel_err(model, work["small"]) <= 1e-5
    assert _rel_err(wj.with_kernels(model, "xla"), work["small"]) <= 1e-5  # the portable path
    assert model.vocab is None and pretrained.model_vocabulary(small_dir) is None
    with open(os.path.join(small_dir, pretrained.VOCAB_FILE)) as f:
        rec = json.load(f)
    assert rec["field_index_map"] is None and "no data.field_index_map_override" in rec["source"]
    marker = pretrained.read_marker(small_dir)
    n_sd = sum(int(np.prod(v.shape)) for v in _state_dict("small_ckpt").values())
    assert marker["n_elements"] == n_sd  # every element of the state_dict went somewhere, once
    # torch_state_dict -> convert -> load -> to_state_dict gives back exactly the original tensors.
    back = conv.to_state_dict(model)
    sd = _state_dict("small_ckpt")
    assert set(back) == set(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k], v.numpy().reshape(back[k].shape), err_msg=k)


@pytest.mark.slow
def test_finetune_ckpt_in_process_matches_oracle(work, capsys):
    out = str(work["dir"] / "ft_out")
    assert cli.main(["--checkpoint", os.path.join(FIX, "finetune_ckpt.pt"), "--config", work["ft_yaml"],
                     "--output", out]) == 0
    printed = capsys.readouterr().out
    assert "n_states=14" in printed and "learned_rope=per_axis" in printed and "ape_grid=(32, 32, 1)" in printed
    assert "vocabulary: 14 fields (data.field_index_map_override of ft.yaml)" in printed
    model = load_pretrained(out)
    assert model.cfg.n_states == 14 and model.cfg.learned_rope == "per_axis" and model.cfg.ape_grid == (32, 32, 1)
    sd = _state_dict("finetune_ckpt")
    # per-axis learnable frequencies land on the (layer, axis) slots, the APE on (h, w, d, hid)
    freqs = np.asarray(model.processor.blocks.space.rope_freqs[...])
    for i in range(2):
        for a in range(3):
            np.testing.assert_array_equal(freqs[i, a], sd[f"blocks.{i}.space_mixing.rotary_emb.freqs.{a}"].numpy())
    np.testing.assert_array_equal(np.asarray(model.ape[...]), sd["ape"].numpy()[0, 0].transpose(1, 2, 3, 0))
    assert _rel_err(model, work["ft"]) <= 1e-5
    assert _rel_err(wj.with_kernels(model, "xla"), work["ft"]) <= 1e-5  # the portable path
    assert model.vocab.to_dict() == FT_VOCAB and pretrained.model_vocabulary(out).to_dict() == FT_VOCAB


@pytest.mark.slow
def test_bfloat16_conversion(work):
    out = str(work["dir"] / "small_bf16")
    cli.convert(os.path.join(FIX, "small_ckpt.pt"), work["small_yaml"], out, dtype="bfloat16", log=lambda s: None)
    marker = pretrained.read_marker(out)
    dtypes = {k: v["dtype"] for k, v in marker["arrays"].items()}
    # parameters are stored in bf16; the fixed RoPE frequency buffer stays float32 (bf16 would move
    # the 128*pi frequency by up to 1 rad at the grid edge)
    assert dtypes.pop("processor/blocks/space/rope_freqs") == "float32"
    assert set(dtypes.values()) == {"bfloat16"}
    model = load_pretrained(out)
    assert model.cfg.param_dtype == "bfloat16" and model.cfg.dtype == "bfloat16"
    sd = _state_dict("small_ckpt")
    w = np.asarray(model.processor.blocks.space.fused.kernel[...])
    ref = sd["blocks.1.space_mixing.fused_ff_qkv.weight"].numpy().T
    # each weight is the float32 value rounded to nearest bf16 (relative error <= 2^-8), exactly once
    np.testing.assert_array_equal(w[1], ref.astype(ml_dtypes.bfloat16))
    assert np.abs(w[1].astype(np.float32) - ref).max() <= np.abs(ref).max() * 2.0 ** -8
    err = _rel_err(model, work["small"])
    assert err < 0.05  # bf16 weights and compute: ~1.6e-2 measured; float32 is the 1e-5 path


def test_bare_state_dict_and_safetensors(work):
    """The two other input formats give the same parameters as the released format."""
    from safetensors.torch import save_file

    sd = _state_dict("small_ckpt")
    bare = str(work["dir"] / "bare.pt")
    torch.save(dict(sd), bare)
    st = str(work["dir"] / "small.safetensors")
    save_file({k: v.contiguous() for k, v in sd.items()}, st)
    legacy = str(work["dir"] / "legacy.pt")  # pre-1.6 torch.save format: cannot be memory-mapped
    torch.save({"app": {"model": dict(sd)}}, legacy, _use_new_zipfile_serialization=False)
    outs = []
    for src, name in ((bare, "bare_out"), (st, "st_out"), (legacy, "legacy_out")):
        outs.append(cli.convert(src, work["small_yaml"], str(work["dir"] / name), log=lambda s: None))
    ref = conv.assemble_params(((k, v.numpy()) for k, v in sd.items()), ModelConfig.from_dict(
        json.load(open(os.path.join(outs[0], "config.json")))))
    for out in outs:
        model = load_pretrained(out)
        got = {"/".join(map(str, p)): np.asarray(v[...]) for p, v in
               __import__("flax").nnx.to_flat_state(__import__("flax").nnx.state(model))}
        for path, arr in parameters.flatten(ref, sep=None).items():
            np.testing.assert_array_equal(got["/".join(path)], arr, err_msg=f"{out}: {path}")


# ------------------------------------------------------------------------------ the 1.3B manifest
def test_released_manifest_maps_onto_abstract_1p3b():
    """Every key of the released walrus.pt maps with its exact shape onto the abstract walrus_1p3b
    model (no 5 GB allocation), the YAML + shapes give that config, and the counts add up."""
    with open(os.path.join(FIX, "pretrained_state_dict_manifest.json")) as f:
        man = json.load(f)
    shapes = {k: tuple(v) for k, v in man["shapes"].items()}
    assert len(shapes) == man["num_tensors"] == 857
    assert sum(int(np.prod(s)) for s in shapes.values()) == man["num_elements"] == RELEASED_PARAMS
    section, vocab, _ = cli.read_config(os.path.join(FIX, "walrus_extended_config.yaml"))
    cfg, problems = cli.build_config(section, shapes, "walrus_extended_config.yaml")
    assert problems == []
    released = ModelConfig.walrus_1p3b()
    assert cfg == released.replace(drop_path=cfg.drop_path)  # the YAML describes the release
    assert conv.check_shapes(shapes, released) == []
    assert pretrained.check_vocabulary(vocab, cfg.n_states, "yaml") == [] and len(vocab) == 67 == cfg.n_states

    from flax import nnx

    from walrus_jax.models.walrus import Walrus

    abstract = nnx.eval_shape(lambda: Walrus(released, rngs=nnx.Rngs(0)))
    n_param = sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
    n_all = sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(nnx.state(abstract)))
    n_rope_buffer = sum(int(np.prod(s)) for k, s in shapes.items() if k.endswith("rotary_emb.freqs"))
    assert n_rope_buffer == 40 * 11  # head_dim 88 -> 11 frequencies per block
    assert n_all == RELEASED_PARAMS
    assert n_param == RELEASED_PARAMS - n_rope_buffer == 1_286_199_047


# ------------------------------------------------------------------------------ bad input
def _save(path, sd):
    torch.save({"app": {"model": sd}}, str(path))
    return str(path)


def _convert_fails(work, ckpt, match, yaml_path=None, exc=conv.ConversionError):
    out = work["dir"] / "never"
    with pytest.raises(exc) as e:
        cli.convert(ckpt, yaml_path or work["small_yaml"], str(out), log=lambda s: None)
    msg = str(e.value)
    for m in ([match] if isinstance(match, str) else match):
        assert m in msg, msg
    assert _no_leftovers(work["dir"], "never") == []
    return msg


def test_missing_extra_and_misshaped_keys_reported_together(work):
    sd = dict(_state_dict("small_ckpt"))
    del sd["blocks.1.time_mixing.qnorm.bias"]
    sd["blocks.0.space_mixing.extra_proj.weight"] = torch.zeros(3, 4)
    sd["blocks.0.space_mixing.ff_out.weight"] = sd["blocks.0.space_mixing.ff_out.weight"].T.contiguous()
    msg = _convert_fails(work, _save(work["dir"] / "bad_keys.pt", sd), [
        "3 problem(s)",
        "1 missing key(s): 'blocks.1.time_mixing.qnorm.bias'",
        "unexpected key 'blocks.0.space_mixing.extra_proj.weight' (shape (3, 4))",
        "key 'blocks.0.space_mixing.ff_out.weight' has shape (192, 96), expected (96, 192)"])
    assert "bad_keys.pt" in msg


def test_missing_whole_block_is_not_silently_a_smaller_model(work):
    sd = {k: v for k, v in _state_dict("small_ckpt").items() if not k.startswith("blocks.1.")}
    _convert_fails(work, _save(work["dir"] / "one_block.pt", sd),
                   "processor_blocks=2 but the checkpoint has blocks 0..0 (1 blocks)")


def test_wrong_n_states(work):
    # (1) decoder rows disagree with the encoder's: the decoder key is named with both shapes
    sd = dict(_state_dict("small_ckpt"))
    sd["debed.2.proj2.weight"] = torch.zeros(16, 9, 8, 8, 8)
    sd["debed.2.proj2.bias"] = torch.zeros(9)
    _convert_fails(work, _save(work["dir"] / "rows.pt", sd), [
        "key 'debed.2.proj2.weight' has shape (16, 9, 8, 8, 8), expected (16, 8, 8, 8, 8)",
        "key 'debed.2.proj2.bias' has shape (9,), expected (8,)"])
    ckpt = os.path.join(FIX, "small_ckpt.pt")
    # (2) the YAML states another vocabulary size
    y = _write_yaml(work["dir"] / "n10.yaml", {**work["small_meta"]["config"], "n_states": 10})
    _convert_fails(work, ckpt, "wrong n_states: n10.yaml model.n_states=10 but the checkpoint's "
                               "embed.*.proj1.weight has 8 vocabulary rows", yaml_path=y)
    # (3) the released 67-field vocabulary with an 8-row checkpoint
    released = yaml.safe_load(open(os.path.join(FIX, "walrus_extended_config.yaml")))["data"]["field_index_map_override"]
    y = _write_yaml(work["dir"] / "vocab67.yaml", work["small_meta"]["config"], released)
    _convert_fails(work, ckpt, ["field vocabulary has 67 entries but rows", "('speed_of_sound', 8)",
                                "outside [0, n_states=8)"], yaml_path=y)


def test_truncated_file(work):
    data = open(os.path.join(FIX, "small_ckpt.pt"), "rb").read()
    p = work["dir"] / "truncated.pt"
    p.write_bytes(data[: len(data) * 2 // 3])
    _convert_fails(work, str(p), ["truncated.pt", "truncated or corrupted", f"({len(data) * 2 // 3:,} bytes)"],
                   exc=cli.CheckpointReadError)
    p = work["dir"] / "truncated.safetensors"
    p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    _convert_fails(work, str(p), ["truncated.safetensors", "truncated or not a safetensors file"],
                   exc=cli.CheckpointReadError)


class NotATensor:
    """A class inside a pickle: torch.load(weights_only=True) must refuse it."""

    def __reduce__(self):
        return (os.getcwd, ())


def test_pickles_with_classes_or_code_are_refused(work):
    p = work["dir"] / "classy.pt"
    torch.save({"app": {"model": {"w": NotATensor()}}}, str(p))
    _convert_fails(work, str(p), ["classy.pt", "refused", "posix.getcwd"], exc=cli.CheckpointReadError)
    p = work["dir"] / "plain.pkl"
    with open(p, "wb") as f:
        pickle.dump({"app": {"model": NotATensor()}}, f)
    _convert_fails(work, str(p), ["plain.pkl", "refused"], exc=cli.CheckpointReadError)
    # a well-formed pickle that is simply not a checkpoint
    p = work["dir"] / "notes.pt"
    torch.save({"epoch": 3, "notes": ["a"]}, str(p))
    _convert_fails(work, str(p), ["no state_dict found", "['epoch', 'notes']"], exc=cli.CheckpointReadError)


def test_main_reports_errors_and_exit_code(work, capsys):
    rc = cli.main(["--checkpoint", str(work["dir"] / "nope.pt"), "--config", work["small_yaml"],
                   "--output", str(work["dir"] / "never")])
    err = capsys.readouterr().err
    assert rc == 2 and f"error: checkpoint file {work['dir'] / 'nope.pt'} does not exist" in err


def test_existing_output_is_kept_unless_overwrite(work, small_dir, capsys):
    before = sorted(os.listdir(small_dir))
    rc = cli.main(["--checkpoint", os.path.join(FIX, "finetune_ckpt.pt"), "--config", work["ft_yaml"],
                   "--output", small_dir])
    assert rc == 2 and "already exists; pass --overwrite" in capsys.readouterr().err
    assert sorted(os.listdir(small_dir)) == before and pretrained.model_config(small_dir).n_states == 8
    target = str(work["dir"] / "replace_me")
    cli.convert(os.path.join(FIX, "small_ckpt.pt"), work["small_yaml"], target, log=lambda s: None)
    cli.convert(os.path.join(FIX, "finetune_ckpt.pt"), work["ft_yaml"], target, overwrite=True, log=lambda s: None)
    assert pretrained.model_config(target).n_states == 14
    assert _no_leftovers(work["dir"], "replace_me") == ["replace_me"]


def test_failure_while_writing_leaves_nothing(work, monkeypatch):
    """A crash after the parameters are written but before the marker: no DIR, no temp dir."""
    real = pretrained._fsync_write

    def boom(path, text):
        if path.endswith(pretrained.MARKER):
            raise OSError("disk full (simulated)")
        real(path, text)

    monkeypatch.setattr(pretrained, "_fsync_write", boom)
    with pytest.raises(OSError, match="disk full"):
        cli.convert(os.path.join(FIX, "small_ckpt.pt"), work["small_yaml"], str(work["dir"] / "crashed"),
                    log=lambda s: None)
    assert _no_leftovers(work["dir"], "crashed") == []


def test_streaming_groups_equal_whole_assembly():
    """The converter's group-by-group stream reads every key exactly once, releases each after use,
    and produces exactly the arrays of the all-at-once assembly (split per block)."""
    sd = {k: v.numpy() for k, v in _state_dict("finetune_ckpt").items()}
    _, meta = _case("finetune_ckpt")
    section = dict(meta["config"])
    cfg, problems = cli.build_config(section, {k: v.shape for k, v in sd.items()}, "ft")
    assert problems == [] and cfg.learned_rope == "per_axis"
    reads, released = [], []
    groups = list(conv.assemble_groups(lambda k: reads.append(k) or sd[k], cfg, release=released.append))
    assert sorted(reads) == sorted(sd) and len(reads) == len(set(reads)) and released == reads
    whole = list(conv.split_groups(conv.assemble_params(sd.items(), cfg), cfg))
    assert [g for g, _ in groups] == [g for g, _ in whole] == ["base", "layer_000", "layer_001"]
    for (g, a), (_, b) in zip(groups, whole):
        fa, fb = parameters.flatten(a, sep=None), parameters.flatten(b, sep=None)
        assert fa.keys() == fb.keys() == conv.group_shapes(cfg)[g].keys()
        for k in fa:
            np.testing.assert_array_equal(fa[k], fb[k], err_msg=f"{g}: {k}")
    # one block's group holds that block's slice: e.g. per-axis RoPE of block 1, axis 2
    np.testing.assert_array_equal(parameters.flatten(groups[2][1], sep=None)[("space", "rope_freqs")][2],
                                  sd["blocks.1.space_mixing.rotary_emb.freqs.2"])
