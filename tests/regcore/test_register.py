"""python -m regcore.register: outputs, affines, identity of an untrained model, bad input."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from regcore.checkpoint import save_checkpoint
from regcore.cli import run_cli
from regcore.config import Config
from regcore.register import NIFTI_INTENT_VECTOR, main

TRAIN_SHAPE = (16, 16, 16)


def _model_checkpoint(root, **overrides):
    """An untrained, identity-initialised model saved as a checkpoint (epoch 0)."""
    from regcore.networks import build_model

    config = Config.from_flat({"variant": "combined_enhanced", "data.shape": list(TRAIN_SHAPE),
                               "model.enc_channels": [4, 8, 8, 8],
                               "model.dec_channels": [8, 8, 8, 8, 8, 4, 4], **overrides})
    torch.manual_seed(0)
    channels = 5 if config.data.modality == "seg4_onehot" else 1
    model = build_model(config.model, channels, affine=config.affine)
    return save_checkpoint(root, epoch=0, model=model, optimizer=None, config=config)


def _labels(shape, seed=0):
    """A seg4-like label map: nested blobs of labels 1..4 on background."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    radius = np.sqrt((grid ** 2).sum(0)) + 0.05 * np.random.default_rng(seed).standard_normal(shape)
    labels = np.zeros(shape, dtype=np.int16)
    for label, r in ((4, 0.9), (1, 0.75), (3, 0.55), (2, 0.25)):
        labels[radius < r] = label
    return labels


AFFINE = np.array([[0.0, 0.0, 1.2, -10.0], [-1.1, 0.0, 0.0, 20.0], [0.0, 1.3, 0.0, -5.0], [0, 0, 0, 1]])


def _write(path, data, affine=AFFINE):
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return str(path)


@pytest.fixture(scope="module")
def seg_checkpoint(tmp_path_factory):
    return _model_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.mark.parametrize("shape", [TRAIN_SHAPE, (20, 18, 17)])
def test_identity_when_moving_equals_fixed(seg_checkpoint, tmp_path, shape, capsys):
    labels = _labels(shape)
    image = _write(tmp_path / "img.nii.gz", labels)
    seg = _write(tmp_path / "seg.nii.gz", labels)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        run_cli(main, ["--checkpoint", str(seg_checkpoint), "--moving", image, "--fixed", image,
                       "--moving-seg", seg, "--out-dir", str(out)])
    assert stop.value.code == 0, capsys.readouterr().err
    outputs = {name: nib.load(str(out / f"{name}.nii.gz")) for name in
               ("warped", "warped_seg", "ddf_mm", "jacdet")}
    for name, img in outputs.items():
        np.testing.assert_allclose(img.affine, AFFINE, err_msg=name)
        assert img.shape[:3] == shape, name
    ddf = outputs["ddf_mm"]
    assert ddf.shape == (*shape, 1, 3)
    assert ddf.header.get_intent()[0] == "vector"
    assert int(ddf.header["intent_code"]) == NIFTI_INTENT_VECTOR
    assert np.abs(np.asarray(ddf.dataobj)).max() < 1e-2  # flow head starts near 0, affine at [I|0]
    np.testing.assert_allclose(np.asarray(outputs["jacdet"].dataobj), 1.0, atol=1e-2)
    np.testing.assert_array_equal(np.asarray(outputs["warped"].dataobj), labels)
    np.testing.assert_array_equal(np.asarray(outputs["warped_seg"].dataobj), labels)


def test_intensity_model_writes_float_warped_image(tmp_path, capsys):
    checkpoint = _model_checkpoint(tmp_path / "ckpt", **{"data.modality": "intensity"})
    image = _labels(TRAIN_SHAPE).astype(np.float32) * 25.0
    path = _write(tmp_path / "img.nii.gz", image)
    with pytest.raises(SystemExit) as stop:
        run_cli(main, ["--checkpoint", str(checkpoint / "state.pt"), "--moving", path,
                       "--fixed", path, "--out-dir", str(tmp_path / "out")])
    assert stop.value.code == 0, capsys.readouterr().err
    warped = np.asarray(nib.load(str(tmp_path / "out" / "warped.nii.gz")).dataobj)
    np.testing.assert_allclose(warped, image / image.max(), atol=1e-2)  # scaled to [0, 1]
    assert not (tmp_path / "out" / "warped_seg.nii.gz").exists()


def _bad_cases(tmp_path, checkpoint):
    labels = _labels(TRAIN_SHAPE)
    good = _write(tmp_path / "good.nii.gz", labels)
    other = _write(tmp_path / "other.nii.gz", _labels((16, 16, 15)))
    wild = _write(tmp_path / "wild.nii.gz", labels.astype(np.float32) * 3.5)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "state.pt").write_bytes((checkpoint / "state.pt").read_bytes()[:500])
    return {
        "missing moving": (["--moving", str(tmp_path / "no.nii.gz"), "--fixed", good,
                            "--checkpoint", str(checkpoint)], "--moving '"),
        "shapes differ": (["--moving", other, "--fixed", good, "--checkpoint", str(checkpoint)],
                          "--moving has shape (16, 16, 15) but --fixed has shape (16, 16, 16)"),
        "seg shape": (["--moving", good, "--fixed", good, "--moving-seg", other,
                       "--checkpoint", str(checkpoint)], "--moving-seg has shape (16, 16, 15)"),
        "not labels": (["--moving", wild, "--fixed", good, "--checkpoint", str(checkpoint)],
                       "expected seg4 labels 0..4"),
        "corrupt checkpoint": (["--moving", good, "--fixed", good, "--checkpoint", str(corrupt)],
                               "corrupt/state.pt' is truncated or corrupt"),
        "missing checkpoint": (["--moving", good, "--fixed", good, "--checkpoint",
                                str(tmp_path / "nockpt")], "nockpt' does not exist"),
        "missing flag": (["--moving", good, "--checkpoint", str(checkpoint)],
                         "the following arguments are required: --fixed"),
    }


def _assert_refused(argv, message, tmp_path, capsys):
    """The command exits 2 with one line holding `message` and writes no output folder."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        run_cli(main, [*argv, "--out-dir", str(out)], prog="regcore.register")
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not out.exists()


@pytest.mark.parametrize("case", ["missing moving", "shapes differ", "seg shape", "not labels",
                                  "corrupt checkpoint", "missing checkpoint", "missing flag"])
def test_bad_input_one_line_exit_2_nothing_written(seg_checkpoint, tmp_path, case, capsys):
    argv, message = _bad_cases(tmp_path, seg_checkpoint)[case]
    _assert_refused(argv, message, tmp_path, capsys)


def _shifted_pair(tmp_path, shape=(16, 16, 16)):
    """A smooth intensity blob and the same blob shifted by one voxel along axis 0."""
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    centre = np.array([7.5, 7.5, 7.5], dtype=np.float32).reshape(3, 1, 1, 1)
    fixed = np.exp(-((grid - centre) ** 2).sum(0) / 18.0) * 100.0
    moving = np.exp(-((grid - centre - np.array([1.0, 0, 0]).reshape(3, 1, 1, 1)) ** 2
                      ).sum(0) / 18.0) * 100.0
    labels = (moving > 40).astype(np.int16) + (moving > 80).astype(np.int16)
    return (_write(tmp_path / "m.nii.gz", moving.astype(np.float32)),
            _write(tmp_path / "f.nii.gz", fixed.astype(np.float32)),
            _write(tmp_path / "ms.nii.gz", labels))


def test_method_io_needs_no_checkpoint_and_recovers_a_shift(tmp_path, capsys):
    moving, fixed, seg = _shifted_pair(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        run_cli(main, ["--method", "io", "--moving", moving, "--fixed", fixed, "--moving-seg", seg,
                       "--io-steps", "60", "--out-dir", str(out)])
    assert stop.value.code == 0, capsys.readouterr().err
    assert {p.name for p in out.iterdir()} == {"warped.nii.gz", "warped_seg.nii.gz",
                                               "ddf_mm.nii.gz", "jacdet.nii.gz"}
    ddf_mm = np.asarray(nib.load(str(out / "ddf_mm.nii.gz")).dataobj)[..., 0, :]
    # fixed(x) = moving(x + u): u = +1 voxel along axis 0 where the blob is; voxel size 1.1 mm
    fixed_image = np.asarray(nib.load(fixed).dataobj)
    inside = fixed_image > 30
    assert abs(float(ddf_mm[inside, 0].mean()) / 1.1 - 1.0) < 0.35


def _io_bad_cases(tmp_path, checkpoint):
    moving, fixed, _ = _shifted_pair(tmp_path)
    nan = np.asarray(nib.load(moving).dataobj).copy()
    nan[0, 0, 0] = np.nan
    half = AFFINE.copy()
    half[:3, :3] *= 2
    return {
        "io with checkpoint": (["--method", "io", "--checkpoint", str(checkpoint)],
                               "--checkpoint is not used by --method io"),
        "io with refine": (["--method", "io", "--refine-steps", "5"],
                           "--refine-steps applies after a network"),
        "network without checkpoint": ([], "--checkpoint is required with --method network"),
        "negative refine": (["--checkpoint", str(checkpoint), "--refine-steps", "-1"],
                            "--refine-steps == -1"),
        "nan image": (["--method", "io", "--moving", _write(tmp_path / "nan.nii.gz", nan)],
                      "holds NaN or infinite values"),
        "constant image": (["--method", "io", "--moving",
                            _write(tmp_path / "c.nii.gz", np.ones((16, 16, 16), np.float32))],
                           "is constant"),
        "voxel sizes differ": (["--method", "io", "--moving",
                                _write(tmp_path / "h.nii.gz", np.asarray(nib.load(moving).dataobj),
                                       half)], "resample the moving image onto the fixed grid"),
        "too small": (["--method", "io", "--moving",
                       _write(tmp_path / "s.nii.gz", np.random.rand(6, 6, 6).astype(np.float32)),
                       "--fixed", _write(tmp_path / "s2.nii.gz",
                                         np.random.rand(6, 6, 6).astype(np.float32))],
                      "every side must be at least 8 voxels"),
    }, moving, fixed


@pytest.mark.parametrize("case", ["io with checkpoint", "io with refine",
                                  "network without checkpoint", "negative refine", "nan image",
                                  "constant image", "voxel sizes differ", "too small"])
def test_io_and_refine_refusals_one_line_exit_2(seg_checkpoint, tmp_path, case, capsys):
    cases, moving, fixed = _io_bad_cases(tmp_path, seg_checkpoint)
    argv, message = cases[case]
    if "--moving" not in argv:
        argv = [*argv, "--moving", moving]
    if "--fixed" not in argv:
        argv = [*argv, "--fixed", fixed]
    _assert_refused(argv, message, tmp_path, capsys)


def test_refine_steps_after_a_network(tmp_path, capsys):
    checkpoint = _model_checkpoint(tmp_path / "ckpt", **{"data.modality": "intensity"})
    moving, fixed, _ = _shifted_pair(tmp_path)
    fields = {}
    for steps in ("0", "40"):
        out = tmp_path / f"out{steps}"
        with pytest.raises(SystemExit) as stop:
            run_cli(main, ["--checkpoint", str(checkpoint), "--moving", moving, "--fixed", fixed,
                           "--refine-steps", steps, "--out-dir", str(out)])
        assert stop.value.code == 0, capsys.readouterr().err
        fields[steps] = np.asarray(nib.load(str(out / "ddf_mm.nii.gz")).dataobj)[..., 0, 0]
    inside = np.asarray(nib.load(fixed).dataobj) > 30
    # the untrained network barely moves; refinement moves towards the +1 voxel shift
    assert fields["40"][inside].mean() > fields["0"][inside].mean() + 0.3
