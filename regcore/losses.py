"""Similarity terms (pure functions (pred, target) -> scalar) and the one place weights apply.

Term names (docs/ARCHITECTURE.md): similarity `dice`, `ce`, `mse`, `ncc`; the similarity of the
earlier passes `passes` and of the images at half resolution `coarse` (present only when their
weights are > 0); regularizers `smooth`, `magnitude`, `rigidity`, `jacobian`, `bending`. Every
term has one fixed reduction (a mean).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from regcore.config import Config
from regcore.regularizers import regularizer_terms

__all__ = [
    "soft_dice_loss",
    "cross_entropy_prob",
    "mse_loss",
    "local_ncc_loss",
    "adaptive_factor",
    "LossBreakdown",
    "compute_loss",
    "SIMILARITY_TERMS",
]

#: similarity terms per input modality (`cfg.data.modality`)
SIMILARITY_TERMS: dict[str, tuple[str, ...]] = {
    "seg4_onehot": ("dice", "ce"),
    "intensity": ("mse", "ncc"),
}


def _check_pair(pred: torch.Tensor, target: torch.Tensor, pred_name: str, target_name: str
                ) -> None:
    for name, value in ((pred_name, pred), (target_name, target)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"expected {name} to be a torch.Tensor, got {type(value).__name__}")
        if value.ndim != 5:
            raise ValueError(f"expected {name} of shape (B, C, D, H, W), got {tuple(value.shape)}")
    if pred.shape != target.shape:
        raise ValueError(f"shape mismatch: {pred_name} has {tuple(pred.shape)}, "
                         f"{target_name} has {tuple(target.shape)}")


def soft_dice_loss(pred_prob: torch.Tensor, target_onehot: torch.Tensor,
                   exclude_background: bool = True, smooth: float = 1e-5) -> torch.Tensor:
    """1 - mean over batch and labels of the soft Dice 2 sum(p t) / (sum p + sum t).

    Args:
        pred_prob, target_onehot: `(B, C, D, H, W)`, channel 0 the background.
        exclude_background: drop channel 0 from the mean (background dominates the volume and
            would inflate Dice).
        smooth: added to numerator and denominator so an empty label in both gives Dice 1.
    """
    _check_pair(pred_prob, target_onehot, "pred_prob", "target_onehot")
    if exclude_background:
        if pred_prob.shape[1] < 2:
            raise ValueError(f"expected at least 2 channels with exclude_background=True, got "
                             f"{pred_prob.shape[1]}")
        pred_prob, target_onehot = pred_prob[:, 1:], target_onehot[:, 1:]
    target_onehot = target_onehot.to(pred_prob.dtype)
    dims = (2, 3, 4)
    overlap = (pred_prob * target_onehot).sum(dims)
    total = pred_prob.sum(dims) + target_onehot.sum(dims)
    dice = (2 * overlap + smooth) / (total + smooth)  # (B, C)
    return 1 - dice.mean()


def cross_entropy_prob(pred_prob: torch.Tensor, target_onehot: torch.Tensor,
                       eps: float = 1e-6) -> torch.Tensor:
    """Cross-entropy of probabilities: mean over voxels of -sum_c t_c log(max(p_c, eps)).

    `pred_prob` are probabilities (e.g. a trilinearly warped one-hot map), not logits: the study
    passed probabilities to a logits cross-entropy (a second softmax), which flattens the loss.
    The clamp keeps log finite where the warped probability of the true label is below `eps`
    (-log(eps) = 13.8 per such voxel). No gradient flows through those voxels; trilinear
    warping has none to give either when none of the 8 interpolation neighbours carries the
    label, and Dice carries the signal there.
    """
    _check_pair(pred_prob, target_onehot, "pred_prob", "target_onehot")
    log_p = torch.log(pred_prob.clamp_min(eps))
    return -(target_onehot.to(log_p.dtype) * log_p).sum(dim=1).mean()


def mse_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over batch, channels and voxels."""
    _check_pair(pred, target, "pred", "target")
    return (pred - target.to(pred.dtype)).pow(2).mean()


def _box_sum(x: torch.Tensor, window: int) -> torch.Tensor:
    """Sum of `x` `(B, C, D, H, W)` over the `window`^3 box around every voxel (zeros outside).

    One pass per axis: a cumulative sum along the zero-padded axis, then the difference of the
    running sums `window` apart (float64 would not help: the lines are at most a few hundred
    voxels of values in [0, 1]).
    """
    r = window // 2
    x = F.pad(x, (r, r, r, r, r, r))
    for dim in (2, 3, 4):
        n = x.shape[dim] - window + 1
        running = x.cumsum(dim)
        upper = running.narrow(dim, window - 1, n)
        lower = torch.cat([torch.zeros_like(running.narrow(dim, 0, 1)),
                           running.narrow(dim, 0, n - 1)], dim=dim)
        x = upper - lower
    return x


def local_ncc_loss(pred: torch.Tensor, target: torch.Tensor, window: int = 9,
                   smooth_dr: float = 1e-5) -> torch.Tensor:
    """Negative squared local normalised cross-correlation over `window`^3 boxes.

    For every voxel, with box sums S (zero padding at the border, box volume N = window^3):
    cross = S[pt] - S[p] S[t] / N, var_p = S[p^2] - S[p]^2 / N (same for t, each floored at
    `smooth_dr`), ncc^2 = cross^2 / (var_p var_t); the loss is -mean(ncc^2), in [-1, 0].
    Box sums are separable running sums over the zero-padded volume (`_box_sum`), equal to
    `avg_pool3d` x N (stride 1, zero padding counted) but O(1) per voxel instead of O(N): with
    window 9, avg_pool3d and its backward cost most of a train step on a CPU. This is
    VoxelMorph's and MONAI's definition; it never falls back to a global NCC.
    """
    _check_pair(pred, target, "pred", "target")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise ValueError(f"window == {window!r}, must be an odd positive integer")
    target = target.to(pred.dtype)
    n_vox = float(window ** 3)
    # one pooling call for the five box sums: stack along channels
    c = pred.shape[1]
    stacked = torch.cat([pred, target, pred * pred, target * target, pred * target], dim=1)
    sums = _box_sum(stacked, window)
    p_sum, t_sum, p2_sum, t2_sum, pt_sum = sums.split(c, dim=1)
    cross = pt_sum - p_sum * t_sum / n_vox
    p_var = (p2_sum - p_sum * p_sum / n_vox).clamp_min(smooth_dr)
    t_var = (t2_sum - t_sum * t_sum / n_vox).clamp_min(smooth_dr)
    return -(cross * cross / (p_var * t_var)).mean()


def adaptive_factor(epoch: int, epochs: int) -> float:
    """The study's schedule of the regularizer sum: max(0.01, 0.1 (1 - epoch / epochs)).

    `epoch` counts from 0 (the first epoch gets 0.1).
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs == {epochs!r}, must be an integer >= 1")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch <= epochs:
        raise ValueError(f"epoch == {epoch!r}, must be an integer in [0, {epochs}]")
    return max(0.01, 0.1 * (1.0 - epoch / epochs))


@dataclass(frozen=True)
class LossBreakdown:
    """The loss of one step.

    total: scalar tensor, the sum of `weighted`.
    terms: name -> unweighted scalar tensor (regularizers detached when they are not trained).
    weighted: name -> weighted scalar tensor (the addends of `total`; a regularizer's is
        factor x `cfg.loss.reg_scale` x its weight x its term).
    factor: the factor applied to the regularizer sum (the adaptive schedule, 1.0 when
        `cfg.loss.adaptive` is false, 0.0 when the variant does not regularize).
    """

    total: torch.Tensor
    terms: dict[str, torch.Tensor]
    weighted: dict[str, torch.Tensor]
    factor: float


def compute_loss(output, fixed: torch.Tensor, cfg: Config, epoch: int, epochs: int, *,
                 spacing_mm) -> LossBreakdown:
    """Similarity of `output.warped` to `fixed` plus the variant's regularizers.

    Args:
        output: any object with `.warped` `(B, C, D, H, W)` (the moving image warped by the
            total field) and `.dense_ddf_vox` `(B, 3, D, H, W)` (the deformable part, voxels),
            e.g. `networks.RegistrationOutput`.
        fixed: `(B, C, D, H, W)`: one-hot for `cfg.data.modality == "seg4_onehot"`, an
            intensity image for "intensity".
        cfg: the run's configuration (weights in `cfg.loss`, the factor `cfg.regularize`).
        epoch, epochs: for the adaptive factor (epoch from 0).
        spacing_mm: the fixed images' voxel size along (D, H, W) in mm, `(3,)` or `(B, 3)`
            (the magnitude regularizer's threshold is in mm, `cfg.loss.max_displacement_mm`).

    Similarity: seg4_onehot -> dice_weight x soft Dice + ce_weight x CE; intensity ->
    mse_weight x MSE + ncc_weight x local NCC (window `ncc_window`). With `pass_weight` > 0 the
    same weighted similarity of each earlier pass's image (`output.pass_warped`, if the output
    has it), averaged, is the term `passes`; with `coarse_weight` > 0 that of the warped and
    fixed images averaged over 2x2x2 blocks (NCC window `coarse_window()`) is `coarse`.

    Regularizers act on `output.dense_ddf_vox`, not on the total field: the total field includes
    the affine stage, whose global scaling, shear and translation are the alignment the affine
    stage is there to find; penalising them (smoothness, magnitude and the log-volume term are
    all non-zero for an affine field) would fight the factor being ablated. When the variant
    does not regularize, the five terms are still computed (detached, for logging) with
    weight 0.
    """
    warped = output.warped
    ddf_vox = output.dense_ddf_vox
    loss_cfg = cfg.loss
    terms, weights = _similarity(warped, fixed, cfg, loss_cfg.ncc_window)
    weighted = {name: weights[name] * value for name, value in terms.items()}
    earlier = getattr(output, "pass_warped", ())
    if loss_cfg.pass_weight > 0 and earlier:
        # deep supervision: the mean similarity of what each earlier pass produced
        terms["passes"] = sum(_weighted_similarity(w.to(warped.dtype), fixed, cfg,
                                                    loss_cfg.ncc_window)
                              for w in earlier) / len(earlier)
        weighted["passes"] = loss_cfg.pass_weight * terms["passes"]
    if loss_cfg.coarse_weight > 0:
        terms["coarse"] = _weighted_similarity(F.avg_pool3d(warped, 2),
                                               F.avg_pool3d(fixed.to(warped.dtype), 2), cfg,
                                               loss_cfg.coarse_window())
        weighted["coarse"] = loss_cfg.coarse_weight * terms["coarse"]

    schedule = adaptive_factor(epoch, epochs)  # validates epoch and epochs for every variant
    if cfg.regularize:
        factor = schedule if loss_cfg.adaptive else 1.0
        reg = regularizer_terms(ddf_vox, spacing_mm, loss_cfg.max_displacement_mm)
        reg_weights = loss_cfg.reg_weights()
        terms.update(reg)
        scale = factor * loss_cfg.reg_scale
        weighted.update({name: (scale * reg_weights[name]) * value for name, value in reg.items()})
    else:
        factor = 0.0
        with torch.no_grad():
            reg = regularizer_terms(ddf_vox.detach(), spacing_mm,
                                    loss_cfg.max_displacement_mm)
        terms.update(reg)
        weighted.update({name: torch.zeros_like(value) for name, value in reg.items()})

    total = sum(weighted.values())
    return LossBreakdown(total=total, terms=terms, weighted=weighted, factor=factor)


def _similarity(warped: torch.Tensor, fixed: torch.Tensor, cfg: Config, window: int
                ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The modality's similarity terms of `warped` against `fixed` and their weights."""
    loss_cfg = cfg.loss
    if cfg.data.modality == "seg4_onehot":
        terms = {
            "dice": soft_dice_loss(warped, fixed, exclude_background=loss_cfg.dice_exclude_background),
            "ce": cross_entropy_prob(warped, fixed),
        }
        return terms, {"dice": loss_cfg.dice_weight, "ce": loss_cfg.ce_weight}
    terms = {
        "mse": mse_loss(warped, fixed),
        "ncc": local_ncc_loss(warped, fixed, window=window),
    }
    return terms, {"mse": loss_cfg.mse_weight, "ncc": loss_cfg.ncc_weight}


def _weighted_similarity(warped: torch.Tensor, fixed: torch.Tensor, cfg: Config, window: int
                         ) -> torch.Tensor:
    """The weighted sum of the similarity terms (the similarity part of the loss), skipping
    terms of weight 0."""
    terms, weights = _similarity(warped, fixed, cfg, window)
    return sum((weights[name] * value for name, value in terms.items() if weights[name] > 0),
               warped.new_zeros(()))
