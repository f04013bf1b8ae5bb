"""The report's figures, drawn with matplotlib's Agg backend into PNG files.

Every function takes tidy tables (or the `example.npz` arrays) and a target path, draws one
figure, writes it and closes it. Nothing here computes statistics: the numbers come from
`analysis.effects`.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: the report is written on servers and in CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402

from analysis.effects import subject_table  # noqa: E402
from analysis.metrics import spec  # noqa: E402
from regcore.variants import VARIANTS  # noqa: E402

__all__ = ["box_by_variant", "forest", "interaction_plot", "search_front", "example_slices",
           "axis_title"]

DPI = 110


def axis_title(metric: str) -> str:
    s = spec(metric)
    unit = f" ({s.unit})" if s.unit else ""
    if s.direction == 0:
        return f"{s.label}{unit}"
    better = "higher" if s.direction > 0 else "lower"
    return f"{s.label}{unit}, {better} is better"


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def box_by_variant(per_pair: pd.DataFrame, metric: str, path: Path) -> Path:
    """Box plot of the seed-averaged per-subject values of `metric`, one box per variant,
    with the subjects drawn as points."""
    table = subject_table(per_pair, metric)
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    data = [table[v].dropna().to_numpy() for v in table.columns]
    labels = [(VARIANTS[v].label if v in VARIANTS else v).replace(" (", "\n(")
              for v in table.columns]
    ax.boxplot(data, showmeans=True)
    ax.set_xticks(range(1, len(labels) + 1), labels)
    rng = np.random.default_rng(0)
    for i, values in enumerate(data, start=1):
        ax.plot(i + rng.uniform(-0.12, 0.12, values.size), values, "o", ms=3, alpha=0.6,
                color="tab:blue")
    ax.set_ylabel(axis_title(metric))
    ax.set_title(f"{spec(metric).label} per test pair (mean over seeds)")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _verdict_color(verdict: str) -> str:
    if verdict.startswith("no evidence"):
        return "tab:gray"
    return "tab:green" if verdict.startswith(("improves", "positive")) else "tab:orange"


def forest(effects: pd.DataFrame, metrics: list[str], path: Path,
           labels: dict[str, str] | None = None) -> Path:
    """Every effect with its 95 % CI, one panel per metric (own units), coloured by verdict
    (green: better, orange: worse, grey: no evidence). `labels`: effect -> axis label."""
    metrics = [m for m in metrics if m in set(effects["metric"])]
    order = list(dict.fromkeys(effects["effect"]))
    labels = labels or {}
    cols = min(3, max(1, len(metrics)))
    rows = max(1, int(np.ceil(len(metrics) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 0.5 + 0.45 * len(order) * rows
                                                  + 1.0 * rows), squeeze=False)
    for ax in axes.flat[len(metrics):]:
        ax.axis("off")
    for ax, metric in zip(axes.flat, metrics):
        sub = effects[effects["metric"] == metric].set_index("effect").reindex(order)
        y = np.arange(len(order))[::-1]
        for yi, (_, r) in zip(y, sub.iterrows()):
            if not np.isfinite(r["estimate"]):
                continue
            lo = r["estimate"] - r["ci_lo"] if np.isfinite(r["ci_lo"]) else 0.0
            hi = r["ci_hi"] - r["estimate"] if np.isfinite(r["ci_hi"]) else 0.0
            ax.errorbar(r["estimate"], yi, xerr=[[lo], [hi]], fmt="o", capsize=3,
                        color=_verdict_color(str(r["verdict"])))
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(y, [labels.get(e, e) for e in order], fontsize=8)
        ax.set_title(axis_title(metric), fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("Effects with 95 % CIs over networks and test pairs (metric units)",
                 fontsize=10)
    return _save(fig, path)


def interaction_plot(means: pd.DataFrame, metric: str, factor_x: str, factor_line: str,
                     path: Path, labels: dict[str, str] | None = None) -> Path:
    """Cell means of `metric` with their 95 % CIs against the levels of `factor_x`, one line
    per level of `factor_line` (averaged over any other factor). `means` has the columns
    `factor_x`, `factor_line` (levels 0/1), mean, ci_lo, ci_hi. Parallel lines: no
    interaction."""
    labels = labels or {}
    fig, ax = plt.subplots(figsize=(4.6, 3.4))
    for level, rows in means.groupby(factor_line):
        rows = rows.sort_values(factor_x)
        x = rows[factor_x].to_numpy(dtype=float) + (0.03 if level else -0.03)
        err = np.vstack([rows["mean"] - rows["ci_lo"], rows["ci_hi"] - rows["mean"]])
        ax.errorbar(x, rows["mean"], yerr=np.nan_to_num(err), fmt="o-", capsize=3,
                    label=f"{labels.get(factor_line, factor_line)} {'on' if level else 'off'}")
    ax.set_xticks([0, 1], [f"{labels.get(factor_x, factor_x)} off",
                           f"{labels.get(factor_x, factor_x)} on"])
    ax.set_xlim(-0.4, 1.4)
    ax.set_ylabel(axis_title(metric), fontsize=8)
    ax.set_title(f"{labels.get(factor_x, factor_x)} x {labels.get(factor_line, factor_line)}",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def search_front(search: pd.DataFrame, front: pd.Series, ablation: pd.DataFrame | None,
                 path: Path, maximize: str = "val.dice_mean",
                 minimize: str = "val.folding_pct") -> Path:
    """The searched metric against folding % of the weight-search trials (each at its last
    report), the Pareto front joined by a line; the ablation trials drawn for reference."""
    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    ax.plot(search[minimize], search[maximize], "o", color="tab:gray", alpha=0.7,
            label="search trials")
    on = search[front.reindex(search.index, fill_value=False)].sort_values(minimize)
    ax.plot(on[minimize], on[maximize], "o-", color="tab:red", label="Pareto front")
    if ablation is not None and not ablation.empty:
        for variant, rows in ablation.groupby("variant"):
            label = VARIANTS[variant].label if variant in VARIANTS else variant
            ax.plot(rows[minimize], rows[maximize], "s", ms=6, alpha=0.8, label=label)
    ax.set_xlabel(f"{minimize}: " + axis_title(minimize.split(".", 1)[-1]))
    ax.set_ylabel(f"{maximize}: " + axis_title(maximize.split(".", 1)[-1]))
    ax.set_title("Weight search: accuracy against folding")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


# -- one example registration --------------------------------------------------------------

# axis k of a (D, H, W) volume loaded from a RAS-oriented NIfTI is x, y, z: fixing x gives a
# sagittal slice, y a coronal one, z an axial one.
PLANES = (("axial", 2), ("coronal", 1), ("sagittal", 0))


def _slice(volume: np.ndarray, axis: int) -> np.ndarray:
    """The mid-slice across `axis`, transposed so that the first in-plane axis runs
    horizontally (drawn with origin="lower": the usual display of a RAS volume)."""
    return np.take(volume, volume.shape[axis] // 2, axis=axis).T


def _show(ax, image: np.ndarray, is_labels: bool, vmax: float) -> None:
    if is_labels:
        ax.imshow(image, cmap="tab10", vmin=0, vmax=9, interpolation="nearest", origin="lower")
    else:
        ax.imshow(image, cmap="gray", vmin=0, vmax=vmax, interpolation="nearest",
                  origin="lower")


def _grid(ax, ddf_vox: np.ndarray, axis: int, step: int) -> None:
    """Fixed-grid lines moved to x + u(x) (the in-plane components of u, in voxels).

    In-plane axes p < q: p is drawn horizontally, q vertically (see `_slice`)."""
    p, q = [a for a in range(3) if a != axis]
    up = _slice(ddf_vox[p], axis)  # (n_q, n_p) after the transpose
    uq = _slice(ddf_vox[q], axis)
    n_q, n_p = up.shape
    jj, ii = np.meshgrid(np.arange(n_q), np.arange(n_p), indexing="ij")
    xx, yy = ii + up, jj + uq
    for j in range(0, n_q, step):
        ax.plot(xx[j, :], yy[j, :], color="yellow", lw=0.5)
    for i in range(0, n_p, step):
        ax.plot(xx[:, i], yy[:, i], color="yellow", lw=0.5)
    ax.set_xlim(-0.5, n_p - 0.5)  # lines moved outside the image must not rescale the axes
    ax.set_ylim(-0.5, n_q - 0.5)


def example_slices(arrays: dict[str, np.ndarray], path: Path, title: str = "") -> Path:
    """Mid-slices (axial, coronal, sagittal) of fixed, moving, warped (fixed contour over it)
    with the deformation grid, and the Jacobian determinant (folds, det J <= 0, outlined)."""
    fixed, moving, warped = (np.asarray(arrays[k]) for k in ("fixed", "moving", "warped"))
    ddf = np.asarray(arrays["ddf_vox"], dtype=float)
    jac = np.asarray(arrays["jacdet"], dtype=float)
    fixed_seg = np.asarray(arrays.get("fixed_seg", fixed))
    if ddf.shape != (3, *fixed.shape) or jac.shape != fixed.shape:
        raise ValueError(f"example.npz: expected ddf_vox (3, *{fixed.shape}) and jacdet "
                         f"{fixed.shape}, got {ddf.shape} and {jac.shape}")
    is_labels = np.issubdtype(fixed.dtype, np.integer)
    vmax = float(max(np.nanmax(fixed), np.nanmax(moving), 1e-6))
    step = max(2, min(fixed.shape) // 16)
    # symmetric about det J = 1 (no volume change), wide enough for the largest deviation
    half = max(float(np.nanmax(np.abs(jac - 1.0))), 1e-3)
    norm = Normalize(vmin=1.0 - half, vmax=1.0 + half)
    fig, axes = plt.subplots(3, 4, figsize=(11, 8.4))
    for row, (name, axis) in enumerate(PLANES):
        ax = axes[row]
        _show(ax[0], _slice(fixed, axis), is_labels, vmax)
        _show(ax[1], _slice(moving, axis), is_labels, vmax)
        _show(ax[2], _slice(warped, axis), is_labels, vmax)
        ax[2].contour(_slice(fixed_seg, axis) > 0, levels=[0.5], colors="cyan", linewidths=0.6)
        _grid(ax[2], ddf, axis, step)
        image = ax[3].imshow(_slice(jac, axis), cmap="RdBu_r", norm=norm,
                             interpolation="nearest", origin="lower")
        folds = _slice(jac, axis) <= 0
        if folds.any():
            ax[3].contour(folds, levels=[0.5], colors="black", linewidths=0.8)
        fig.colorbar(image, ax=ax[3], fraction=0.046, pad=0.04)
        ax[0].set_ylabel(f"{name} (axis {axis})")
        for a in ax:
            a.set_xticks([])
            a.set_yticks([])
    for a, label in zip(axes[0], ("fixed", "moving", "warped + grid (fixed outline)",
                                  "Jacobian determinant")):
        a.set_title(label, fontsize=10)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)
