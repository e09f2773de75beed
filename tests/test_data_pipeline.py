"""Training pipeline: mixture frequencies, downsampling, determinism, exact resume, workers, hosts, jitter."""
import jax
import numpy as np
import pytest

from walrus_jax.data import BatchSource, DatasetSpec, WellDataset, make_eval_datasets, make_train_pipeline
from conftest import write_test_dataset
from walrus_jax.models.config import ModelConfig
from walrus_jax.models.jitter import sample_jitter

WALL, OPEN, PERIODIC = 0, 1, 2


def _write(root, name, shape, n_traj=2, n_steps=14, bcs=None, seed=0):
    return write_test_dataset(root, name, shape, n_traj=n_traj, n_steps=n_steps, bcs=bcs, seed=seed)


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("mix"))
    return [_write(d, "flow_a", (32, 32), seed=1),
            _write(d, "box_b", (32, 32), bcs=[("WALL", "OPEN"), ("WALL", "WALL")], seed=2),
            _write(d, "MHD_64", (16, 16, 16), n_steps=10, seed=3)]  # a released 3D name: T/2, B/2


@pytest.fixture(scope="module")
def cfg():
    return ModelConfig.tiny()


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    assert a["dataset_name"] == b["dataset_name"] and a["batch_index"] == b["batch_index"]
    for k in ("input_fields", "output_fields", "constant_fields", "boundary_conditions", "field_indices",
              "padded_field_mask", "time_stride"):
        np.testing.assert_array_equal(a[k], b[k])
    if a["jitter"] is None:
        assert b["jitter"] is None
    else:
        np.testing.assert_array_equal(a["jitter"].patch_shift, b["jitter"].patch_shift)
        np.testing.assert_array_equal(a["jitter"].token_shift, b["jitter"].token_shift)


def test_mixture_frequencies_strides_and_rotations(roots):
    dss = [WellDataset(r, 6 if i < 2 else 3, 1, 1, 5, split="train", inflate_to_3d=True) for i, r in enumerate(roots)]
    src = BatchSource(dss, [2, 2, 1], [1.0, 1.0, 1.0], dss[0].vocab, seed=3, rotate=True)
    n = 3000
    plans = [src.plan(k) for k in range(n)]
    counts = np.bincount([p["dataset"] for p in plans], minlength=3)
    # system-uniform: each dataset 1/3 (binomial sd = sqrt(n p (1-p)) ~ 26), whatever its size
    assert np.all(np.abs(counts - n / 3) < 4 * np.sqrt(n * (1 / 3) * (2 / 3))), counts
    rots = np.bincount([p["rotation"] for p in plans], minlength=24)
    assert (rots > 0).all() and rots.max() < 3 * rots.mean()
    windows = np.concatenate([p["indices"] for p in plans if p["dataset"] == 0])
    assert windows.min() >= 0 and windows.max() < len(dss[0]) and len(np.unique(windows)) == len(dss[0])
    for p in plans[:300]:
        ds = dss[p["dataset"]]
        for i, dt in zip(p["indices"], p["strides"]):
            lo, hi = ds.stride_range(int(i))
            assert lo <= dt <= hi
    # max_dt_stride 5, capped where the window must fit: (14 - 1) // 6 = 2 (2D), (10 - 1) // 3 = 3 (3D)
    assert set(np.concatenate([p["strides"] for p in plans if p["dataset"] < 2])) == {1, 2}
    assert set(np.concatenate([p["strides"] for p in plans if p["dataset"] == 2])) == {1, 2, 3}
    weighted = BatchSource(dss, [2, 2, 1], [1.0, 2.0, 1.0], dss[0].vocab, seed=3, rotate=True)
    c = np.bincount([weighted.plan(k)["dataset"] for k in range(n)], minlength=3) / n
    np.testing.assert_allclose(c, [0.25, 0.5, 0.25], atol=0.04)


def test_batches_shapes_downsampling_and_jitter(roots, cfg):
    it = make_train_pipeline(roots, batch_size=2, n_steps_input=6, max_dt_stride=5, seed=0, cfg=cfg,
                             process_index=0, process_count=1)
    seen = set()
    for b in _take(it, 12):
        name = b["dataset_name"]
        seen.add(name)
        if name == "MHD_64":  # released step/batch downsampling 0.5
            assert b["input_fields"].shape == (1, 3, 16, 16, 16, 4)
        else:
            B, T, *sp, C = b["input_fields"].shape
            assert (B, T, C) == (2, 6, 4) and sorted(sp) == [1, 32, 32]
        assert b["output_fields"].shape[1] == 1 and b["boundary_conditions"].shape == (3, 2)
        assert b["field_indices"].tolist() == [3, 4, 5, 6]
        assert b["padded_field_mask"].sum() == (4 if name == "MHD_64" else 3)
        # the jitter is sample_jitter's draw for this batch's shape and BCs
        key = jax.random.fold_in(jax.random.PRNGKey(0), b["batch_index"])
        ref = sample_jitter(key, cfg, b["input_fields"].shape[2:-1], b["boundary_conditions"])
        np.testing.assert_array_equal(b["jitter"].patch_shift, np.asarray(ref.patch_shift))
        np.testing.assert_array_equal(b["jitter"].token_shift, np.asarray(ref.token_shift))
        # the singleton (inflated) axis is PERIODIC, wherever the rotation put it
        for a, n in enumerate(b["input_fields"].shape[2:-1]):
            if n == 1:
                assert b["boundary_conditions"][a].tolist() == [PERIODIC, PERIODIC]
    assert seen == {"flow_a", "box_b", "MHD_64"}
    assert it.vocab.n_states == 67
    it.close()


def test_determinism_and_exact_resume(roots, cfg):
    kw = dict(batch_size=2, n_steps_input=4, max_dt_stride=3, seed=7, cfg=cfg, process_index=0, process_count=1)
    a = make_train_pipeline(roots, **kw)
    first = _take(a, 3)
    state = a.get_state()
    rest = _take(a, 4)
    b = make_train_pipeline(roots, **kw)
    for x, y in zip(first, _take(b, 3)):
        _same(x, y)
    c = make_train_pipeline(roots, **kw)
    c.set_state(state)
    for x, y in zip(rest, _take(c, 4)):
        _same(x, y)
    d = make_train_pipeline(roots, **{**kw, "seed": 8})
    other = _take(d, 3)
    assert any(x["dataset_name"] != y["dataset_name"] or not np.array_equal(x["input_fields"], y["input_fields"])
               for x, y in zip(first, other))


@pytest.mark.slow
def test_multiworker_equals_single_worker_and_host_split(roots):
    kw = dict(batch_size=2, n_steps_input=4, max_dt_stride=2, seed=11, cfg=None)
    single = _take(make_train_pipeline(roots, **kw, process_index=0, process_count=1), 6)
    multi = make_train_pipeline(roots, **kw, worker_count=2, process_index=0, process_count=1)
    got = _take(multi, 6)
    state = multi.get_state()
    more = _take(multi, 2)
    multi.close()
    for x, y in zip(single, got):
        _same(x, y)
    resumed = make_train_pipeline(roots, **kw, worker_count=2, process_index=0, process_count=1)
    resumed.set_state(state)
    for x, y in zip(more, _take(resumed, 2)):
        _same(x, y)
    resumed.close()
    # two hosts (batch_size 2: the released 0.5 batch factor of MHD_64 gives it 1 row, not divisible by 2)
    with pytest.raises(ValueError, match=r"'MHD_64' .* batches of 1 samples .* not divisible by the 2 processes"):
        make_train_pipeline(roots, **kw, process_index=0, process_count=2)


def test_eval_datasets_and_vocab_check(roots, cfg):
    dss, vocab = make_eval_datasets(roots[:2], n_steps_input=4, split="train", max_rollout_steps=5)
    s = dss[0][1]
    assert s["input_fields"].shape == (4, 32, 32, 3) and s["output_fields"].shape == (5, 32, 32, 3)
    assert dss[1].trajectory(0)["fields"].shape == (14, 32, 32, 3)
    with pytest.raises(ValueError, match="need a field vocabulary of 67 rows but cfg.n_states = 10"):
        make_train_pipeline(roots, batch_size=1, n_steps_input=2, cfg=cfg.replace(n_states=10),
                            process_index=0, process_count=1)
    spec = DatasetSpec(roots[2], step_downsample_factor=1.0, batch_downsample_factor=1.0)
    it = make_train_pipeline([spec], batch_size=2, n_steps_input=2, seed=0, process_index=0, process_count=1,
                             rotate=False)
    b = next(it)
    assert b["input_fields"].shape == (2, 2, 16, 16, 16, 4)


def test_windows_without_replacement_and_recycled(roots):
    """Each dataset's windows come from a seeded permutation: every window once per pass, then a new pass."""
    dss = [WellDataset(r, n_steps_input=4, n_steps_output=1, split="train") for r in roots[:2]]
    src = BatchSource(dss, [3, 3], [1.0, 1.0], dss[0].vocab, seed=5, rotate=False)
    n_batches = 400
    per_ds = {0: [], 1: []}
    for k in range(n_batches):
        p = src.plan(k)
        per_ds[p["dataset"]].extend(p["indices"].tolist())
    for d, seen in per_ds.items():
        n_win = len(dss[d])
        assert len(seen) > 2 * n_win  # at least two full passes
        for a in range(0, len(seen) - n_win + 1, n_win):  # every full pass is a permutation
            assert sorted(seen[a:a + n_win]) == list(range(n_win))
        assert seen[:n_win] != seen[n_win:2 * n_win]  # passes are reshuffled
    # counting the draws before batch k needs no replay: the plan of a late batch alone is the same
    fresh = BatchSource(dss, [3, 3], [1.0, 1.0], dss[0].vocab, seed=5, rotate=False)
    np.testing.assert_array_equal(fresh.plan(n_batches - 1)["indices"], src.plan(n_batches - 1)["indices"])
    assert fresh.draws_before(10_000).sum() == 10_000  # across blocks of draws


def test_restricting_trajectories_and_samples(roots):
    ds = WellDataset(roots[0], n_steps_input=4, n_steps_output=1, split="train")
    per_traj = len(ds) // ds.n_trajectories
    assert ds.windows_of_first_trajectories(1) == per_traj and ds.windows_of_first_trajectories(99) == len(ds)
    src = BatchSource([ds], [3], [1.0], ds.vocab, seed=0, rotate=False, max_trajectories=1)
    seen = {int(i) for k in range(40) for i in src.plan(k)["indices"]}
    assert seen == set(range(per_traj))  # only trajectory 0's windows, every one of them
    src = BatchSource([ds], [3], [1.0], ds.vocab, seed=0, rotate=False, max_samples=5)
    assert {int(i) for k in range(20) for i in src.plan(k)["indices"]} == set(range(5))


def _stack_hosts(parts):
    """The global batch from the hosts' batches (rows in host order; shared entries must agree)."""
    out = dict(parts[0])
    for k in ("input_fields", "output_fields", "constant_fields", "time_stride"):
        out[k] = np.concatenate([p[k] for p in parts])
    for p in parts[1:]:
        assert p["batch_index"] == out["batch_index"] and p["dataset_name"] == out["dataset_name"]
        for k in ("boundary_conditions", "field_indices", "padded_field_mask"):
            np.testing.assert_array_equal(p[k], out[k])
        np.testing.assert_array_equal(p["jitter"].patch_shift, out["jitter"].patch_shift)
        np.testing.assert_array_equal(p["jitter"].token_shift, out["jitter"].token_shift)
    return out


@pytest.mark.parametrize("n_proc", [2, 4])
def test_hosts_read_only_their_rows_and_assemble_the_global_batch(roots, cfg, n_proc):
    """P simulated processes each read rows [p·B/P, (p+1)·B/P) of every global batch; stacked in
    process order they are exactly the one-process batches, in the same order, also across a resume."""
    kw = dict(batch_size=8, n_steps_input=4, max_dt_stride=3, seed=9, cfg=cfg)  # MHD_64: 4 rows; all 3 before and after the resume
    single = _take(make_train_pipeline(roots, **kw, process_index=0, process_count=1), 6)
    assert {b["dataset_name"] for b in single} == {"flow_a", "box_b", "MHD_64"}
    hosts = [make_train_pipeline(roots, **kw, process_index=p, process_count=n_proc) for p in range(n_proc)]
    first = [_take(h, 3) for h in hosts]
    states = [h.get_state() for h in hosts]
    for k in range(3):
        parts = [f[k] for f in first]
        for p in parts:
            assert p["input_fields"].shape[0] == single[k]["input_fields"].shape[0] // n_proc
        _same(single[k], _stack_hosts(parts))
    for h in hosts:
        h.close()
    resumed = [make_train_pipeline(roots, **kw, process_index=p, process_count=n_proc) for p in range(n_proc)]
    for h, st in zip(resumed, states):
        h.set_state(st)
    rest = [_take(h, 3) for h in resumed]
    for k in range(3):
        _same(single[3 + k], _stack_hosts([r[k] for r in rest]))
    # each host read only its own windows: the source's rows of batch k are a contiguous 1/P slice
    src = resumed[1].source
    plan = src.plan(4)
    n = len(plan["indices"]) // n_proc
    assert src.rows(4) == slice(n, 2 * n)
