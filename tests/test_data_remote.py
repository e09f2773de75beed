"""Data over HTTP: a server on 127.0.0.1 (started by the test, stopped with it) serves small Well
datasets; windows, trajectories, training batches, listings and stats.yaml read through it equal
those read from disk, and a missing object, refused credentials or an unknown store raise one
clear error naming the URL."""
import os

import numpy as np
import pytest

from walrus_jax import main
from walrus_jax.data.resolve import resolve_data
from walrus_jax.data import BatchSource, WellDataset, filesystem, make_train_pipeline
from walrus_jax.data.serve import serving
from walrus_jax.data.stats import compute_stats, load_stats
from conftest import write_test_dataset
from walrus_jax.errors import ConfigError, PathError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")


def _write(root, name, shape, n_files=2, n_traj=2, n_steps=12, seed=0):
    return write_test_dataset(root, name, shape, n_files=n_files, n_traj=n_traj, n_steps=n_steps, seed=seed)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(local folder, server) with two datasets, one with stats.yaml; the server stops after the module."""
    d = str(tmp_path_factory.mktemp("remote"))
    _write(d, "flow_a", (16, 16), seed=1)
    _write(d, "flow_b", (8, 8, 8), n_files=1, seed=2)
    compute_stats(os.path.join(d, "flow_a"))
    with serving(d, forbidden=("/private",)) as srv:
        yield d, srv
    filesystem.close_all()


def _same_sample(a, b):
    for k in ("input_fields", "output_fields", "constant_fields", "input_scalars", "boundary_conditions",
              "space_grid", "input_time_grid", "output_time_grid", "field_indices", "time_stride"):
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert a["field_names"].tolist() == b["field_names"].tolist()


def test_windows_and_trajectories_over_http_equal_disk(served):
    local, srv = served
    url = f"{srv.url}/flow_a"
    disk = WellDataset(os.path.join(local, "flow_a"), 4, 1, 1, 3, split="train", inflate_to_3d=True)
    web = WellDataset(url, 4, 1, 1, 3, split="train", inflate_to_3d=True)
    assert web.files_paths == [f"{url}/data/train/flow_a_{i}.hdf5" for i in range(2)]
    assert len(web) == len(disk) == 2 * 2 * 8 and web.field_names == disk.field_names
    for i, dt in [(0, 1), (2, 2), (16, 2), (26, 1), (31, 1)]:
        _same_sample(web.read(i, dt), disk.read(i, dt))
    np.testing.assert_array_equal(web.trajectory(3)["fields"], disk.trajectory(3)["fields"])
    # one file, by URL, with no split
    one = WellDataset(f"{srv.url}/flow_b/data/train/flow_b.hdf5", 2, 1)
    _same_sample(one[3], WellDataset(os.path.join(local, "flow_b", "data", "train", "flow_b.hdf5"), 2, 1)[3])


def test_training_batches_over_http_equal_disk_on_two_hosts(served):
    local, srv = served
    kw = dict(batch_size=4, n_steps_input=4, max_dt_stride=2, seed=3, cfg=None)
    disk = make_train_pipeline([os.path.join(local, n) for n in ("flow_a", "flow_b")], **kw,
                               process_index=0, process_count=1)
    ref = [next(disk) for _ in range(4)]
    assert {b["dataset_name"] for b in ref} == {"flow_a", "flow_b"}
    for p in range(2):
        web = make_train_pipeline([f"{srv.url}/flow_a", f"{srv.url}/flow_b"], **kw, process_index=p, process_count=2)
        for r in ref:
            b = next(web)
            assert b["batch_index"] == r["batch_index"] and b["dataset_name"] == r["dataset_name"]
            for k in ("input_fields", "output_fields", "constant_fields", "time_stride"):
                np.testing.assert_array_equal(b[k], r[k][2 * p:2 * p + 2], err_msg=k)


def test_data_root_listing_and_stats_over_http(served):
    local, srv = served
    cfg = main.load_config(TINY, [f"data.root={srv.url}/"])
    assert resolve_data(cfg) == [f"{srv.url}/flow_a", f"{srv.url}/flow_b"]
    cfg = main.load_config(TINY, [f"data.root={srv.url}", "data.datasets=flow_b"])
    assert resolve_data(cfg) == [f"{srv.url}/flow_b"]
    names = ["pressure", "velocity_x", "velocity_y", "velocity_z"]
    web = load_stats(f"{srv.url}/flow_a", names, keys=("rms", "rms_delta", "mean"))
    disk = load_stats(os.path.join(local, "flow_a"), names, keys=("rms", "rms_delta", "mean"))
    for k in disk:
        np.testing.assert_array_equal(web[k], disk[k])
    assert web["rms"][3] == 0 and web["rms"][0] > 0  # velocity_z: added by inflation
    with pytest.raises(PathError, match=f"{srv.url}/flow_b/stats.yaml: no such file"):
        load_stats(f"{srv.url}/flow_b", names)


def test_remote_errors_name_the_url(served, monkeypatch):
    _, srv = served
    with pytest.raises(PathError, match=f"{srv.url}/flow_a/data/train/missing.hdf5: no such bucket, object"):
        WellDataset(f"{srv.url}/flow_a/data/train/missing.hdf5", 2, 1)
    with pytest.raises(ValueError, match=f"{srv.url}/nothing/data/train: no such file or directory"):
        WellDataset(f"{srv.url}/nothing", 2, 1, split="train")
    with pytest.raises(PathError, match=f"{srv.url}/private/a.hdf5: access denied; check this store's credentials"):
        WellDataset(f"{srv.url}/private/a.hdf5", 2, 1)
    with open(os.path.join(served[0], "junk.hdf5"), "w") as fh:
        fh.write("not HDF5\n" * 100)
    with pytest.raises(ValueError, match=f"{srv.url}/junk.hdf5: not an HDF5 file"):
        WellDataset(f"{srv.url}/junk.hdf5", 2, 1)
    with pytest.raises(FileNotFoundError, match=r"data.root='http://127.0.0.1:1/none' does not exist|"
                                                r"http://127.0.0.1:1/none: cannot be read"):
        resolve_data(main.load_config(TINY, ["data.root=http://127.0.0.1:1/none"]))
    with pytest.raises(ConfigError, match="nosuch://bucket/x.hdf5: unknown protocol 'nosuch'"):
        WellDataset("nosuch://bucket/x.hdf5", 2, 1)
    # a store whose package is not installed (as gs:// without gcsfs): the error names URL and package
    import importlib

    registry = importlib.import_module("fsspec.registry")  # the module (fsspec.registry is a mapping)
    monkeypatch.setitem(registry.known_implementations, "wjtest",
                        {"class": "walrus_jax_no_such_pkg.FS", "err": "Install walrus_jax_no_such_pkg"})
    with pytest.raises(ConfigError, match=r"wjtest://bucket/ds/data/train: reading wjtest:// needs an fsspec implementation "
                                          r"of wjtest://: Install walrus_jax_no_such_pkg"):
        WellDataset("wjtest://bucket/ds", 2, 1, split="train")


def test_remote_file_blocks_and_direct_reads(served):
    """Small reads come from cached blocks (one request per block), large ones in one exact request."""
    local, srv = served
    path = os.path.join(local, "flow_a", "data", "train", "flow_a_0.hdf5")
    with open(path, "rb") as fh:
        data = fh.read()
    f = filesystem.RemoteFile(f"{srv.url}/flow_a/data/train/flow_a_0.hdf5", block_size=4096, max_blocks=2)
    assert f.size == len(data)
    srv.reset_counts()
    for start, n in [(0, 8), (100, 50), (4090, 20), (4100, 10), (len(data) - 5, 100)]:
        f.seek(start)
        assert f.read(n) == data[start:start + n]
    # blocks 0 (1 request), 0+1 -> only 1 missing (1 request), 1 (cached), last (1 request)
    assert srv.reset_counts()["requests"] == 3
    f.seek(10_000)
    assert f.read(9000) == data[10_000:19_000]
    assert srv.reset_counts() == {"requests": 1, "bytes": 9000}
    assert len(f._blocks) == 2  # LRU bound


def test_window_read_ahead_fetches_exactly_its_frames_at_once(served):
    """A window of contiguous fields costs one concurrent request per run of adjacent frames and
    exactly their bytes (no block overfetch); the file's metadata is fetched once, when opened."""
    _, srv = served
    ds = WellDataset(f"{srv.url}/flow_a", 4, 1, 1, 2, split="train")
    ds.read(0, 1)  # opens the file, caches its metadata blocks and small arrays
    frame = 16 * 16 * 4  # float32 pressure; velocity: twice that
    srv.reset_counts()
    ds.read(8, 1)  # trajectory 1, t0 0: 5 adjacent frames per field
    assert srv.reset_counts() == {"requests": 2, "bytes": 5 * frame * 3}
    ds.read(9, 2)  # t0 1, stride 2: 5 separate frames per field, fetched together
    assert srv.reset_counts() == {"requests": 10, "bytes": 5 * frame * 3}


@pytest.mark.slow
def test_grain_workers_read_over_http(served):
    """Worker processes open their own remote files (the per-process cache starts empty in them)."""
    local, srv = served
    kw = dict(batch_size=2, n_steps_input=4, max_dt_stride=2, seed=1, cfg=None, process_index=0, process_count=1)
    disk = make_train_pipeline([os.path.join(local, "flow_a")], **kw)
    web = make_train_pipeline([f"{srv.url}/flow_a"], **kw, worker_count=1)
    try:
        for _ in range(4):
            a, b = next(disk), next(web)
            np.testing.assert_array_equal(a["input_fields"], b["input_fields"])
            np.testing.assert_array_equal(a["output_fields"], b["output_fields"])
    finally:
        web.close()


def test_bytes_per_host_fall_as_one_over_processes(served):
    """Host p of P fetches exactly the frames of its B/P rows of every global batch: with the files'
    metadata cached, 1, 2 and 4 hosts fetch 4, 2 and 1 windows' bytes per batch, and the hosts'
    bytes add up to the one host's."""
    _, srv = served
    ds = WellDataset(f"{srv.url}/flow_a", 4, 1, 1, 3, split="train")
    ds.read(0), ds.read(len(ds) - 1)  # open both files: metadata and small arrays cached
    window = 5 * 3 * 16 * 16 * 4  # (4 + 1) frames of pressure + velocity (2 components), float32
    n_batches = 6
    for n_proc in (1, 2, 4):
        per_host = []
        for p in range(n_proc):
            src = BatchSource([ds], [4], [1.0], ds.vocab, seed=2, rotate=False, process_index=p, process_count=n_proc)
            srv.reset_counts()
            for k in range(n_batches):
                assert src.load(k)["input_fields"].shape[0] == 4 // n_proc
            per_host.append(srv.reset_counts()["bytes"])
        assert per_host == [n_batches * (4 // n_proc) * window] * n_proc, (n_proc, per_host)
