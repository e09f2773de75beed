"""Pictures of rollouts: per-field panels (truth | prediction | error), animations, metric curves.

Every function takes numpy arrays in the Well layout of one trajectory, (T, *spatial, C), and
writes a file; nothing here touches jax. 3D fields are shown as their middle slice along the last
spatial axis (D). matplotlib runs headless (Agg).
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import animation  # noqa: E402


def _to_2d(frame: np.ndarray) -> np.ndarray:
    """(*spatial,) -> (H, W): 2D as is, 3D as the middle D slice, 1D as a single row."""
    frame = np.asarray(frame)
    if frame.ndim == 1:
        return frame[None]
    if frame.ndim == 2:
        return frame
    if frame.ndim == 3:
        return frame[:, :, frame.shape[2] // 2]
    raise ValueError(f"cannot display a field with {frame.ndim} spatial axes (shape {frame.shape})")


def _save(fig, path: str, dpi: int) -> str:
    """Lays out, writes (creating its folder) and closes `fig`; returns `path`."""
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _check(truth, pred, field_names):
    truth, pred = np.asarray(truth), np.asarray(pred)
    if truth.shape != pred.shape:
        raise ValueError(f"truth {truth.shape} and prediction {pred.shape} must have the same (T, *spatial, C) shape")
    if truth.shape[-1] != len(field_names):
        raise ValueError(f"{len(field_names)} field names for {truth.shape[-1]} channels (shape {truth.shape})")
    return truth, pred


def field_panels(truth, pred, field_names: Sequence[str], steps: Sequence[int], path: str,
                 title: str | None = None) -> str:
    """One PNG: a row per (field, step) with truth, prediction and error (prediction - truth).

    truth, pred: (T, *spatial, C); steps: 0-based indices into T (shown as step index + 1).
    Truth and prediction share a colour scale per field; the error is symmetric around 0.
    """
    truth, pred = _check(truth, pred, field_names)
    steps = [int(s) for s in steps if 0 <= int(s) < truth.shape[0]]
    if not steps:
        raise ValueError(f"no valid steps to plot for a rollout of {truth.shape[0]} steps")
    rows = [(c, s) for c in range(truth.shape[-1]) for s in steps]
    fig, axes = plt.subplots(len(rows), 3, figsize=(9.5, 2.6 * len(rows)), squeeze=False)
    for r, (c, s) in enumerate(rows):
        t2, p2 = _to_2d(truth[s, ..., c]), _to_2d(pred[s, ..., c])
        lo, hi = float(min(t2.min(), p2.min())), float(max(t2.max(), p2.max()))
        err = p2 - t2
        e = float(np.abs(err).max()) or 1.0
        for ax, img, kw, label in ((axes[r, 0], t2, dict(vmin=lo, vmax=hi, cmap="viridis"), "truth"),
                                   (axes[r, 1], p2, dict(vmin=lo, vmax=hi, cmap="viridis"), "prediction"),
                                   (axes[r, 2], err, dict(vmin=-e, vmax=e, cmap="RdBu_r"), "error")):
            im = ax.imshow(img, origin="lower", **kw)
            ax.set_title(f"{field_names[c]} step {s + 1}: {label}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    if title:
        fig.suptitle(title)
    return _save(fig, path, dpi=80)


def animate(truth, pred, field_names: Sequence[str], path: str, fps: int = 4, field: int | None = None) -> str:
    """A GIF (or MP4 when `path` ends with .mp4 and ffmpeg exists) of truth | prediction | error over
    the rollout, one row per field (or only `field`). truth, pred: (T, *spatial, C)."""
    truth, pred = _check(truth, pred, field_names)
    chans = list(range(truth.shape[-1])) if field is None else [int(field)]
    fig, axes = plt.subplots(len(chans), 3, figsize=(9, 2.8 * len(chans)), squeeze=False)
    images = []
    for r, c in enumerate(chans):
        lo, hi = float(min(truth[..., c].min(), pred[..., c].min())), float(max(truth[..., c].max(), pred[..., c].max()))
        e = float(np.abs(pred[..., c] - truth[..., c]).max()) or 1.0
        row = []
        for k, (img, kw, label) in enumerate(((truth[0, ..., c], dict(vmin=lo, vmax=hi, cmap="viridis"), "truth"),
                                              (pred[0, ..., c], dict(vmin=lo, vmax=hi, cmap="viridis"), "prediction"),
                                              (pred[0, ..., c] - truth[0, ..., c], dict(vmin=-e, vmax=e, cmap="RdBu_r"),
                                               "error"))):
            ax = axes[r, k]
            row.append(ax.imshow(_to_2d(img), origin="lower", animated=True, **kw))
            ax.set_title(f"{field_names[c]}: {label}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        images.append(row)
    label = fig.suptitle("step 1")
    fig.tight_layout()

    def update(s):
        for r, c in enumerate(chans):
            images[r][0].set_data(_to_2d(truth[s, ..., c]))
            images[r][1].set_data(_to_2d(pred[s, ..., c]))
            images[r][2].set_data(_to_2d(pred[s, ..., c] - truth[s, ..., c]))
        label.set_text(f"step {s + 1}")
        return [im for row in images for im in row] + [label]

    anim = animation.FuncAnimation(fig, update, frames=truth.shape[0], blit=False)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".mp4"):
        if not animation.FFMpegWriter.isAvailable():
            plt.close(fig)
            raise RuntimeError(f"cannot write {path}: ffmpeg is not installed; use a .gif path instead")
        anim.save(path, writer=animation.FFMpegWriter(fps=fps))
    else:
        anim.save(path, writer=animation.PillowWriter(fps=fps), dpi=60)
    plt.close(fig)
    return path


def metric_vs_step(curves: Mapping[str, Sequence[float]], path: str, ylabel: str = "VRMSE",
                   title: str | None = None, log: bool = True) -> str:
    """A line plot of per-step metric curves ({label: [value at step 1, 2, ...]})."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in curves.items():
        v = np.asarray(values, np.float64)
        ax.plot(np.arange(1, len(v) + 1), v, marker="o" if len(v) <= 30 else None, ms=3, label=str(name))
    ax.set_xlabel("rollout step")
    ax.set_ylabel(ylabel)
    if log and all(np.all(np.asarray(v) > 0) for v in curves.values()):
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return _save(fig, path, dpi=90)
