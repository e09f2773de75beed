"""miniwell: small real-physics datasets written in Well format, to train and test offline.

    python -m walrus_jax.data.miniwell --out DIR [--quick] [--systems a,b] [--seed 0]

writes DIR/<system>/data/{train,valid,test}/*.hdf5 and DIR/<system>/stats.yaml for:

* `ns2d_kolmogorov` — 2D incompressible Navier–Stokes on the periodic square [0, 2pi)^2 with
  Kolmogorov forcing F sin(k_f y) x̂, vorticity form, pseudo-spectral (2/3 dealiasing), RK4 with
  an integrating factor for viscosity. Fields: pressure, velocity (vector). BCs periodic.
* `acoustics_box` — 2D linear acoustics p_t = -rho c^2 div u, u_t = -grad p / rho on a staggered
  (Yee) grid, leapfrog in time, with a random smooth speed of sound (constant field, per
  trajectory). x: WALL at x=0 (u_x = 0), OPEN at x=1 (characteristic u_x = p / (rho c)); y: WALL.
  Fields: pressure, velocity (cell-centred); constant field speed_of_sound.
* `gray_scott` — 2D Gray–Scott reaction–diffusion A_t = D_A lap A - A B^2 + F (1 - A),
  B_t = D_B lap B + A B^2 - (F + k) B, periodic, pseudo-spectral, first-order exponential time
  differencing (diffusion integrated exactly). Fields: A, B.
* `advection_diffusion_3d` — 3D passive scalar c_t + div(u c) = kappa lap c in a steady ABC flow
  (a different flow per trajectory, stored as a constant vector field), periodic, pseudo-spectral
  conservative form (total mass conserved to round-off), RK4 with an integrating factor.
  Fields: concentration; constant field velocity (vector).

Sizes are on the model's stride table (2D: 32 quick / 128 full; 3D: 16 quick / 64 full). Every
file stores its solver parameters as attributes (and `simulation_parameters`), as the_well does.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable

import numpy as np
import yaml

from walrus_jax.data.writer import WellField, axis_boundaries, write_well_file
from walrus_jax.errors import PathError, run_command, verbose_requested

TWO_PI = 2.0 * np.pi


# ================================================================================ solvers
def _k(n: int, length: float, real: bool = False) -> np.ndarray:
    return TWO_PI * (np.fft.rfftfreq(n, length / n) if real else np.fft.fftfreq(n, length / n))


def _dealias_mask(kx, ky, n: int, length: float):
    kmax = TWO_PI / length * n / 2
    return (np.abs(kx) < 2.0 / 3.0 * kmax) & (np.abs(ky) < 2.0 / 3.0 * kmax)


def _ifrk4_step(u_hat, E, E2, dt, nonlinear):
    """One RK4 step with integrating factor E = exp(L dt / 2) for u_t = L u + N(u)."""
    a = nonlinear(u_hat)
    b = nonlinear(E * (u_hat + 0.5 * dt * a))
    c = nonlinear(E * u_hat + 0.5 * dt * b)
    d = nonlinear(E2 * u_hat + dt * E * c)
    return E2 * u_hat + dt / 6.0 * (E2 * a + 2.0 * E * (b + c) + d)


def ns2d_simulate(omega0: np.ndarray, *, nu: float, dt: float, n_frames: int, steps_per_frame: int,
                  forcing_amp: float = 0.0, forcing_k: int = 4, drag: float = 0.0):
    """Vorticity omega0 (N, N) on [0, 2pi)^2 (axis 0 = x, axis 1 = y) -> dict of frames:
    omega, velocity (T, N, N, 2), pressure (T, N, N). Frame 0 is the initial state."""
    n = omega0.shape[0]
    kx = _k(n, TWO_PI)[:, None]
    ky = _k(n, TWO_PI, real=True)[None, :]
    k2 = kx ** 2 + ky ** 2
    inv_k2 = np.where(k2 > 0, 1.0 / np.where(k2 > 0, k2, 1.0), 0.0)
    mask = _dealias_mask(kx, ky, n, TWO_PI)
    y = (np.arange(n) + 0.5) * TWO_PI / n
    # Force F sin(k_f y) x-hat has curl -F k_f cos(k_f y).
    f_hat = np.fft.rfft2(np.broadcast_to(-forcing_amp * forcing_k * np.cos(forcing_k * y)[None, :], (n, n)))
    lin = -nu * k2 - drag
    E, E2 = np.exp(lin * dt / 2), np.exp(lin * dt)

    def velocity(w_hat):
        psi = w_hat * inv_k2
        return np.fft.irfft2(1j * ky * psi, s=(n, n)), np.fft.irfft2(-1j * kx * psi, s=(n, n))

    def nonlinear(w_hat):
        u, v = velocity(w_hat)
        wx = np.fft.irfft2(1j * kx * w_hat, s=(n, n))
        wy = np.fft.irfft2(1j * ky * w_hat, s=(n, n))
        return -np.fft.rfft2(u * wx + v * wy) * mask + f_hat

    def pressure(w_hat):
        u, v = velocity(w_hat)
        uh, vh = np.fft.rfft2(u), np.fft.rfft2(v)
        ux, uy = np.fft.irfft2(1j * kx * uh, s=(n, n)), np.fft.irfft2(1j * ky * uh, s=(n, n))
        vx, vy = np.fft.irfft2(1j * kx * vh, s=(n, n)), np.fft.irfft2(1j * ky * vh, s=(n, n))
        # lap p = -d_i u_j d_j u_i
        return np.fft.irfft2(np.fft.rfft2(ux * ux + 2 * uy * vx + vy * vy) * inv_k2, s=(n, n))

    w_hat = np.fft.rfft2(omega0)
    om, vel, pr = [], [], []
    for f in range(n_frames):
        if f:
            for _ in range(steps_per_frame):
                w_hat = _ifrk4_step(w_hat, E, E2, dt, nonlinear)
        om.append(np.fft.irfft2(w_hat, s=(n, n)))
        vel.append(np.stack(velocity(w_hat), -1))
        pr.append(pressure(w_hat))
    return {"omega": np.stack(om), "velocity": np.stack(vel), "pressure": np.stack(pr)}


def random_field(rng, shape, k_peak: float, length: float = TWO_PI) -> np.ndarray:
    """Smooth random field with a spectrum peaked at |k| = k_peak, zero mean, unit RMS."""
    ks = np.meshgrid(*[_k(n, length) for n in shape], indexing="ij")
    kk = np.sqrt(sum(k ** 2 for k in ks)) * length / TWO_PI
    amp = kk ** 2 * np.exp(-(kk / k_peak) ** 2)
    noise = np.fft.fftn(rng.standard_normal(shape))
    f = np.real(np.fft.ifftn(noise * amp))
    f -= f.mean()
    return f / (np.sqrt(np.mean(f ** 2)) + 1e-30)


def acoustics_simulate(p0: np.ndarray, c: np.ndarray, *, rho: float = 1.0, length: float = 1.0, dt: float,
                       n_frames: int, steps_per_frame: int, bc_x=("WALL", "OPEN"), bc_y=("WALL", "WALL")):
    """Linear acoustics on a staggered grid. p0, c: (N, N) cell-centred (axis 0 = x).

    u_x lives on x-faces (N+1, N), u_y on y-faces (N, N+1). A WALL face holds u_n = 0; an OPEN
    face holds the outgoing characteristic u_n = +-p / (rho c) (no incoming wave). Returns frames
    pressure (T, N, N) and velocity (T, N, N, 2) averaged to cell centres.
    """
    n = p0.shape[0]
    h = length / n
    if dt * c.max() / h > 1 / np.sqrt(2):
        raise ValueError(f"acoustics: CFL {dt * c.max() / h:.3f} exceeds 1/sqrt(2)")
    p = p0.astype(np.float64).copy()
    ux = np.zeros((n + 1, n))
    uy = np.zeros((n, n + 1))
    k = rho * c ** 2

    def faces():
        # x faces
        if bc_x[0] == "WALL":
            ux[0] = 0.0
        else:
            ux[0] = -p[0] / (rho * c[0])
        if bc_x[1] == "WALL":
            ux[-1] = 0.0
        else:
            ux[-1] = p[-1] / (rho * c[-1])
        if bc_y[0] == "WALL":
            uy[:, 0] = 0.0
        else:
            uy[:, 0] = -p[:, 0] / (rho * c[:, 0])
        if bc_y[1] == "WALL":
            uy[:, -1] = 0.0
        else:
            uy[:, -1] = p[:, -1] / (rho * c[:, -1])

    # Leapfrog: velocities at half steps. Start u at t = -dt/2 as 0 (fluid at rest).
    pr, vel = [], []
    for f in range(n_frames):
        if f:
            for _ in range(steps_per_frame):
                ux[1:-1] -= dt / (rho * h) * (p[1:] - p[:-1])
                uy[:, 1:-1] -= dt / (rho * h) * (p[:, 1:] - p[:, :-1])
                faces()
                p -= dt * k / h * ((ux[1:] - ux[:-1]) + (uy[:, 1:] - uy[:, :-1]))
        pr.append(p.copy())
        vel.append(np.stack([0.5 * (ux[1:] + ux[:-1]), 0.5 * (uy[:, 1:] + uy[:, :-1])], -1))
    return {"pressure": np.stack(pr), "velocity": np.stack(vel)}


def acoustic_energy(p, vel, c, rho=1.0, length=1.0):
    """0.5 * integral (p^2 / (rho c^2) + rho |u|^2) for cell-centred arrays (approximate for u)."""
    h2 = (length / p.shape[-1]) ** 2
    return 0.5 * h2 * (np.sum(p ** 2 / (rho * c ** 2), axis=(-2, -1)) + rho * np.sum(vel ** 2, axis=(-3, -2, -1)))


def gray_scott_simulate(a0, b0, *, d_a: float, d_b: float, feed: float, kill: float, length: float, dt: float,
                        n_frames: int, steps_per_frame: int):
    """Gray–Scott on a periodic square (N, N); ETD1 (exact for the diffusion part)."""
    n = a0.shape[0]
    kx = _k(n, length)[:, None]
    ky = _k(n, length, real=True)[None, :]
    k2 = kx ** 2 + ky ** 2

    def etd(d):
        lam = -d * k2
        e = np.exp(lam * dt)
        phi = np.where(k2 > 0, (e - 1) / np.where(k2 > 0, lam, 1.0), dt)
        return e, phi

    ea, pa = etd(d_a)
    eb, pb = etd(d_b)
    a_hat, b_hat = np.fft.rfft2(a0), np.fft.rfft2(b0)
    A, B = [], []
    for f in range(n_frames):
        if f:
            for _ in range(steps_per_frame):
                a, b = np.fft.irfft2(a_hat, s=(n, n)), np.fft.irfft2(b_hat, s=(n, n))
                r = a * b * b
                a_hat = ea * a_hat + pa * np.fft.rfft2(-r + feed * (1 - a))
                b_hat = eb * b_hat + pb * np.fft.rfft2(r - (feed + kill) * b)
        A.append(np.fft.irfft2(a_hat, s=(n, n)))
        B.append(np.fft.irfft2(b_hat, s=(n, n)))
    return {"A": np.stack(A), "B": np.stack(B)}


def abc_flow(n: int, a: float, b: float, c: float) -> np.ndarray:
    """Arnold–Beltrami–Childress flow on [0, 2pi)^3, (N, N, N, 3); divergence-free."""
    x = (np.arange(n) + 0.5) * TWO_PI / n
    X, Y, Z = np.meshgrid(x, x, x, indexing="ij")
    return np.stack([a * np.sin(Z) + c * np.cos(Y), b * np.sin(X) + a * np.cos(Z), c * np.sin(Y) + b * np.cos(X)], -1)


def advection_diffusion_simulate(c0, vel, *, kappa: float, dt: float, n_frames: int, steps_per_frame: int):
    """Passive scalar c0 (N, N, N) in the steady field vel (N, N, N, 3), periodic [0, 2pi)^3."""
    n = c0.shape[0]
    k = _k(n, TWO_PI)
    kz = _k(n, TWO_PI, real=True)
    KX, KY, KZ = np.meshgrid(k, k, kz, indexing="ij")
    k2 = KX ** 2 + KY ** 2 + KZ ** 2
    kmax = n / 2
    mask = (np.abs(KX) < 2 / 3 * kmax) & (np.abs(KY) < 2 / 3 * kmax) & (np.abs(KZ) < 2 / 3 * kmax)
    E, E2 = np.exp(-kappa * k2 * dt / 2), np.exp(-kappa * k2 * dt)
    u = [vel[..., i] for i in range(3)]
    shape = c0.shape

    def nonlinear(c_hat):
        cc = np.fft.irfftn(c_hat, s=shape, axes=(0, 1, 2))
        # Conservative form: the k = 0 mode of div(u c) is exactly zero, so mass is conserved.
        div = 1j * (KX * np.fft.rfftn(u[0] * cc) + KY * np.fft.rfftn(u[1] * cc) + KZ * np.fft.rfftn(u[2] * cc))
        return -div * mask

    c_hat = np.fft.rfftn(c0)
    out = []
    for f in range(n_frames):
        if f:
            for _ in range(steps_per_frame):
                c_hat = _ifrk4_step(c_hat, E, E2, dt, nonlinear)
        out.append(np.fft.irfftn(c_hat, s=shape, axes=(0, 1, 2)))
    return {"concentration": np.stack(out)}


# ================================================================================ systems
def _coords(n: int, length: float) -> np.ndarray:
    return ((np.arange(n) + 0.5) * length / n).astype(np.float32)


def _periodic(dims, n):
    out = {}
    for d in dims:
        out.update(axis_boundaries(d, n, "PERIODIC", "PERIODIC"))
    return out


def gen_ns2d(rng, n, n_traj, n_frames, params):
    steps = params["steps_per_frame"]
    vel, pr = [], []
    for _ in range(n_traj):
        w0 = 3.0 * random_field(rng, (n, n), k_peak=3.0)
        out = ns2d_simulate(w0, nu=params["nu"], dt=params["frame_dt"] / steps, n_frames=n_frames, steps_per_frame=steps,
                            forcing_amp=params["forcing_amp"], forcing_k=params["forcing_k"], drag=params["drag"])
        vel.append(out["velocity"])
        pr.append(out["pressure"])
    length = TWO_PI
    return dict(coords={"x": _coords(n, length), "y": _coords(n, length)},
                t0_fields={"pressure": WellField(np.stack(pr))}, t1_fields={"velocity": WellField(np.stack(vel))},
                boundaries=_periodic("xy", n))


def gen_acoustics(rng, n, n_traj, n_frames, params):
    steps = params["steps_per_frame"]
    pr, vel, cs = [], [], []
    x = _coords(n, 1.0)
    X, Y = np.meshgrid(x, x, indexing="ij")
    for _ in range(n_traj):
        c = params["c0"] * (1.0 + 0.25 * np.tanh(random_field(rng, (n, n), k_peak=2.0, length=TWO_PI)))
        p0 = np.zeros((n, n))
        for _ in range(int(rng.integers(1, 4))):
            cx, cy = rng.uniform(0.2, 0.8, size=2)
            p0 += rng.choice([-1.0, 1.0]) * np.exp(-((X - cx) ** 2 + (Y - cy) ** 2) / (2 * params["pulse_width"] ** 2))
        out = acoustics_simulate(p0, c, dt=params["frame_dt"] / steps, n_frames=n_frames, steps_per_frame=steps)
        pr.append(out["pressure"])
        vel.append(out["velocity"])
        cs.append(c)
    bnd = {}
    bnd.update(axis_boundaries("x", n, "WALL", "OPEN"))
    bnd.update(axis_boundaries("y", n, "WALL", "WALL"))
    return dict(coords={"x": x, "y": x},
                t0_fields={"pressure": WellField(np.stack(pr)),
                           "speed_of_sound": WellField(np.stack(cs), time_varying=False, sample_varying=True)},
                t1_fields={"velocity": WellField(np.stack(vel))}, boundaries=bnd)


def gen_gray_scott(rng, n, n_traj, n_frames, params):
    steps = params["steps_per_frame"]
    L = params["length"]
    x = _coords(n, L)
    X, Y = np.meshgrid(x, x, indexing="ij")
    A, B = [], []
    for _ in range(n_traj):
        a0, b0 = np.ones((n, n)), np.zeros((n, n))
        for _ in range(int(rng.integers(3, 7))):
            cx, cy = rng.uniform(0, L, size=2)
            dx = (X - cx + L / 2) % L - L / 2
            dy = (Y - cy + L / 2) % L - L / 2
            # Seeds a few grid cells wide: narrower ones (0.06 L at 32^2) die out at F = 0.025.
            blob = np.exp(-(dx ** 2 + dy ** 2) / (2 * (0.1 * L) ** 2))
            a0 -= 0.5 * blob
            b0 += 0.25 * blob
        b0 += 0.01 * rng.random((n, n))
        out = gray_scott_simulate(a0, b0, d_a=params["d_a"], d_b=params["d_b"], feed=params["feed"], kill=params["kill"],
                                  length=L, dt=params["frame_dt"] / steps, n_frames=n_frames, steps_per_frame=steps)
        A.append(out["A"])
        B.append(out["B"])
    return dict(coords={"x": x, "y": x}, t0_fields={"A": WellField(np.stack(A)), "B": WellField(np.stack(B))},
                boundaries=_periodic("xy", n))


def gen_advection_diffusion(rng, n, n_traj, n_frames, params):
    steps = params["steps_per_frame"]
    C, V = [], []
    for _ in range(n_traj):
        abc = rng.uniform(0.5, 1.0, size=3) * params["flow_amp"]
        vel = abc_flow(n, *abc)
        c0 = 1.0 + 0.5 * random_field(rng, (n, n, n), k_peak=2.0)
        out = advection_diffusion_simulate(c0, vel, kappa=params["kappa"], dt=params["frame_dt"] / steps,
                                           n_frames=n_frames, steps_per_frame=steps)
        C.append(out["concentration"])
        V.append(vel)
    x = _coords(n, TWO_PI)
    return dict(coords={"x": x, "y": x, "z": x}, t0_fields={"concentration": WellField(np.stack(C))},
                t1_fields={"velocity": WellField(np.stack(V), time_varying=False, sample_varying=True)},
                boundaries=_periodic("xyz", n))


# name -> (generator, size quick, size full, frame_dt, list of per-file parameter sets)
SYSTEMS: dict[str, dict] = {
    "ns2d_kolmogorov": dict(
        gen=gen_ns2d, n=(32, 128), frame_dt=0.25, steps_per_frame=(5, 10),
        params=[dict(nu=0.02, forcing_amp=0.5, forcing_k=4, drag=0.05), dict(nu=0.03, forcing_amp=0.7, forcing_k=4, drag=0.05)]),
    "acoustics_box": dict(
        gen=gen_acoustics, n=(32, 128), frame_dt=0.015, steps_per_frame=(2, 8),
        params=[dict(c0=1.0, pulse_width=0.06), dict(c0=1.2, pulse_width=0.08)]),
    "gray_scott": dict(
        gen=gen_gray_scott, n=(32, 128), frame_dt=15.0, steps_per_frame=(15, 20),
        params=[dict(feed=0.025, kill=0.055, d_a=2e-4, d_b=1e-4, length=1.0),
                dict(feed=0.03, kill=0.055, d_a=2e-4, d_b=1e-4, length=1.0)]),
    "advection_diffusion_3d": dict(
        # Full size: 64^3 IF-RK4 costs ~16 FFTs per substep; 3 substeps per frame keep the advective
        # CFL number ~0.3 (RK4 is stable to ~2.8) and, with fewer trajectories, the set takes minutes.
        gen=gen_advection_diffusion, n=(16, 64), frame_dt=0.06, steps_per_frame=(2, 3),
        n_traj_full={"train": 4, "valid": 1, "test": 1},
        params=[dict(kappa=0.02, flow_amp=1.5), dict(kappa=0.03, flow_amp=1.5)]),
}


def _stats(arrays: dict[str, list[np.ndarray]]) -> dict:
    """the_well-style stats.yaml: mean/std/rms and of the one-step deltas, per field (per component)."""
    out = {k: {} for k in ("mean", "std", "rms", "mean_delta", "std_delta", "rms_delta")}
    for name, (arrs, time_varying, order) in arrays.items():
        a = np.concatenate([x.reshape((-1,) + x.shape[x.ndim - order:] if order else (-1,)) for x in arrs])
        axis = 0

        def tolist(v):
            return v.tolist() if np.ndim(v) else float(v)
        out["mean"][name] = tolist(a.mean(axis))
        out["std"][name] = tolist(a.std(axis))
        out["rms"][name] = tolist(np.sqrt((a ** 2).mean(axis)))
        if time_varying:
            d = np.concatenate([np.diff(x, axis=1).reshape((-1,) + x.shape[x.ndim - order:] if order else (-1,))
                                for x in arrs])
            out["mean_delta"][name] = tolist(d.mean(axis))
            out["std_delta"][name] = tolist(d.std(axis))
            out["rms_delta"][name] = tolist(np.sqrt((d ** 2).mean(axis)))
    return out


def generate_system(name: str, out_dir: str, *, quick: bool, seed: int = 0, n_frames: int | None = None,
                    n_traj: dict | None = None, log: Callable[[str], None] | None = None) -> str:
    """Simulates one system and writes it in Well format under out_dir/name. Returns that folder."""
    spec = SYSTEMS[name]
    n = spec["n"][0 if quick else 1]
    spf = spec["steps_per_frame"][0 if quick else 1]
    n_frames = n_frames or (48 if quick else 64)
    n_traj = n_traj or ({"train": 5, "valid": 1, "test": 1} if quick
                        else spec.get("n_traj_full", {"train": 8, "valid": 2, "test": 2}))
    root = os.path.join(out_dir, name)
    train_arrays: dict[str, tuple[list, bool, int]] = {}
    ss = np.random.SeedSequence([seed, sum(map(ord, name))])
    for split_i, split in enumerate(("train", "valid", "test")):
        for pi, params in enumerate(spec["params"]):
            rng = np.random.default_rng(ss.spawn(1)[0])
            full = dict(params, frame_dt=spec["frame_dt"], steps_per_frame=spf)
            t0 = time.time()
            data = spec["gen"](rng, n, n_traj[split], n_frames, full)
            path = os.path.join(root, "data", split, f"{name}_{'_'.join(f'{k}_{v}' for k, v in params.items())}.hdf5")
            write_well_file(path, dataset_name=name, n_trajectories=n_traj[split],
                            time=(np.arange(n_frames) * spec["frame_dt"]).astype(np.float32),
                            simulation_parameters={k: float(v) for k, v in full.items()},
                            extra_attrs={"solver": spec["gen"].__name__, "generator": "walrus_jax.data.miniwell",
                                         "seed": int(seed)},
                            **data)
            if log:
                log(f"{path}: {n_traj[split]} trajectories x {n_frames} frames, {time.time() - t0:.1f}s")
            if split == "train":
                for group, order in (("t0_fields", 0), ("t1_fields", 1)):
                    for fname, fld in data.get(group, {}).items():
                        train_arrays.setdefault(fname, ([], fld.time_varying, order))[0].append(fld.data)
    with open(os.path.join(root, "stats.yaml"), "w") as f:
        yaml.safe_dump(_stats(train_arrays), f)
    return root


def main(argv=None) -> int:
    """The command line; returns the exit status (2 and one `error:` line for a bad --out, a full
    disk or a read-only directory; --verbose or WALRUS_JAX_VERBOSE=1 adds the traceback)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--verbose", action="store_true", help="print the traceback of an error")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--quick", action="store_true", help="small grids (2D 32^2, 3D 16^3): under a minute on one core")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {list(SYSTEMS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1, help="processes, one system each (default 1)")
    args = ap.parse_args(argv)
    return run_command(lambda: _run(ap, args), args.verbose or verbose_requested())


def _run(ap, args) -> None:
    names = [s for s in args.systems.split(",") if s]
    unknown = [s for s in names if s not in SYSTEMS]
    if unknown:
        ap.error(f"unknown systems {unknown}; choose from {list(SYSTEMS)}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise PathError(f"--out {args.out}: is a file, not a directory")
    t0 = time.time()
    if args.workers > 1:
        import concurrent.futures
        import functools
        job = functools.partial(generate_system, out_dir=args.out, quick=args.quick, seed=args.seed, log=print)
        with concurrent.futures.ProcessPoolExecutor(args.workers) as ex:
            list(ex.map(job, names))
    else:
        for name in names:
            generate_system(name, args.out, quick=args.quick, seed=args.seed, log=print)
    print(f"miniwell: wrote {len(names)} datasets to {args.out} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    sys.exit(main())
