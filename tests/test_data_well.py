"""WellDataset: every format feature on hand-built files, window indexing, strides, bad input."""
import os

import h5py
import numpy as np
import pytest

from walrus_jax.data import FieldVocabulary, WellDataset, WellFormatError
from walrus_jax.data.writer import WellBoundary, WellField, WellScalar, axis_boundaries, write_well_file

H, W, T_STEPS, B = 4, 6, 9, 3
WALL, OPEN, PERIODIC = 0, 1, 2


def val(f, b, t, i, j, c=0):
    """The value written at file f, trajectory b, step t, point (i, j), component c."""
    return 1000.0 * f + 100.0 * b + t + 0.01 * i + 0.001 * j + 0.0001 * c


def grid_vals(f, shape_lead, comps=()):
    b, t, i, j = np.meshgrid(*[np.arange(n) for n in shape_lead], indexing="ij")
    out = val(f, b, t, i, j)
    for c in comps:
        out = out[..., None] + 0.0001 * np.arange(c)
    return out


def write_full(path, f=0, n_steps=T_STEPS, n_traj=B, time_sv=False, fields_extra=None):
    base = grid_vals(f, (n_traj, n_steps, H, W))
    vec = base[..., None] + 0.0001 * np.arange(2)
    ten = base[..., None, None] + 0.0001 * (2 * np.arange(2)[:, None] + np.arange(2)[None, :])
    bnd = {}
    bnd.update(axis_boundaries("x", H, "WALL", "OPEN"))
    # y: a 2D wall mask covering the low face only partly -> not WALL (stays OPEN, the_well's rule);
    # the high face is fully periodic-marked -> PERIODIC.
    m = np.zeros((H, W), bool)
    m[:2, 0] = True
    bnd["y_wall_partial"] = WellBoundary("WALL", ["x", "y"], m)
    m2 = np.zeros(W, bool)
    m2[-1] = True
    bnd["z_high"] = WellBoundary("PERIODIC", ["y"], m2)
    t0 = {"pressure": WellField(base),
          "density": WellField(1.0 + np.arange(H * W, dtype=np.float64).reshape(H, W), time_varying=False,
                               sample_varying=False),
          # dim_varying [True, False], stored without the y axis: (B, T, H)
          "tracer": WellField(base[..., 0], dim_varying=[True, False]),
          # per-trajectory constant, dim_varying [False, True], stored with a singleton x axis
          "speed_of_sound": WellField(grid_vals(f, (n_traj, 1, 1, W))[:, 0], time_varying=False, dim_varying=[False, True])}
    t0.update(fields_extra or {})
    time = np.arange(n_steps) * 0.5 + 3.0
    if time_sv:
        time = np.stack([time + b for b in range(n_traj)])
    return write_well_file(
        path, dataset_name="toy", n_trajectories=n_traj, time=time, time_sample_varying=time_sv,
        coords={"x": np.linspace(0, 1, H), "y": np.linspace(0, 2, W)},
        t0_fields=t0, t1_fields={"velocity": WellField(vec)}, t2_fields={"D": WellField(ten)},
        scalars={"energy": WellScalar(np.arange(n_traj * n_steps, dtype=float).reshape(n_traj, n_steps),
                                      time_varying=True, sample_varying=True)},
        boundaries=bnd, simulation_parameters={"nu": 0.25})


@pytest.fixture(scope="module")
def two_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("well")
    write_full(str(d / "b.hdf5"), f=1, n_steps=T_STEPS + 2)
    write_full(str(d / "a.hdf5"), f=0)
    return str(d)


def test_every_format_feature(two_files):
    ds = WellDataset(two_files, n_steps_input=2, n_steps_output=1)
    # files sorted by path: a (f=0) then b (f=1)
    assert [os.path.basename(p) for p in ds.files_paths] == ["a.hdf5", "b.hdf5"]
    assert ds.field_names == ["pressure", "tracer", "velocity_x", "velocity_y", "D_xx", "D_xy", "D_yx", "D_yy",
                              "density", "speed_of_sound"]
    assert ds.field_tensor_orders.tolist() == [0, 0, 1, 1, 2, 2, 2, 2, 0, 0]
    assert ds.field_indices.tolist() == [3, 54, 4, 5, 10, 11, 13, 14, 28, 8]
    windows_a, windows_b = T_STEPS - 2, T_STEPS + 2 - 2
    assert len(ds) == B * windows_a + B * windows_b
    # index -> (file 1, trajectory 2, start 3), the_well order: file, trajectory, start
    i = B * windows_a + 2 * windows_b + 3
    assert ds.locate(i) == (1, 2, 3)
    s = ds[i]
    assert s["input_fields"].shape == (2, H, W, 8) and s["output_fields"].shape == (1, H, W, 8)
    frames = np.concatenate([s["input_fields"], s["output_fields"]])
    for k, t in enumerate([3, 4, 5]):
        np.testing.assert_allclose(frames[k, ..., 0], grid_vals(1, (3, T_STEPS + 2, H, W))[2, t], rtol=1e-6)
        # tracer: dim_varying [True, False] broadcast along y
        np.testing.assert_allclose(frames[k, ..., 1], np.repeat(grid_vals(1, (3, T_STEPS + 2, H, W))[2, t, :, :1], W, 1),
                                   rtol=1e-6)
        np.testing.assert_allclose(frames[k, 1, 2, 2:4], val(1, 2, t, 1, 2) + 0.0001 * np.arange(2), rtol=1e-6)
        np.testing.assert_allclose(frames[k, 1, 2, 4:8], val(1, 2, t, 1, 2) + 0.0001 * np.array([0, 1, 2, 3]), rtol=1e-6)
    assert s["constant_fields"].shape == (H, W, 2)
    np.testing.assert_array_equal(s["constant_fields"][..., 0], 1.0 + np.arange(H * W).reshape(H, W))
    np.testing.assert_allclose(s["constant_fields"][..., 1], np.broadcast_to(val(1, 2, 0, 0, np.arange(W)), (H, W)), rtol=1e-6)
    # BCs: x [WALL, OPEN]; y low partly wall -> OPEN, y high PERIODIC
    assert s["boundary_conditions"].tolist() == [[WALL, OPEN], [OPEN, PERIODIC]]
    # scalars: time varying energy, constant nu
    np.testing.assert_array_equal(s["input_scalars"][:, 0], [2 * (T_STEPS + 2) + 3, 2 * (T_STEPS + 2) + 4])
    np.testing.assert_array_equal(s["output_scalars"][:, 0], [2 * (T_STEPS + 2) + 5])
    np.testing.assert_array_equal(s["constant_scalars"], [0.25])
    # grids: relative time, meshgrid of coordinates
    np.testing.assert_allclose(s["input_time_grid"], [0.0, 0.5])
    np.testing.assert_allclose(s["output_time_grid"], [1.0])
    np.testing.assert_allclose(s["space_grid"][2, 3], [2 / 3, 3 * 2 / 5], rtol=1e-6)
    assert int(s["trajectory_index"]) == B + 2 and int(s["time_index"]) == 3 and int(s["time_stride"]) == 1
    assert ds.metadata.field_names[1] == ["velocity_x", "velocity_y"]
    assert ds.metadata.constant_field_names[0] == ["density", "speed_of_sound"]


def test_time_sample_varying_and_single_file(tmp_path):
    p = write_full(str(tmp_path / "one.h5"), time_sv=True)
    ds = WellDataset(p, 1, 1, normalize_time_grid=False)
    s = ds.read(ds.locate.__self__._offsets[0] + 1 * (T_STEPS - 1) + 2)  # trajectory 1, start 2
    np.testing.assert_allclose(s["input_time_grid"], [3.0 + 1 + 1.0])


def test_strides_and_windows(two_files):
    ds = WellDataset(two_files, n_steps_input=2, n_steps_output=1, min_dt_stride=1, max_dt_stride=3, seed=5)
    s = ds.read(0, 3)  # file a, trajectory 0, start 0, frames 0, 3, 6
    np.testing.assert_allclose(np.concatenate([s["input_fields"], s["output_fields"]])[:, 0, 0, 0],
                               [val(0, 0, t, 0, 0) for t in (0, 3, 6)], rtol=1e-6)
    assert s["time_stride"] == 3
    np.testing.assert_allclose(s["input_time_grid"], [0.0, 1.5])
    # the_well's largest usable stride: (T - t0 - 1) // (T_in + T_out - 1)
    assert ds.stride_range(0) == (1, 3)
    assert ds.stride_range(5) == (1, 1)  # start 5 of 9 steps: (9 - 5 - 1) // 2 = 1
    # __getitem__ draws the stride from (seed, index): deterministic, always within range
    draws = [int(ds[i]["time_stride"]) for i in range(4)]
    assert draws == [int(ds[i]["time_stride"]) for i in range(4)]
    for i in range(0, len(ds), 5):
        lo, hi = ds.stride_range(i)
        assert lo <= int(ds[i]["time_stride"]) <= hi
    with pytest.raises(ValueError, match="needs step 9, but trajectories have 9 steps"):
        ds.read(1, 4)


def test_full_trajectory_mode_and_trajectory(two_files):
    ds = WellDataset(two_files, n_steps_input=2, full_trajectory_mode=True)
    assert len(ds) == 2 * B and ds.n_steps_output == T_STEPS - 2  # shortest file decides
    s = ds[B + 1]
    np.testing.assert_allclose(s["output_fields"][:, 0, 0, 0], [val(1, 1, t, 0, 0) for t in range(2, T_STEPS)], rtol=1e-6)
    tr = ds.trajectory(B + 1)
    assert tr["fields"].shape == (T_STEPS + 2, H, W, 8)
    np.testing.assert_allclose(tr["fields"][:, 0, 0, 0], [val(1, 1, t, 0, 0) for t in range(T_STEPS + 2)], rtol=1e-6)
    assert tr["boundary_conditions"].tolist() == [[WALL, OPEN], [OPEN, PERIODIC]]
    assert list(tr["field_names"][-2:]) == ["density", "speed_of_sound"] and tr["time_grid"].shape == (T_STEPS + 2,)


def test_field_transforms_rename(two_files):
    ds = WellDataset(two_files, 1, 1, field_transforms={"density": "torch.log10", "pressure": "zeros_like"},
                     allow_new_fields=True)
    assert ds.field_names[0] == "zeros_like_pressure" and ds.field_names[-2] == "log10_density"
    assert ds.field_indices[-2] == 55
    s = ds[0]
    assert (s["input_fields"][..., 0] == 0).all()
    np.testing.assert_allclose(s["constant_fields"][..., 0], np.log10(1.0 + np.arange(H * W).reshape(H, W)), rtol=1e-6)
    ds0 = WellDataset(two_files, 1, 1, field_transforms={"density": "zeros_like"})
    assert ds0.field_indices[-2] == 7  # zeros_like_density, as the released acoustic datasets


def test_unknown_field_needs_a_map(tmp_path):
    p = write_full(str(tmp_path / "u.hdf5"), fields_extra={"vorticity": WellField(np.zeros((B, T_STEPS, H, W)))})
    with pytest.raises(KeyError, match=r"fields \['vorticity'\] are not in the field vocabulary"):
        WellDataset(p, 1, 1)
    ds = WellDataset(p, 1, 1, allow_new_fields=True)
    assert ds.vocab.index("vorticity") == 67 and ds.vocab.n_states == 68
    ds2 = WellDataset(p, 1, 1, vocab=FieldVocabulary({**FieldVocabulary.released().to_dict(), "vorticity": 70}))
    assert ds2.field_indices[ds2.field_names.index("vorticity")] == 70


# ------------------------------------------------------------------------------------ bad input
def test_not_hdf5(tmp_path):
    (tmp_path / "x.hdf5").write_text("hello")
    with pytest.raises(WellFormatError, match=r"x.hdf5: not an HDF5 file"):
        WellDataset(str(tmp_path), 1, 1)


def test_bad_file_among_good_ones_is_reported(tmp_path):
    write_full(str(tmp_path / "a.hdf5"))
    write_full(str(tmp_path / "c.hdf5"))
    p = write_full(str(tmp_path / "b.hdf5"))
    with h5py.File(p, "a") as f:
        del f["t1_fields"]
    with pytest.raises(WellFormatError, match=r"(?s)1 of 3 files .*b.hdf5: missing group 't1_fields'"):
        WellDataset(str(tmp_path), 1, 1)


def test_missing_attribute(tmp_path):
    p = write_full(str(tmp_path / "a.hdf5"))
    with h5py.File(p, "a") as f:
        del f["t0_fields"]["pressure"].attrs["time_varying"]
    with pytest.raises(WellFormatError, match=r"a.hdf5: t0_fields/pressure: missing attribute 'time_varying'"):
        WellDataset(p, 1, 1)
    p2 = write_full(str(tmp_path / "b.hdf5"))
    with h5py.File(p2, "a") as f:
        del f.attrs["n_trajectories"]
    with pytest.raises(WellFormatError, match=r"b.hdf5: missing attribute 'n_trajectories'"):
        WellDataset(p2, 1, 1)


def test_shape_mismatch(tmp_path):
    p = write_full(str(tmp_path / "a.hdf5"), fields_extra={"energy": WellField(np.zeros((B, T_STEPS, H, W + 1)))})
    with pytest.raises(WellFormatError, match=r"t0_fields/energy: shape \(3, 9, 4, 7\) does not match .*expected \(3, 9, 4, 6\)"):
        WellDataset(p, 1, 1)


def test_files_that_disagree(tmp_path):
    write_full(str(tmp_path / "a.hdf5"))
    write_full(str(tmp_path / "b.hdf5"), fields_extra={"energy": WellField(np.zeros((B, T_STEPS, H, W)))})
    with pytest.raises(WellFormatError, match=r"b.hdf5: fields = .* differs from .*a.hdf5"):
        WellDataset(str(tmp_path), 1, 1)


def test_nan_is_reported_with_file_field_trajectory_step(tmp_path):
    base = np.zeros((B, T_STEPS, H, W))
    base[1, 6, 2, 3] = np.nan
    p = write_full(str(tmp_path / "a.hdf5"), fields_extra={"energy": WellField(base)})
    ds = WellDataset(p, 2, 1)
    ds.read(0)  # trajectory 0 is clean
    with pytest.raises(WellFormatError, match=r"a.hdf5: t0_fields/energy has NaN/Inf in trajectory 1 at time step 6, "
                                              r"position \(2, 3\)"):
        ds.read(ds.locate.__self__._windows[0] * 1 + 4)  # trajectory 1, start 4: frames 4, 5, 6
    with pytest.raises(WellFormatError, match="trajectory 1 at time step 6"):
        ds.validate()


def test_window_longer_than_trajectory(tmp_path):
    p = write_full(str(tmp_path / "a.hdf5"))
    with pytest.raises(WellFormatError, match=r"a.hdf5: trajectories have 9 steps, fewer than a window needs: 6 input "
                                              r"\+ 2 output steps at stride 2 span 15 steps"):
        WellDataset(p, 6, 2, min_dt_stride=2, max_dt_stride=2)


def test_missing_split_hint(tmp_path):
    write_full(str(tmp_path / "ds" / "data" / "train" / "a.hdf5"))
    with pytest.raises(WellFormatError, match="pass split='train'"):
        WellDataset(str(tmp_path / "ds"), 1, 1)
    assert len(WellDataset(str(tmp_path / "ds"), 1, 1, split="train")) == B * (T_STEPS - 1)


def test_memory_is_flat_over_many_reads(two_files):
    import resource
    ds = WellDataset(two_files, 2, 1)
    for i in range(200):
        ds[i % len(ds)]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for i in range(1500):
        ds[i % len(ds)]
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert after - before < 20_000  # kB: no growth with reads (no handle or array caching)
