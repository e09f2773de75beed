"""Arrays -> Well file / dataset folder (walrus_jax.data.from_arrays) and stats.yaml
(walrus_jax.data.stats): round trips through WellDataset, statistics against numpy, and every
kind of bad input refused with a message that names what is wrong."""
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import yaml

from walrus_jax.data import stats as data_stats
from walrus_jax.data.from_arrays import split_trajectories, write_dataset, write_arrays
from walrus_jax.data.well import WellDataset
from walrus_jax.errors import DataError, PathError, UserError
from walrus_jax.models.config import OPEN, PERIODIC, WALL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _arrays(seed=0, b=3, t=6, nx=8, ny=6):
    rng = np.random.default_rng(seed)
    return {
        "my_tracer": rng.normal(size=(b, t, nx, ny)).astype(np.float32),
        "velocity": (rng.normal(1.0, 2.0, size=(b, t, nx, ny, 2)).astype(np.float32), 1),
        "stress": (rng.normal(size=(b, t, nx, ny, 2, 2)).astype(np.float32), 2),
    }, {"speed_of_sound": rng.uniform(1, 2, size=(b, nx, ny)).astype(np.float32),
        "wind": (rng.normal(size=(nx, ny, 2)).astype(np.float32), 1)}


KW = dict(dataset_name="mine", boundary_conditions={"x": "periodic", "y": ("wall", "open")}, dt=0.25,
          spacing=(0.5, 0.25))


def test_round_trip_windows_and_trajectories(tmp_path):
    fields, consts = _arrays()
    path = write_arrays(tmp_path / "a.hdf5", fields, constant_fields=consts, **KW)
    ds = WellDataset(path, n_steps_input=2, n_steps_output=1, allow_new_fields=True)
    assert ds.field_names == ["my_tracer", "velocity_x", "velocity_y", "stress_xx", "stress_xy", "stress_yx",
                              "stress_yy", "speed_of_sound", "wind_x", "wind_y"]
    assert len(ds) == 3 * (6 - 2)  # trajectories x windows of 3 frames at stride 1
    var = np.concatenate([fields["my_tracer"][..., None], fields["velocity"][0],
                          fields["stress"][0].reshape(3, 6, 8, 6, 4)], -1)
    for i in range(len(ds)):
        s = ds[i]
        j, t0 = i // 4, i % 4
        np.testing.assert_array_equal(s["input_fields"], var[j, t0:t0 + 2])
        np.testing.assert_array_equal(s["output_fields"], var[j, t0 + 2:t0 + 3])
        np.testing.assert_array_equal(s["constant_fields"], np.concatenate(
            [consts["speed_of_sound"][j][..., None], consts["wind"][0]], -1))
        np.testing.assert_allclose(s["input_time_grid"], [0.0, 0.25])
    assert s["boundary_conditions"].tolist() == [[PERIODIC, PERIODIC], [WALL, OPEN]]
    np.testing.assert_allclose(s["space_grid"][1, 2], [0.5, 0.5])
    tr = ds.trajectory(2)
    np.testing.assert_array_equal(tr["fields"], var[2])
    # Unknown names get new vocabulary rows; known ones keep the released index.
    assert ds.field_indices[1] == 4 and ds.field_indices[0] >= 67
    ds.validate()


def test_dataset_layout_and_stats_match_numpy(tmp_path):
    fields, consts = _arrays(b=5)
    d = write_dataset(tmp_path, "mine", fields, constant_fields=consts,
                      splits={"train": 0.6, "valid": 0.2, "test": 0.2}, **{k: v for k, v in KW.items()
                                                                            if k != "dataset_name"})
    assert d == str(tmp_path / "mine")
    for split, n in (("train", 3), ("valid", 1), ("test", 1)):
        ds = WellDataset(d, split=split, allow_new_fields=True)
        assert ds.n_trajectories == n
    np.testing.assert_array_equal(WellDataset(d, split="valid", allow_new_fields=True).trajectory(0)["fields"][..., 0],
                                  fields["my_tracer"][3])
    stats = yaml.safe_load(open(os.path.join(d, "stats.yaml")))
    assert list(stats) == list(data_stats.STAT_KEYS)
    tr = fields["my_tracer"][:3].astype(np.float64)
    vel = fields["velocity"][0][:3].astype(np.float64)
    stress = fields["stress"][0][:3].astype(np.float64)
    np.testing.assert_allclose(stats["mean"]["my_tracer"], tr.mean(), rtol=1e-12)
    np.testing.assert_allclose(stats["std"]["my_tracer"], tr.std(), rtol=1e-12)
    np.testing.assert_allclose(stats["rms"]["velocity"], np.sqrt((vel ** 2).mean((0, 1, 2, 3))), rtol=1e-12)
    np.testing.assert_allclose(stats["std"]["stress"], stress.std((0, 1, 2, 3)), rtol=1e-12)
    assert np.shape(stats["std"]["stress"]) == (2, 2)
    dv = np.diff(vel, axis=1)
    np.testing.assert_allclose(stats["mean_delta"]["velocity"], dv.mean((0, 1, 2, 3)), rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(stats["std_delta"]["velocity"], dv.std((0, 1, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(stats["rms_delta"]["my_tracer"], np.sqrt((np.diff(tr, axis=1) ** 2).mean()), rtol=1e-12)
    # Constant fields: statistics as stored (a shared field once, not per trajectory), no deltas.
    np.testing.assert_allclose(stats["rms"]["wind"], np.sqrt((consts["wind"][0].astype(np.float64) ** 2).mean((0, 1))),
                               rtol=1e-6)
    np.testing.assert_allclose(stats["mean"]["speed_of_sound"], consts["speed_of_sound"][:3].astype(np.float64).mean(),
                               rtol=1e-12)
    assert "wind" not in stats["rms_delta"] and "speed_of_sound" not in stats["mean_delta"]


def test_stats_streams_in_slabs(tmp_path, monkeypatch):
    """Tiny slabs (2 frames) give the same statistics as whole trajectories."""
    fields, _ = _arrays(t=7)
    write_arrays(tmp_path / "d" / "data" / "train" / "a.hdf5", fields, **KW)
    whole = data_stats.compute_stats(tmp_path / "d", out="")
    monkeypatch.setattr(data_stats, "SLAB_ELEMENTS", 8 * 6 * 4)
    sliced = data_stats.compute_stats(tmp_path / "d", out="")
    for k in data_stats.STAT_KEYS:
        for name in whole[k]:
            np.testing.assert_allclose(sliced[k][name], whole[k][name], rtol=1e-12, atol=1e-15)


def test_load_stats_per_channel(tmp_path):
    fields, consts = _arrays(b=4)
    d = write_dataset(tmp_path, "mine", fields, constant_fields=consts, splits={"train": [0, 1, 2], "valid": [3]},
                      **{k: v for k, v in KW.items() if k != "dataset_name"})
    stats = yaml.safe_load(open(os.path.join(d, "stats.yaml")))
    names = ["my_tracer", "velocity_x", "velocity_y", "velocity_z", "stress_yx", "speed_of_sound", "zeros_like_density"]
    got = data_stats.load_stats(d, names, padded_field_mask=[True, True, True, False, True])
    assert got["rms"].dtype == np.float32 and got["rms"].shape == (7,)
    np.testing.assert_allclose(got["rms"], [stats["rms"]["my_tracer"], *stats["rms"]["velocity"], 0.0,
                                            stats["rms"]["stress"][1][0], stats["rms"]["speed_of_sound"], 0.0], rtol=1e-7)
    np.testing.assert_allclose(got["rms_delta"], [stats["rms_delta"]["my_tracer"], *stats["rms_delta"]["velocity"], 0.0,
                                                  stats["rms_delta"]["stress"][1][0], 0.0, 0.0], rtol=1e-7)
    same = data_stats.load_stats(os.path.join(d, "stats.yaml"), ["velocity_y"], keys=("mean",))
    np.testing.assert_allclose(same["mean"], [stats["mean"]["velocity"][1]], rtol=1e-7)
    with pytest.raises(DataError, match=r"rms has no entry for channel 'pressure'"):
        data_stats.load_stats(d, ["my_tracer", "pressure"])
    # 2D data inflated to 3D: the added components are recognized by name (constant fields too).
    inflated = data_stats.load_stats(d, ["velocity_z", "stress_xz", "stress_zz", "wind_z", "wind_x"])
    np.testing.assert_array_equal(inflated["rms"], [0, 0, 0, 0, np.float32(stats["rms"]["wind"][0])])
    np.testing.assert_array_equal(inflated["rms_delta"], [0, 0, 0, 0, 0])
    with pytest.raises(DataError, match="no entry for channel 'velocity_w'"):
        data_stats.load_stats(d, ["velocity_w"])
    with pytest.raises(PathError, match="stats.yaml: no such file"):
        data_stats.load_stats(tmp_path, ["my_tracer"])
    with open(tmp_path / "partial.yaml", "w") as f:
        yaml.safe_dump({"rms": {"my_tracer": 1.0}}, f)
    with pytest.raises(DataError, match="missing top-level key 'rms_delta'"):
        data_stats.load_stats(tmp_path / "partial.yaml", ["my_tracer"])


def _bad(match, **changes):
    fields, consts = _arrays()
    kw = dict(KW, constant_fields=consts)
    fields.update(changes.pop("fields", {}))
    kw.update(changes)
    return match, fields, kw


B, T, NX, NY = 3, 6, 8, 6
BAD = [
    _bad(r"field 'u': axis 1 \(n_time\) has size 5, but field 'my_tracer' has 6", fields={"u": np.zeros((B, 5, NX, NY))}),
    _bad(r"field 'u': axis 2 \(x\) has size 7", fields={"u": np.zeros((B, T, 7, NY))}),
    _bad(r"field 'u': 3 axes with shape \(3, 6, 8\); a tensor-rank-0 field needs 4", fields={"u": np.zeros((B, T, NX))}),
    _bad(r"field 'w': a vector field on 2 spatial axes needs its last 1 axis of size 2 \(one component per axis\), got shape \(3, 6, 8, 6, 3\)",
         fields={"w": (np.zeros((B, T, NX, NY, 3)), 1)}),
    _bad(r"field 'w': tensor rank 3; expected 0 \(scalar\), 1 \(vector\) or 2", fields={"w": (np.zeros((B, T, NX, NY)), 3)}),
    _bad(r"field 'w': NaN/Inf .* at trajectory 1, time step 2, x 3, y 4",
         fields={"w": np.where(np.arange(B * T * NX * NY).reshape(B, T, NX, NY) == ((1 * T + 2) * NX + 3) * NY + 4,
                               np.nan, 0.0)}),
    _bad(r"field 'w': NaN/Inf \(after conversion to float32\)", fields={"w": np.full((B, T, NX, NY), 1e300)}),
    _bad(r"field 'w': dtype complex128", fields={"w": np.zeros((B, T, NX, NY), complex)}),
    _bad(r"unknown boundary condition 'reflective'", boundary_conditions={"x": "periodic", "y": "reflective"}),
    _bad(r"boundary_conditions: no entry for axes \['y'\]", boundary_conditions={"x": "periodic"}),
    _bad(r"axis 'z' is not one of \['x', 'y'\]", boundary_conditions={"x": "open", "y": "open", "z": "wall"}),
    _bad(r"\(periodic, wall\); a periodic axis is periodic at both ends", boundary_conditions={"x": ("periodic", "wall"), "y": "open"}),
    _bad(r"dt: 0.0; expected a positive number", dt=0.0),
    _bad(r"dt: -1.0; expected a positive number", dt=-1),
    _bad(r"time: expected finite, strictly increasing", dt=None, time=[0, 1, 1, 2, 3, 4]),
    _bad(r"spacing along y: 0.0; expected a positive number", spacing=(1.0, 0.0)),
    _bad(r"coords\['x'\]: shape \(7,\); expected \(8,\)", spacing=None, coords={"x": np.arange(7), "y": np.arange(6)}),
    _bad(r"constant field 'speed_of_sound': shape \(2, 8, 6\); expected \(3, 8, 6\) .* or \(8, 6\)",
         constant_fields={"speed_of_sound": np.ones((2, NX, NY))}),
    _bad(r"field 'velocity_x': its channel 'velocity_x' collides with field 'velocity'", fields={"velocity_x": np.zeros((B, T, NX, NY))}),
    _bad(r"field 'open_boundary': the name is reserved", fields={"open_boundary": np.zeros((B, T, NX, NY))}),
]


@pytest.mark.parametrize("match,fields,kw", BAD, ids=[b[0][:40] for b in BAD])
def test_bad_input_is_refused_before_writing(tmp_path, match, fields, kw):
    path = tmp_path / "a.hdf5"
    with pytest.raises(DataError, match=match):
        write_arrays(path, fields, **kw)
    assert not os.listdir(tmp_path)  # nothing written, no temporary left behind


def test_existing_outputs_are_kept(tmp_path):
    fields, _ = _arrays()
    path = write_arrays(tmp_path / "a.hdf5", fields, **KW)
    before = open(path, "rb").read()
    with pytest.raises(UserError, match="already exists"):
        write_arrays(path, {"x": np.zeros((1, 2, 4, 4))}, **KW)
    assert open(path, "rb").read() == before
    kw = {k: v for k, v in KW.items() if k != "dataset_name"}
    d = write_dataset(tmp_path / "root", "mine", fields, splits={"train": 0.7, "valid": 0.3}, **kw)
    with pytest.raises(UserError, match="already exists"):
        write_dataset(tmp_path / "root", "mine", fields, **kw)
    # A failing rewrite (bad bc) leaves the old dataset as it was and no temporary folder.
    with pytest.raises(DataError):
        write_dataset(tmp_path / "root", "mine", fields, overwrite=True, **dict(kw, boundary_conditions={"x": "bad"}))
    assert sorted(os.listdir(tmp_path / "root")) == ["mine"] and os.path.isfile(os.path.join(d, "stats.yaml"))


def test_split_trajectories():
    assert {k: v.tolist() for k, v in split_trajectories(10, {"train": 0.8, "valid": 0.1, "test": 0.1}).items()} == \
        {"train": list(range(8)), "valid": [8], "test": [9]}
    # Few trajectories: every split still gets one.
    assert {k: v.tolist() for k, v in split_trajectories(3, {"train": 0.9, "valid": 0.05, "test": 0.05}).items()} == \
        {"train": [0], "valid": [1], "test": [2]}
    with pytest.raises(DataError, match="2 trajectories cannot fill 3 splits"):
        split_trajectories(2, {"train": 1, "valid": 1, "test": 1})
    with pytest.raises(DataError, match="trajectory 1 is in both 'train' and 'valid'"):
        split_trajectories(3, {"train": [0, 1], "valid": [1]})
    with pytest.raises(DataError, match="unknown split names \\['val'\\]"):
        split_trajectories(3, {"train": 0.5, "val": 0.5})


def _cli(module, *args, cwd):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=120)


@pytest.mark.slow
def test_clis_end_to_end_and_one_line_errors(tmp_path, capsys):
    fields, consts = _arrays(b=4)
    np.savez(tmp_path / "run.npz", c=fields["my_tracer"], u=fields["velocity"][0])
    np.save(tmp_path / "sos.npy", consts["speed_of_sound"][:1].repeat(4, 0))
    r = _cli("walrus_jax.data.from_arrays", "--root", tmp_path / "root", "--name", "mine",
             "--field", f"my_tracer={tmp_path}/run.npz:c", "--vector", f"velocity={tmp_path}/run.npz:u",
             "--constant", f"speed_of_sound={tmp_path}/sos.npy", "--dt", "0.25", "--spacing", "0.5,0.25",
             "--bc", "x=periodic", "--bc", "y=wall,open", "--splits", "train=0.5,valid=0.25,test=0.25", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    d = tmp_path / "root" / "mine"
    ds = WellDataset(d, split="train", allow_new_fields=True)
    assert ds.n_trajectories == 2 and ds.field_names == ["my_tracer", "velocity_x", "velocity_y", "speed_of_sound"]
    np.testing.assert_array_equal(ds.trajectory(1)["fields"][..., 1:], fields["velocity"][0][1])
    before = open(d / "stats.yaml").read()
    os.remove(d / "stats.yaml")
    r = _cli("walrus_jax.data.stats", d, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(open(d / "stats.yaml")) == yaml.safe_load(before)
    # Mistakes: one line on stderr, exit status 2, no traceback.
    for module, args, message in [
        ("walrus_jax.data.stats", [tmp_path / "nowhere"], "nowhere: no such directory"),
        ("walrus_jax.data.stats", [tmp_path], "no data/train folder"),
        ("walrus_jax.data.stats", [d], "stats.yaml: already exists"),
        ("walrus_jax.data.stats", [], "the following arguments are required: dataset_dir"),
        ("walrus_jax.data.from_arrays_cli", ["--file", tmp_path / "x.hdf5", "--name", "m", "--field",
                                             f"a={tmp_path}/run.npz", "--dt", "1", "--spacing", "1"],
         "holds arrays ['c', 'u']: name one"),
        ("walrus_jax.data.from_arrays_cli", ["--file", tmp_path / "x.hdf5", "--name", "m", "--field",
                                             f"a={tmp_path}/run.npz:c", "--dt", "0", "--spacing", "1", "--bc", "x=open",
                                             "--bc", "y=open"], "dt: 0.0; expected a positive number"),
        ("walrus_jax.data.from_arrays_cli", ["--file", tmp_path / "x.hdf5", "--name", "m", "--field",
                                             f"a={tmp_path}/run.npz:c", "--dt", "1", "--spacing", "1", "--bc", "x=open",
                                             "--bc", "y=slippery"], "unknown boundary condition 'slippery'"),
        ("walrus_jax.data.from_arrays_cli", ["--file", tmp_path / "x.hdf5", "--name", "m", "--vector",
                                             f"a={tmp_path}/run.npz:c", "--dt", "1", "--spacing", "1"],
         "if it is a scalar field, give tensor rank 0"),
        ("walrus_jax.data.from_arrays_cli", ["--file", tmp_path / "x.hdf5", "--name", "m", "--field",
                                             f"a={tmp_path}/missing.npy", "--dt", "1", "--spacing", "1"],
         "missing.npy: no such file"),
    ]:
        code, err = _in_process(module, args, capsys)
        assert code == 2, (args, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, err)
    assert not os.path.exists(tmp_path / "x.hdf5")
    # The same through a real process (exit status, nothing on stdout, no traceback).
    r = _cli("walrus_jax.data.stats", tmp_path / "nowhere", cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1 and "no such directory" in r.stderr


def _in_process(module, args, capsys):
    import importlib

    capsys.readouterr()
    try:
        code = importlib.import_module(module).main([str(a) for a in args])
    except SystemExit as e:  # argparse mistakes
        code = e.code
    return code, capsys.readouterr().err


def test_stats_refuses_nan_and_bad_files(tmp_path):
    fields, _ = _arrays()
    p = write_arrays(tmp_path / "d" / "data" / "train" / "a.hdf5", fields, **KW)
    with h5py.File(p, "r+") as f:
        f["t0_fields/my_tracer"][1, 2, 3, 4] = np.nan
    with pytest.raises(DataError, match=r"a.hdf5: field 'my_tracer' holds NaN/Inf at trajectory 1 time step 2 "
                                        r"position \(3, 4\)"):
        data_stats.compute_stats(tmp_path / "d")
    assert not os.path.exists(tmp_path / "d" / "stats.yaml")
    os.remove(p)
    open(tmp_path / "d" / "data" / "train" / "b.hdf5", "w").write("not hdf5")
    with pytest.raises(DataError, match="b.hdf5: not an HDF5 file"):
        data_stats.compute_stats(tmp_path / "d")


def test_cli_single_file_with_time_coords_and_dim_names(tmp_path, capsys):
    fields, consts = _arrays()
    np.save(tmp_path / "u.npy", fields["velocity"][0])
    np.save(tmp_path / "wind.npy", consts["wind"][0])
    np.save(tmp_path / "t.npy", np.array([0, 1, 2, 4, 8, 16.0]))
    np.savez(tmp_path / "grid.npz", r=np.linspace(1, 2, 8), z=np.linspace(0, 1, 6))
    code, err = _in_process("walrus_jax.data.from_arrays_cli", [
        "--file", tmp_path / "one.hdf5", "--name", "cyl", "--vector", f"velocity={tmp_path}/u.npy",
        "--constant-vector", f"wind={tmp_path}/wind.npy", "--time", f"{tmp_path}/t.npy", "--coords",
        tmp_path / "grid.npz", "--dims", "r,z", "--bc", "r=wall,open", "--bc", "1=periodic", "--param", "nu=0.5"], capsys)
    assert code == 0, err
    ds = WellDataset(tmp_path / "one.hdf5", n_steps_input=2, allow_new_fields=True)
    assert ds.field_names == ["velocity_r", "velocity_z", "wind_r", "wind_z"]
    s = ds.read(3)
    np.testing.assert_array_equal(s["input_fields"], fields["velocity"][0][0, 3:5])
    np.testing.assert_allclose(s["input_time_grid"], [0.0, 4.0])  # relative to the window's first frame
    np.testing.assert_allclose(s["space_grid"][-1, -1], [2.0, 1.0])
    assert s["boundary_conditions"].tolist() == [[WALL, OPEN], [PERIODIC, PERIODIC]]
    with h5py.File(tmp_path / "one.hdf5") as f:
        assert float(f.attrs["nu"]) == 0.5


def test_stats_of_fields_stored_without_trajectory_axis(tmp_path):
    """A time-varying field shared by all trajectories (T, nx, ny): deltas along time (the_well's
    script would difference along x there), counted once per file as stored."""
    from walrus_jax.data.writer import WellField, axis_boundaries, write_well_file

    rng = np.random.default_rng(3)
    shared = rng.normal(size=(5, 4, 3))
    own = rng.normal(size=(2, 5, 4, 3))
    bcs = {**axis_boundaries("x", 4, "PERIODIC", "PERIODIC"), **axis_boundaries("y", 3, "WALL", "WALL")}
    write_well_file(tmp_path / "d" / "data" / "train" / "a.hdf5", dataset_name="s", n_trajectories=2,
                    time=np.arange(5.0), coords={"x": np.arange(4.0), "y": np.arange(3.0)}, boundaries=bcs,
                    t0_fields={"forcing": WellField(shared.astype(np.float32), sample_varying=False),
                               "u": WellField(own.astype(np.float32))})
    stats = data_stats.compute_stats(tmp_path / "d", out="")
    f32 = shared.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(stats["std"]["forcing"], f32.std(), rtol=1e-12)
    np.testing.assert_allclose(stats["rms_delta"]["forcing"], np.sqrt((np.diff(f32, axis=0) ** 2).mean()), rtol=1e-12)
    np.testing.assert_allclose(stats["mean_delta"]["u"], np.diff(own.astype(np.float32).astype(np.float64), axis=1).mean(),
                               rtol=1e-10, atol=1e-15)
