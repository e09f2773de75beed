"""walrus_jax.inference.metrics against hand computations (the_well definitions)."""
import math

import numpy as np
import pytest

from walrus_jax.inference import metrics


def test_spatial_metrics_hand_computed():
    # One sample, one step, a 2x2 grid, one channel: target [1,2,3,4], pred [1,2,3,5].
    target = np.array([1.0, 2.0, 3.0, 4.0], np.float32).reshape(1, 1, 2, 2, 1)
    pred = np.array([1.0, 2.0, 3.0, 5.0], np.float32).reshape(1, 1, 2, 2, 1)
    mse = 1.0 / 4.0
    mean_sq = (1 + 4 + 9 + 16) / 4.0  # 7.5
    var_unbiased = ((1 - 2.5) ** 2 + (2 - 2.5) ** 2 + (3 - 2.5) ** 2 + (4 - 2.5) ** 2) / 3.0  # 5/3
    eps = 1e-7
    np.testing.assert_allclose(metrics.mse(pred, target), [[[mse]]], rtol=1e-6)
    np.testing.assert_allclose(metrics.rmse(pred, target), [[[0.5]]], rtol=1e-6)
    np.testing.assert_allclose(metrics.nmse(pred, target), [[[mse / (mean_sq + eps)]]], rtol=1e-6)
    np.testing.assert_allclose(metrics.nrmse(pred, target), [[[math.sqrt(mse / (mean_sq + eps))]]], rtol=1e-6)
    np.testing.assert_allclose(metrics.vmse(pred, target), [[[mse / (var_unbiased + eps)]]], rtol=1e-6)
    np.testing.assert_allclose(metrics.vrmse(pred, target), [[[math.sqrt(mse / (var_unbiased + eps))]]], rtol=1e-6)


def test_epsilon_is_the_wells():
    # A constant target has zero variance: VRMSE = sqrt(MSE / 1e-7).
    target = np.full((1, 1, 4, 4, 1), 3.0, np.float32)
    pred = target + 1e-3
    np.testing.assert_allclose(metrics.vrmse(pred, target), [[[math.sqrt(1e-6 / 1e-7)]]], rtol=1e-4)
    # Zero target: NRMSE = sqrt(MSE / 1e-7).
    np.testing.assert_allclose(metrics.nrmse(pred - 3.0, np.zeros_like(target)), [[[math.sqrt(1e-6 / 1e-7)]]], rtol=1e-4)


def test_reduces_only_space_per_batch_time_channel():
    rng = np.random.default_rng(0)
    pred = rng.normal(size=(2, 3, 4, 5, 6, 2)).astype(np.float32)  # 3D spatial
    target = rng.normal(size=pred.shape).astype(np.float32)
    out = np.asarray(metrics.vrmse(pred, target))
    assert out.shape == (2, 3, 2)
    p, t = pred.astype(np.float64), target.astype(np.float64)
    for b in range(2):
        for s in range(3):
            for c in range(2):
                e = ((p[b, s, ..., c] - t[b, s, ..., c]) ** 2).mean()
                v = t[b, s, ..., c].var(ddof=1)
                assert out[b, s, c] == pytest.approx(math.sqrt(e / (v + 1e-7)), rel=1e-5)
    # Explicit n_spatial_dims for a (B, *spatial, C) layout.
    one = np.asarray(metrics.mse(pred[:, 0], target[:, 0], n_spatial_dims=3))
    np.testing.assert_allclose(one, np.asarray(metrics.mse(pred, target))[:, 0], rtol=1e-6)


def test_shape_errors():
    with pytest.raises(ValueError, match="pred shape"):
        metrics.mse(np.zeros((1, 1, 4, 4, 2)), np.zeros((1, 1, 4, 4, 3)))
    with pytest.raises(ValueError, match="spatial"):
        metrics.mse(np.zeros((4, 2)), np.zeros((4, 2)))


def test_spectral_bin_edges_and_counts():
    edges = metrics.spectral_bin_edges((8, 8))
    expect = np.logspace(np.log10(2 * np.pi / 8), np.log10(np.pi * np.sqrt(2) + 1e-6), 4)
    expect[0] = 0
    np.testing.assert_allclose(edges, expect)
    idx, counts = metrics.wavenumber_bins((8, 8))
    # Every one of the 64 modes has |k| <= pi*sqrt(2) < last edge: nothing in the discarded bin.
    assert counts.sum() == 64 and counts[-1] == 0
    # edges for 8x8: 0, 1.399, 2.493, 4.443. Bin 0 holds k=0, the 4 modes at |k| = pi/4 and the
    # 4 at pi/4*sqrt(2) = 1.11 (9 modes); brute-force count the rest.
    assert counts[0] == 9
    kx = 2 * np.pi * np.fft.fftfreq(8)
    kmag = np.sqrt(kx[:, None] ** 2 + kx[None, :] ** 2)
    for j in range(3):
        assert counts[j] == int(((kmag >= edges[j]) & (kmag < edges[j + 1])).sum())


def test_spectral_single_mode_lands_in_its_bin_and_parseval():
    n = 16
    x = np.arange(n)
    # A residual made of one Fourier mode with |k| = 2*pi*6/16 = 2.36 (bin 2 for 16x16: edges
    # 0, 0.88, 1.98, 4.44) and a target with energy only at low |k|.
    resid = np.cos(2 * np.pi * 6 * x / n)[:, None] * np.ones((1, n))
    target = 2.0 + np.cos(2 * np.pi * 1 * x / n)[:, None] * np.ones((1, n))
    pred = target + resid
    pred = pred.reshape(1, 1, n, n, 1).astype(np.float32)
    target = target.reshape(1, 1, n, n, 1).astype(np.float32)
    edges = metrics.spectral_bin_edges((n, n))
    assert edges[2] <= 2 * np.pi * 6 / n < edges[3]
    spec = metrics.binned_spectral_mse(pred, target)
    res = np.asarray(spec["mse"])[0, 0, :, 0]
    mse = float(np.asarray(metrics.mse(pred, target))[0, 0, 0])  # = mean cos^2 = 0.5
    assert mse == pytest.approx(0.5, rel=1e-5)
    np.testing.assert_allclose(res, [0, 0, 0.5], atol=1e-6)
    # Target energy (mean square): the mean 2 gives 4.0 at k = 0 (bin 0); the cosine at
    # |k| = 2*pi/16 = 0.393 < edges[1] = 0.88 gives 0.5, also in bin 0.
    assert 2 * np.pi / n < edges[1]
    true_bins = np.array([4.5, 0.0, 0.0])
    np.testing.assert_allclose(np.asarray(spec["nmse"])[0, 0, :, 0], res / (true_bins + 1e-7), rtol=1e-5, atol=1e-9)


def test_spectral_parseval_random_and_matches_torch_reference():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    pred = rng.normal(size=(2, 2, 12, 20, 3)).astype(np.float32)
    target = rng.normal(size=pred.shape).astype(np.float32)
    spec = metrics.binned_spectral_mse(pred, target)
    # Parseval: with no mode beyond the last edge, the bins sum to the MSE (up to counts/(counts+1e-7)).
    np.testing.assert_allclose(np.asarray(spec["mse"]).sum(-2), np.asarray(metrics.mse(pred, target)), rtol=1e-5)

    # The the_well formula written in torch (bucketize, one-hot, counts + 1e-7), float64.
    def torch_binned(x, y):
        x, y = torch.from_numpy(x).double(), torch.from_numpy(y).double()
        dims = (-3, -2)
        shape = (x.shape[-3], x.shape[-2])
        wn = torch.zeros(shape, dtype=torch.float64)
        k0 = 2 * np.pi * torch.fft.fftfreq(shape[0], dtype=torch.float64)
        k1 = 2 * np.pi * torch.fft.fftfreq(shape[1], dtype=torch.float64)
        wn = wn + k0[:, None] ** 2 + k1[None, :] ** 2
        wn = wn.sqrt().flatten()
        bins = torch.from_numpy(metrics.spectral_bin_edges(shape))
        ind = torch.bucketize(wn, bins, right=True) - 1
        onehot = torch.nn.functional.one_hot(ind, num_classes=len(bins)).double()
        counts = onehot.sum(0)

        def ps(z):
            f2 = torch.fft.fftn(z, dim=dims).abs() ** 2
            f2 = f2.reshape(f2.shape[:-3] + (-1, f2.shape[-1]))
            m = (f2.unsqueeze(-2) * onehot.unsqueeze(-1)).sum(-3) / (counts.unsqueeze(-1) + 1e-7)
            return m[..., :-1, :] * counts[:-1].unsqueeze(-1) / float(np.prod(shape)) ** 2

        r, t = ps(x - y), ps(y)
        return r.numpy(), (r / (t + 1e-7)).numpy()

    ref_mse, ref_nmse = torch_binned(pred, target)
    np.testing.assert_allclose(np.asarray(spec["mse"]), ref_mse, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(spec["nmse"]), ref_nmse, rtol=2e-5)


def test_horizon_windows():
    per_step = np.arange(1, 31, dtype=np.float32).reshape(1, 30, 1)  # value = step number
    hw = metrics.horizon_windows(per_step, metrics.DOWNSTREAM_WINDOWS)
    assert set(hw) == {"1", "1-10", "11-30"}
    assert float(hw["1"][0, 0]) == 1.0
    assert float(hw["1-10"][0, 0]) == pytest.approx(5.5)
    assert float(hw["11-30"][0, 0]) == pytest.approx(20.5)
    with pytest.raises(ValueError, match="21-60 needs 60 rollout steps"):
        metrics.horizon_windows(per_step, metrics.PAPER_WINDOWS)
    assert set(metrics.horizon_windows(per_step, metrics.PAPER_WINDOWS, skip_incomplete=True)) == {"1", "1-20"}


def test_summarize_report():
    # B=3 trajectories, 4 steps, 2 fields (the second padded).
    a = np.zeros((3, 4, 2))
    a[:, :, 0] = np.array([1.0, 2.0, 6.0])[:, None]  # per trajectory constant over steps
    a[:, :, 1] = 100.0
    rep = metrics.summarize({"vrmse": a}, ["u", "pad"], windows=((1, 1), (1, 4), (1, 10)), valid_fields=[True, False])
    v = rep["vrmse"]
    assert v["per_step"]["u"] == [3.0] * 4
    assert v["per_step_mean"] == [3.0] * 4  # padded field excluded
    assert set(v["windows"]) == {"1", "1-4"}  # 1-10 does not fit in 4 steps
    assert v["windows"]["1-4"]["mean"] == pytest.approx(3.0)
    assert v["windows"]["1-4"]["median_over_trajectories"] == pytest.approx(2.0)
    assert v["windows"]["1"]["pad"] == pytest.approx(100.0)


def test_compute_all_keys_and_jit():
    import jax

    rng = np.random.default_rng(2)
    pred = rng.normal(size=(1, 2, 8, 8, 2)).astype(np.float32)
    target = rng.normal(size=pred.shape).astype(np.float32)
    out = jax.jit(metrics.compute_all)(pred, target)
    assert {"mse", "nrmse", "vrmse", "spectral_nmse_bin2"} <= set(out)
    assert all(v.shape == (1, 2, 2) for v in out.values())


# ----------------------------------------------------------------------------------- ensembles
def _gaussian_ensemble(e, scale=1.0, seed=0, shape=(2, 3, 64, 64, 2)):
    """Members N(0, scale^2) and a target N(0, 1), independent at every point."""
    rng = np.random.default_rng(seed)
    return (scale * rng.normal(size=(e,) + shape)).astype(np.float32), rng.normal(size=shape).astype(np.float32)


def test_crps_of_members_equal_to_the_target_is_zero():
    _, y = _gaussian_ensemble(2)
    np.testing.assert_allclose(metrics.crps(np.stack([y] * 5), y), 0.0, atol=1e-7)


def test_crps_equals_the_pairwise_definition():
    x, y = _gaussian_ensemble(5, shape=(1, 2, 4, 4, 3))
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    skill = np.abs(x64 - y64[None]).mean(0)
    pairs = np.abs(x64[:, None] - x64[None]).sum((0, 1))
    for fair, denominator in ((True, 2 * 5 * 4), (False, 2 * 25)):
        want = (skill - pairs / denominator).mean(axis=(2, 3))
        np.testing.assert_allclose(metrics.crps(x, y, fair=fair), want, rtol=1e-5, atol=1e-6)


def test_fair_crps_of_a_normal_forecast_matches_its_closed_form():
    """CRPS(N(0, 1), y) = y (2 Phi(y) - 1) + 2 phi(y) - 1/sqrt(pi); at y = 0: 2 phi(0) - 1/sqrt(pi)."""
    x, _ = _gaussian_ensemble(8, shape=(1, 1, 128, 128, 1))
    want = 2 / math.sqrt(2 * math.pi) - 1 / math.sqrt(math.pi)
    got = float(metrics.crps(x, np.zeros_like(x[0]))[0, 0, 0])
    assert abs(got - want) <= 0.01 * want, (got, want)


@pytest.mark.parametrize("scale, low, high", [(1.0, 0.97, 1.03), (2.0, 1.6, 1.9), (0.3, 0.25, 0.4)])
def test_spread_skill_is_one_for_a_calibrated_ensemble(scale, low, high):
    """Members N(0, s^2) against a N(0, 1) target (E = 8): ratio sqrt(9/8) s / sqrt(1 + s^2/8):
    1 at s = 1, 1.73 at s = 2 (under-confident), 0.32 at s = 0.3 (over-confident)."""
    x, y = _gaussian_ensemble(8, scale)
    r = np.asarray(metrics.spread_skill(x, y))
    assert r.shape == (2, 3, 2)
    assert low <= r.mean() <= high, r.mean()


def test_rank_histogram_is_flat_when_calibrated_and_u_shaped_when_over_confident():
    x, y = _gaussian_ensemble(8)
    h = np.asarray(metrics.rank_histogram(x, y))
    assert h.shape == (2, 3, 2, 9)
    np.testing.assert_allclose(h.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(h.mean(axis=(0, 1, 2)), 1 / 9, atol=0.01)
    narrow = np.asarray(metrics.rank_histogram(*_gaussian_ensemble(8, 0.3))).mean(axis=(0, 1, 2))
    assert narrow[0] > 0.25 and narrow[-1] > 0.25 and narrow[4] < 0.05, narrow


def test_ensemble_shapes_are_checked():
    x, y = _gaussian_ensemble(3, shape=(1, 1, 4, 4, 1))
    with pytest.raises(ValueError, match=r"must be \(E,\) \+ target shape"):
        metrics.crps(x[:, :, :, :2], y)
    with pytest.raises(ValueError, match="at least 2 members"):
        metrics.spread_skill(x[:1], y)
