"""Register one moving image to one fixed image with a trained checkpoint, or without one.

    python -m regcore.register --checkpoint DIR_OR_state.pt --moving m.nii.gz --fixed f.nii.gz \\
        [--moving-seg ms.nii.gz] [--refine-steps N] --out-dir OUT
    python -m regcore.register --method io --moving m.nii.gz --fixed f.nii.gz \\
        [--moving-seg ms.nii.gz] [--io-steps 200] [--io-levels 2] --out-dir OUT

`--method io` needs no checkpoint: it optimises this pair's displacement itself
(`regcore.instance`: Adam, local NCC window 9 + diffusion weight 1 for intensities, soft Dice +
CE for `--modality seg4_onehot`, a 2-level pyramid). `--refine-steps N` runs N such steps after
the network, starting from its field (its affine stage kept).

An intensity pair from elsewhere (not the embedded cohort): each image is scaled to [0, 1]
(its minimum, or 0, to 0 and the 99.5th percentile of the voxels above it to 1, clipped), so
any positive intensity range is accepted; skull-stripped T1-weighted brains on background 0
match the training data. The pair must already share one grid: same shape AND voxel size,
after an affine pre-alignment (a network trained with the affine stage absorbs a residual
rotation, scale and shift of a few degrees / percent / voxels; the others and `--method io`
expect only a deformable residual of a few voxels). The trained networks saw isotropic
volumes on a 32^3 (quick) or 64^3-128^3 grid; any shape is resampled to the training shape
and back. Refused (one line, exit 2): shapes or voxel sizes that differ, a side under 8
voxels, NaN or infinite values, a constant image, labels outside 0..4 for a label model.

Inputs. The model's configuration comes from the checkpoint. For a model trained on one-hot
label maps (`data.modality = seg4_onehot`, the study's input) `--moving` and `--fixed` are seg4
label maps (integers 0 background, 1 cortex, 2 subcortical grey, 3 white matter, 4 CSF), one-hot
encoded internally; for an intensity model they are intensity images, scaled to [0, 1] like the
training data. Moving and fixed must have the same 3-D shape (they are expected on one grid, as
after the usual affine pre-alignment; the output lies on the fixed image's grid). When that
shape differs from the model's training shape (`data.shape`), both are resampled to it for the
network (linear for intensities, nearest for labels, keeping the physical extent), and the
predicted displacement is resampled back and rescaled to voxels of the input grid; the moving
image is then warped once at its own resolution.

Outputs in OUT, all with the fixed image's affine and shape (D, H, W):
- `warped.nii.gz`: the moving image warped onto the fixed grid (linear for intensities; nearest
  for label maps).
- `warped_seg.nii.gz` (with `--moving-seg`): the moving segmentation, nearest neighbour.
- `ddf_mm.nii.gz`: the displacement in mm, shape (D, H, W, 1, 3), NIfTI intent VECTOR. Its
  convention: at fixed voxel x (array index order of the fixed image), the transform maps x to
  the moving position x + u(x), so warped(x) = moving(x + u(x)) ("fixed(x) ~ moving(x + u(x))").
  Component k is the displacement along the fixed image's array axis k (not a world/RAS axis)
  in voxels times the voxel size of axis k in mm (from the fixed affine's column norms).
- `jacdet.nii.gz`: det(I + grad u) with u in voxels (central differences); <= 0 means folding.

Bad input (missing files, other shapes, a corrupt checkpoint, labels outside 0..4) gives one
line on stderr and exit code 2, before anything is written.
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from regcore.checkpoint import config_from_state, load_checkpoint
from regcore.cli import ArgumentParser
from regcore.config import Config
from regcore.instance import DEFAULT_IO_LEVELS, DEFAULT_IO_STEPS
from regcore.runtime import infer, resolve_device

__all__ = ["main", "register_arrays", "load_model"]

NIFTI_INTENT_VECTOR = 1007


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m regcore.register",
        description=__doc__.split("\n\n", 2)[0] + "\n\n" + __doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=("network", "io"), default="network",
                        help="network: a trained checkpoint (default); io: instance "
                             "optimisation of this pair alone, no checkpoint")
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint directory or its state.pt (--method network)")
    parser.add_argument("--refine-steps", type=int, default=0,
                        help="instance-optimisation steps after the network (default 0: none)")
    parser.add_argument("--io-steps", type=int, default=None,
                        help=f"Adam steps per level of --method io (default {DEFAULT_IO_STEPS})")
    parser.add_argument("--io-levels", type=int, default=DEFAULT_IO_LEVELS,
                        help=f"pyramid levels of --method io (default {DEFAULT_IO_LEVELS})")
    parser.add_argument("--modality", choices=("intensity", "seg4_onehot"), default="intensity",
                        help="what --moving/--fixed are for --method io (a network's checkpoint "
                             "says it itself)")
    parser.add_argument("--moving", required=True, help="moving image (.nii/.nii.gz)")
    parser.add_argument("--fixed", required=True, help="fixed image (.nii/.nii.gz)")
    parser.add_argument("--moving-seg", default=None, help="moving segmentation, warped nearest")
    parser.add_argument("--out-dir", required=True, help="output folder")
    return parser


def _read(path: str, what: str):
    import nibabel as nib

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    try:
        image = nib.load(str(file))
        data = np.asarray(image.dataobj)
    except Exception as error:
        raise ValueError(f"{what} {path!r} is not a readable NIfTI image ({error})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{what} {path!r} has shape {data.shape}, expected a 3-D volume (D, H, W)")
    return image, data


def _labels(data: np.ndarray, what: str, path: str) -> np.ndarray:
    rounded = np.rint(data)
    if not np.allclose(rounded, data) or rounded.min() < 0 or rounded.max() > 4:
        raise ValueError(f"{what} {path!r} holds values in [{data.min():g}, {data.max():g}], "
                         f"expected seg4 labels 0..4 (the model was trained on one-hot label maps)")
    return rounded.astype(np.int64)


def load_model(checkpoint: str | Path, device: torch.device):
    """(model in eval mode, config) from a checkpoint directory or state.pt."""
    from regcore.networks import build_model

    state = load_checkpoint(checkpoint)
    config = config_from_state(state)
    in_channels = 5 if config.data.modality == "seg4_onehot" else 1
    model = build_model(config.model, in_channels, affine=config.affine)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise ValueError(f"checkpoint {str(checkpoint)!r} does not fit the network of its own "
                         f"config ({' '.join(str(error).split())[:200]})") from None
    return model.to(device).eval(), config


def register_arrays(model: torch.nn.Module, config, moving: np.ndarray, fixed: np.ndarray,
                    device: torch.device, spacing_mm=(1.0, 1.0, 1.0)) -> np.ndarray:
    """(3, D, H, W) float32 displacement in voxels of the input grid for (D, H, W) inputs
    (label maps or [0, 1] intensities, as the model's modality wants)."""
    from regcore.data.volume import one_hot, resample_array

    shape = tuple(moving.shape)
    train_shape = tuple(config.data.shape)
    labels = config.data.modality == "seg4_onehot"

    def prepare(array: np.ndarray) -> torch.Tensor:
        small = resample_array(array, train_shape, order=0 if labels else 1)
        channels = one_hot(small) if labels else small[None].astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(channels))[None].to(device)

    # float16 autocast exists on CUDA only: an amp-trained model runs in fp32 elsewhere
    precision = ("fp32" if config.train.precision == "amp" and device.type != "cuda"
                 else config.train.precision)
    moving_in, fixed_in = prepare(moving), prepare(fixed)
    output = infer(model, moving_in, fixed_in, precision, device)
    ddf = output.total_ddf_vox
    if config.model.refine_steps:  # instance optimisation from the network's field
        from regcore.evaluate import refine_output

        # the voxel size of the training grid the refinement runs on (same extent)
        grid_mm = [float(sp) * (n - 1) / (m - 1) for sp, n, m in zip(spacing_mm, shape, train_shape)]
        ddf, _ = refine_output(output, moving_in, fixed_in, config, grid_mm)
    ddf_small = ddf[0].float().cpu().numpy()  # (3, d, h, w) voxels of train grid
    if shape == train_shape:
        return ddf_small.astype(np.float32)
    # back to the input grid: same extent, so a displacement of u voxels of n_train voxels is
    # u * n_input / n_train voxels of the input grid (the data layer's convention)
    return np.stack([resample_array(ddf_small[k], shape, order=1) * (shape[k] / train_shape[k])
                     for k in range(3)]).astype(np.float32)


def _check_method_flags(args) -> None:
    """Flags that do not fit the method: one line, before any file is read."""
    if args.method == "network":
        if args.checkpoint is None:
            raise ValueError("--checkpoint is required with --method network (or pass "
                             "--method io to optimise the pair without a network)")
        for flag, value in (("--io-steps", args.io_steps),):
            if value is not None:
                raise ValueError(f"{flag} applies to --method io; after a network use "
                                 f"--refine-steps")
    else:
        if args.checkpoint is not None:
            raise ValueError("--checkpoint is not used by --method io (it optimises the pair "
                             "alone); pass --method network --refine-steps N to refine a network")
        if args.refine_steps:
            raise ValueError("--refine-steps applies after a network (--method network); "
                             "--method io takes --io-steps")
    if args.refine_steps < 0:
        raise ValueError(f"--refine-steps == {args.refine_steps}, must be >= 0")
    if args.io_steps is not None and args.io_steps < 1:
        raise ValueError(f"--io-steps == {args.io_steps}, must be >= 1")
    if not 1 <= args.io_levels <= 4:
        raise ValueError(f"--io-levels == {args.io_levels}, must be in 1..4")


#: the smallest side the pyramid and the 3^3 / 9^3 stencils handle
MIN_SIDE_VOX = 8


def _check_grid(moving_img, fixed_img, shape) -> None:
    """Moving and fixed must lie on one grid (same shape, checked before; same voxel size)."""
    from regcore.data.volume import spacing_from_affine

    if min(shape) < MIN_SIDE_VOX:
        raise ValueError(f"the images have shape {tuple(shape)}, every side must be at least "
                         f"{MIN_SIDE_VOX} voxels")
    sm = spacing_from_affine(np.asarray(moving_img.affine, dtype=np.float64))
    sf = spacing_from_affine(np.asarray(fixed_img.affine, dtype=np.float64))
    if not np.allclose(sm, sf, rtol=0.01):
        raise ValueError(f"--moving has voxel size {tuple(np.round(sm, 3))} mm but --fixed has "
                         f"{tuple(np.round(sf, 3))} mm; resample the moving image onto the fixed "
                         f"grid first (after an affine pre-alignment)")


def _check_intensity(data: np.ndarray, what: str, path: str) -> None:
    if not np.isfinite(data).all():
        raise ValueError(f"{what} {path!r} holds NaN or infinite values")
    if float(data.max()) <= float(data.min()):
        raise ValueError(f"{what} {path!r} is constant ({float(data.min()):g}): nothing to "
                         f"register")


def optimise_arrays(config, moving: np.ndarray, fixed: np.ndarray, device: torch.device,
                    steps: int, levels: int, spacing_mm=(1.0, 1.0, 1.0)) -> np.ndarray:
    """(3, D, H, W) float32 displacement in voxels found by instance optimisation of the pair
    itself (label maps one-hot encoded, intensities as given in [0, 1])."""
    from regcore.data.volume import one_hot
    from regcore.instance import optimise_pair

    labels = config.data.modality == "seg4_onehot"

    def prepare(array: np.ndarray) -> torch.Tensor:
        channels = one_hot(array) if labels else array[None].astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(channels))[None].to(device)

    result = optimise_pair(prepare(moving), prepare(fixed), config, steps=steps, levels=levels,
                           spacing_mm=spacing_mm)
    return result.total_ddf_vox[0].cpu().numpy().astype(np.float32)


def _nifti_bytes(data: np.ndarray, affine: np.ndarray, intent: int | None = None) -> bytes:
    import nibabel as nib

    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm")
    if intent is not None:
        image.header.set_intent(intent)
    return gzip.compress(image.to_bytes(), compresslevel=6)


def main(argv: Sequence[str] | None = None) -> int:
    from regcore.io import atomic_open
    from regcore.data.volume import normalise_intensity, spacing_from_affine
    from regcore.evaluate import warp_labels
    from regcore.spatial import jacobian_det, warp

    args = _parser().parse_args(argv)
    _check_method_flags(args)
    out_dir = Path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out-dir {args.out_dir!r} exists and is not a directory")
    device = resolve_device("auto")
    if args.method == "network":
        model, config = load_model(args.checkpoint, device)
        if args.refine_steps:
            config = config.with_overrides({"model.refine_steps": args.refine_steps})
    else:
        model, config = None, Config.from_flat({"variant": "baseline",
                                                "data.modality": args.modality})
    labels = config.data.modality == "seg4_onehot"
    fixed_img, fixed = _read(args.fixed, "--fixed")
    moving_img, moving = _read(args.moving, "--moving")
    if moving.shape != fixed.shape:
        raise ValueError(f"--moving has shape {moving.shape} but --fixed has shape {fixed.shape}; "
                         f"they must share one grid (resample the moving image onto the fixed grid "
                         f"first)")
    moving_seg = None
    if args.moving_seg is not None:
        _, moving_seg = _read(args.moving_seg, "--moving-seg")
        if moving_seg.shape != moving.shape:
            raise ValueError(f"--moving-seg has shape {moving_seg.shape}, expected the moving "
                             f"image's shape {moving.shape}")
        rounded = np.rint(moving_seg)
        if not np.allclose(rounded, moving_seg):
            raise ValueError(f"--moving-seg {args.moving_seg!r} holds non-integer values, expected "
                             f"a label map")
        moving_seg = rounded.astype(np.int64)
    _check_grid(moving_img, fixed_img, moving.shape)
    if labels:
        moving = _labels(moving, "--moving", args.moving)
        fixed = _labels(fixed, "--fixed", args.fixed)
    else:
        for what, path, data in (("--moving", args.moving, moving), ("--fixed", args.fixed, fixed)):
            _check_intensity(data, what, path)
        moving = normalise_intensity(moving.astype(np.float32))
        fixed = normalise_intensity(fixed.astype(np.float32))

    # all input checked: compute, then write
    fixed_mm = spacing_from_affine(np.asarray(fixed_img.affine, dtype=np.float64)).tolist()
    if model is None:
        ddf_vox = optimise_arrays(config, moving, fixed, device, args.io_steps or
                                  DEFAULT_IO_STEPS, args.io_levels, fixed_mm)
    else:
        ddf_vox = register_arrays(model, config, moving, fixed, device, fixed_mm)  # (3, D, H, W)
    ddf_t = torch.from_numpy(ddf_vox)[None].to(device)
    with torch.inference_mode():
        if labels:
            warped = warp_labels(torch.from_numpy(moving)[None].to(device), ddf_t)[0].cpu().numpy()
            warped = warped.astype(np.int16)
        else:
            warped = warp(torch.from_numpy(moving)[None, None].to(device), ddf_t)[0, 0].cpu().numpy()
        warped_seg = None
        if moving_seg is not None:
            warped_seg = warp_labels(torch.from_numpy(moving_seg)[None].to(device),
                                     ddf_t)[0].cpu().numpy().astype(np.int32)
        jac = jacobian_det(ddf_t)[0].cpu().numpy().astype(np.float32)
    affine = np.asarray(fixed_img.affine, dtype=np.float64)
    spacing_mm = spacing_from_affine(affine)
    ddf_mm = (np.moveaxis(ddf_vox, 0, -1) * spacing_mm).astype(np.float32)[:, :, :, None, :]

    outputs = {"warped.nii.gz": _nifti_bytes(warped, affine),
               "ddf_mm.nii.gz": _nifti_bytes(ddf_mm, affine, NIFTI_INTENT_VECTOR),
               "jacdet.nii.gz": _nifti_bytes(jac, affine)}
    if warped_seg is not None:
        outputs["warped_seg.nii.gz"] = _nifti_bytes(warped_seg, affine)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, payload in outputs.items():
        with atomic_open(out_dir / name, "wb") as handle:
            handle.write(payload)
    folding = 100.0 * float((jac <= 0).mean())
    print(f"registered {args.moving} -> {args.fixed} on {device.type}: |u| max "
          f"{float(np.linalg.norm(ddf_mm, axis=-1).max()):.2f} mm, folding {folding:.3f} %; "
          f"wrote {', '.join(sorted(outputs))} to {out_dir}")
    return 0


if __name__ == "__main__":
    from regcore.cli import run_cli

    run_cli(main, prog="regcore.register")
