"""Rotations (group, tensor laws, BCs), 2D->3D inflation, field transforms and the vocabulary."""

import numpy as np
import pytest
import yaml

from walrus_jax.data import (FieldVocabulary, RELEASED_FIELD_INDEX_MAP, apply_field_transforms, inflate_to_3d,
                             proper_rotations, rotate)
from walrus_jax.data.transforms import channel_groups

WALL, OPEN, PERIODIC = 0, 1, 2
N = 8
H = 2 * np.pi / N
# A grid symmetric about 0, so that reversing an axis is x -> -x.
X1 = (np.arange(N) - (N - 1) / 2) * H


def u_field(x, y, z):
    """An analytic divergence-free vector field (curl of (sin y, sin z, sin x) type terms)."""
    return np.stack([np.sin(y) + np.cos(z), np.sin(z) * 0.5 + np.cos(x), np.sin(x) + 0.3 * np.cos(y)], -1)


def s_field(x, y, z):
    return np.cos(x) + 2 * np.sin(y) * np.cos(z) + 0.1 * x


def make_sample():
    X, Y, Z = np.meshgrid(X1, X1, X1, indexing="ij")
    u = u_field(X, Y, Z)
    Tt = u[..., :, None] * np.stack([np.cos(X), np.sin(Y), np.cos(Z) * 2], -1)[..., None, :]  # rank 2, not symmetric
    fields = np.concatenate([s_field(X, Y, Z)[..., None], u, Tt.reshape(X.shape + (9,))], -1).astype(np.float32)
    fields = np.stack([fields, 2 * fields])  # T = 2
    orders = [0, 1, 1, 1] + [2] * 9 + [1, 1, 1]
    return {"input_fields": fields, "output_fields": fields[:1] * 3,
            "constant_fields": u.astype(np.float32),
            "field_tensor_orders": np.asarray(orders), "padded_field_mask": np.arange(13) % 3 != 0,
            "boundary_conditions": np.array([[WALL, OPEN], [OPEN, PERIODIC], [PERIODIC, PERIODIC]]),
            "space_grid": np.stack([X, Y, Z], -1).astype(np.float32), "grid_type": np.asarray("cartesian")}


def test_proper_rotations_form_the_group():
    for n, count in ((2, 4), (3, 24)):
        Rs = proper_rotations(n)
        assert Rs.shape == (count, n, n) and Rs.dtype == np.int64
        assert (Rs[0] == np.eye(n)).all()
        assert all(round(np.linalg.det(R)) == 1 for R in Rs)
        assert all((R @ R.T == np.eye(n)).all() for R in Rs)
        keys = {R.tobytes() for R in Rs}
        assert len(keys) == count
        assert all((A @ B).tobytes() in keys for A in Rs for B in Rs)  # closed under composition
        assert all(R.T.tobytes() in keys for R in Rs)  # inverses
    assert proper_rotations(3, include_reflections=True).shape == (48, 3, 3)


def test_four_quarter_turns_are_identity_and_composition():
    s = make_sample()
    Rz = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]])
    r = s
    for _ in range(4):
        r = rotate(r, Rz)
    for key in ("input_fields", "output_fields", "constant_fields", "space_grid", "boundary_conditions",
                "padded_field_mask"):
        np.testing.assert_array_equal(r[key], s[key])
    Rs = proper_rotations(3)
    for A, B in [(Rs[3], Rs[17]), (Rs[10], Rs[5])]:
        ab = rotate(rotate(s, A), B)
        direct = rotate(s, B @ A)
        for key in ("input_fields", "constant_fields", "boundary_conditions"):
            np.testing.assert_array_equal(ab[key], direct[key])


def test_rotation_matches_the_analytic_rotated_fields():
    s = make_sample()
    X, Y, Z = np.meshgrid(X1, X1, X1, indexing="ij")
    P = np.stack([X, Y, Z], -1)
    for R in proper_rotations(3):
        r = rotate(s, R)
        q = P @ R  # R^T x' for every grid point x' (row vectors): the pre-image
        xs, ys, zs = q[..., 0], q[..., 1], q[..., 2]
        u = u_field(xs, ys, zs)
        np.testing.assert_allclose(r["input_fields"][0, ..., 0], s_field(xs, ys, zs), atol=2e-5)
        np.testing.assert_allclose(r["input_fields"][0, ..., 1:4], u @ R.T, atol=2e-5)  # R u
        Tt = u[..., :, None] * np.stack([np.cos(xs), np.sin(ys), np.cos(zs) * 2], -1)[..., None, :]
        np.testing.assert_allclose(r["input_fields"][0, ..., 4:13].reshape(Tt.shape), R @ Tt @ R.T, atol=2e-5)
        np.testing.assert_allclose(r["input_fields"][1], 2 * r["input_fields"][0], atol=1e-5)
        np.testing.assert_allclose(r["constant_fields"], u @ R.T, atol=2e-5)
        # A symmetric cube grid is mapped onto itself: the rotated grid gives the new coordinates.
        np.testing.assert_allclose(r["space_grid"], s["space_grid"], atol=1e-5)


def _spectral_divergence(u):
    k = np.fft.fftfreq(N, 1 / N)
    K = np.meshgrid(k, k, k, indexing="ij")
    return sum(np.real(np.fft.ifftn(1j * K[i] * np.fft.fftn(u[..., i]))) for i in range(3))


def test_divergence_free_stays_divergence_free():
    # Periodic grid: u = curl of a smooth random vector potential (spectral) is divergence-free.
    rng = np.random.default_rng(0)
    k = np.fft.fftfreq(N, 1 / N)
    K = np.meshgrid(k, k, k, indexing="ij")
    damp = np.exp(-(K[0] ** 2 + K[1] ** 2 + K[2] ** 2) / 4)
    psi = [np.fft.fftn(rng.normal(size=(N, N, N))) * damp for _ in range(3)]
    curl = [1j * (K[1] * psi[2] - K[2] * psi[1]), 1j * (K[2] * psi[0] - K[0] * psi[2]),
            1j * (K[0] * psi[1] - K[1] * psi[0])]
    u = np.stack([np.real(np.fft.ifftn(c)) for c in curl], -1)
    assert np.abs(_spectral_divergence(u)).max() < 1e-12
    s = {"input_fields": u[None], "field_tensor_orders": np.array([1, 1, 1]),
         "boundary_conditions": np.full((3, 2), PERIODIC)}
    for R in proper_rotations(3):
        r = rotate(s, R)["input_fields"][0]
        # A reversed periodic axis is x -> -x up to a shift by one cell (index N-1-i), which keeps
        # the divergence zero.
        assert np.abs(_spectral_divergence(r)).max() < 1e-12
        assert not np.allclose(r, u) or (R == np.eye(3)).all()


def test_boundary_conditions_follow_their_faces():
    # Mark the face region of every (axis, side) with a distinct value; after rotation, the face
    # that holds the mark of the old low-x face must carry the old low-x code, and so on.
    bcs = np.array([[WALL, OPEN], [OPEN, PERIODIC], [PERIODIC, WALL]])
    bcs[2] = [PERIODIC, PERIODIC]
    bcs = np.array([[WALL, OPEN], [OPEN, WALL], [PERIODIC, PERIODIC]])
    marks = np.zeros((N, N, N, 6), np.float32)
    for a in range(3):
        for side in range(2):
            idx = [slice(None)] * 3
            idx[a] = 0 if side == 0 else N - 1
            marks[tuple(idx) + (2 * a + side,)] = 1.0
    s = {"input_fields": marks[None], "field_tensor_orders": np.zeros(6, int), "boundary_conditions": bcs}
    for R in proper_rotations(3):
        r = rotate(s, R)
        f = r["input_fields"][0]
        for a in range(3):
            for side in range(2):
                new = f[..., 2 * a + side]
                where = [(b, sd) for b in range(3) for sd in range(2)
                         if np.take(new, 0 if sd == 0 else N - 1, axis=b).all()]
                assert len(where) == 1
                b, sd = where[0]
                assert r["boundary_conditions"][b, sd] == bcs[a, side]
    # 2D: a quarter turn x -> y
    R = np.array([[0, -1], [1, 0]])
    r = rotate({"input_fields": np.zeros((1, 4, 4, 1)), "field_tensor_orders": np.zeros(1, int),
                "boundary_conditions": np.array([[WALL, OPEN], [PERIODIC, PERIODIC]])}, R)
    assert r["boundary_conditions"].tolist() == [[PERIODIC, PERIODIC], [WALL, OPEN]]


def test_non_cartesian_is_not_rotated():
    s = make_sample()
    s["grid_type"] = np.asarray("spherical")
    r = rotate(s, proper_rotations(3)[7])
    np.testing.assert_array_equal(r["input_fields"], s["input_fields"])


def test_bad_rotation_matrix():
    s = make_sample()
    with pytest.raises(ValueError, match=r"rotation matrix has shape \(2, 2\); the sample has 3 spatial dims"):
        rotate(s, np.eye(2))
    with pytest.raises(ValueError, match="signed permutation matrix"):
        rotate(s, np.array([[1, 1, 0], [0, 1, 0], [0, 0, 1]]))
    with pytest.raises(ValueError, match="channel 1 starts an order-1 block of 3 components"):
        channel_groups([0, 1, 1, 0], 3)


def test_inflation_to_3d():
    vocab = FieldVocabulary.released()
    rng = np.random.default_rng(0)
    f = rng.normal(size=(2, 4, 6, 1 + 2 + 4)).astype(np.float32)
    c = rng.normal(size=(4, 6, 2)).astype(np.float32)
    s = {"input_fields": f, "constant_fields": c,
         "field_names": np.array(["pressure", "velocity_x", "velocity_y", "D_xx", "D_xy", "D_yx", "D_yy",
                                  "density", "speed_of_sound"]),
         "field_tensor_orders": np.array([0, 1, 1, 2, 2, 2, 2, 0, 0]), "padded_field_mask": np.ones(7, bool),
         "boundary_conditions": np.array([[WALL, OPEN], [PERIODIC, PERIODIC]]),
         "space_grid": rng.normal(size=(4, 6, 2)).astype(np.float32), "field_indices": np.zeros(9, int),
         "grid_type": np.asarray("cartesian")}
    r = inflate_to_3d(s, vocab)
    assert r["input_fields"].shape == (2, 4, 6, 1, 13) and r["constant_fields"].shape == (4, 6, 1, 2)
    assert list(r["field_names"]) == ["pressure", "velocity_x", "velocity_y", "velocity_z", "D_xx", "D_xy", "D_xz",
                                      "D_yx", "D_yy", "D_yz", "D_zx", "D_zy", "D_zz", "density", "speed_of_sound"]
    assert r["field_indices"].tolist() == [3, 4, 5, 6, 10, 11, 12, 13, 14, 15, 16, 17, 18, 28, 8]
    np.testing.assert_array_equal(r["input_fields"][..., 0, [0, 1, 2, 4, 5, 7, 8]], f)
    assert (r["input_fields"][..., [3, 6, 9, 10, 11, 12]] == 0).all()
    assert r["padded_field_mask"].tolist() == [True, True, True, False, True, True, False, True, True, False,
                                               False, False, False]
    assert r["boundary_conditions"].tolist() == [[WALL, OPEN], [PERIODIC, PERIODIC], [PERIODIC, PERIODIC]]
    assert r["space_grid"].shape == (4, 6, 1, 3) and (r["space_grid"][..., 2] == 0).all()
    # After a rotation the mask follows the singleton axis (walrus recomputes it from the shape).
    R = np.array([[0, 0, 1], [0, 1, 0], [-1, 0, 0]])
    rr = rotate(r, R)
    assert rr["input_fields"].shape == (2, 1, 6, 4, 13)
    m = rr["padded_field_mask"]
    assert m[1] == False and m[2] and m[3]  # the x component now lies along the singleton axis # noqa: E712
    with pytest.raises(ValueError, match="pass the FieldVocabulary"):
        inflate_to_3d(s)


def test_field_transforms():
    vocab = FieldVocabulary.released()
    s = {"input_fields": np.full((1, 2, 2, 2), 100.0, np.float32), "constant_fields": np.zeros((2, 2, 0), np.float32),
         "field_names": np.array(["density", "temperature"]), "field_tensor_orders": np.array([0, 0]),
         "boundary_conditions": np.full((2, 2), PERIODIC), "field_indices": np.array([28, 46])}
    r = apply_field_transforms(s, {"density": "torch.log10", "temperature": "log10"}, vocab)
    # float32 log10 against the exact (float64) value: numpy's vectorized float32 log10 (SIMD paths
    # differ per CPU, e.g. AVX-512 gives 2.0000002) is accurate to a few units in the last place,
    # documented at most 4 ULP; 1 ULP here = eps32 * 2.
    assert r["input_fields"].dtype == np.float32
    ref = np.log10(np.float64(100.0))
    assert np.abs(r["input_fields"].astype(np.float64) - ref).max() <= 4 * np.finfo(np.float32).eps * abs(ref)
    assert list(r["field_names"]) == ["log10_density", "log10_temperature"] and r["field_indices"].tolist() == [55, 56]
    r = apply_field_transforms(s, {"density": "zeros_like"}, vocab)
    assert (r["input_fields"][..., 0] == 0).all() and (r["input_fields"][..., 1] == 100).all()
    assert r["field_indices"].tolist() == [7, 46]
    s["input_fields"][0, 0, 0, 0] = -1.0
    with pytest.raises(ValueError, match="log10 on field 'density'.*1 values are not positive"):
        apply_field_transforms(s, {"density": "log10"}, vocab)
    with pytest.raises(ValueError, match="unknown field transform 'torch.exp'"):
        apply_field_transforms(s, {"density": "torch.exp"}, vocab)


def test_released_vocabulary_matches_the_config(request):
    path = request.config.rootpath / "tests" / "fixtures" / "walrus_extended_config.yaml"
    cfg = yaml.safe_load(open(path))
    assert RELEASED_FIELD_INDEX_MAP == cfg["data"]["field_index_map_override"]
    v = FieldVocabulary.released()
    assert len(v) == 67 and v.n_states == 67 and v.index("velocity_z") == 6
    v2 = v.extend(["vorticity", "pressure", "stream"])
    assert v2.index("vorticity") == 67 and v2.index("stream") == 68 and v2.index("pressure") == 3
    assert FieldVocabulary.from_dict(v2.to_dict()) == v2
    with pytest.raises(KeyError, match="field 'vorticity' is not in the field vocabulary"):
        v.index("vorticity")
    with pytest.raises(ValueError, match="share index 3"):
        FieldVocabulary({"a": 3, "b": 3})
