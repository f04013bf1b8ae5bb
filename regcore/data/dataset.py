"""The cohort: subjects, a saved seeded split, registration pairs, lazy cached loading.

`load_cohort(data_cfg)` finds the subjects (`data.data_dir`, or the embedded cohort when it is
None), picks the atlas, makes or reuses the split and returns a `Cohort`. Volumes are read on
demand, resampled to `data.shape` and kept in a bounded LRU cache (the atlas is always kept), so a
394-subject cohort never sits in memory whole.

Split: the subjects other than the atlas are permuted with `data.split_seed`; the first `n_test`
are the test set, the next `n_val` the validation set, the rest (and the atlas) the training set.
The atlas is never in the test or validation set. The split is saved (atomically) as JSON, named
by its parameters, in `split_dir` when given, else in the data folder (a read-only one: kept in
memory, with a warning), and reused while its parameters and subject list match.

Pairs: `pairing="atlas"`: (atlas, subject) for every subject of the split other than the atlas.
`pairing="subject"`: every subject of the split is the fixed image once, its moving image drawn
(seeded) from the other subjects of the same split.
"""

from __future__ import annotations

import json
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from regcore import io as rio
from regcore.data.oasis import SubjectFiles, check_subject, discover_subjects, load_subject
from regcore.data.volume import N_SEG4_LABELS, Volume, one_hot

__all__ = ["Cohort", "load_cohort", "PairDataset", "check_data", "dataset_identity", "make_split", "find_atlas",
           "SPLITS"]

SPLITS = ("train", "val", "test")
SPLIT_VERSION = 1


def find_atlas(subject_ids, atlas: str) -> str:
    """The subject id containing `atlas` (an exact match wins over substrings)."""
    if atlas in subject_ids:
        return atlas
    matches = [s for s in subject_ids if atlas in s]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        shown = ", ".join(list(subject_ids)[:3]) + (", ..." if len(subject_ids) > 3 else "")
        raise ValueError(f"data.atlas == {atlas!r}: not found among the {len(subject_ids)} "
                         f"subjects ({shown}), expected a substring of one subject id")
    raise ValueError(f"data.atlas == {atlas!r}: ambiguous, matches {', '.join(matches)}")


def make_split(subject_ids, atlas_id: str | None, n_test: int, n_val: int,
               seed: int) -> dict[str, list[str]]:
    """Seeded train/val/test split; the atlas is always in train. Sorted lists."""
    others = sorted(s for s in subject_ids if s != atlas_id)
    if n_test + n_val >= len(others):
        raise ValueError(
            f"data.n_test + data.n_val == {n_test} + {n_val} leave no training subject: the "
            f"cohort has {len(others)} subjects besides the atlas, expected n_test + n_val <= "
            f"{len(others) - 1}")
    order = np.random.default_rng(seed).permutation(len(others))
    shuffled = [others[i] for i in order]
    train = shuffled[n_test + n_val:] + ([atlas_id] if atlas_id else [])
    return {"train": sorted(train), "val": sorted(shuffled[n_test:n_test + n_val]),
            "test": sorted(shuffled[:n_test])}


@dataclass
class Cohort:
    """Subjects on disk, their split and pairs, and cached loading at `data_cfg.shape`.

    `gt_atlas_id` is the subject against which the stored `true_ddf_vox` fields are defined
    (the embedded cohort's atlas), None for real data.
    """

    data_cfg: object
    root: Path
    files: dict[str, SubjectFiles]
    atlas_id: str | None
    split: dict[str, list[str]]
    split_path: Path | None = None
    gt_atlas_id: str | None = None
    cache_size: int = 16
    _cache: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _pinned: dict = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def subject_ids(self) -> list[str]:
        return sorted(self.files)

    def pairs(self, split: str) -> list[tuple[str, str]]:
        """[(moving_id, fixed_id), ...] of a split, in a fixed order."""
        if split not in SPLITS:
            raise ValueError(f"split == {split!r}, must be one of {', '.join(SPLITS)}")
        ids = self.split[split]
        if self.data_cfg.pairing == "atlas":
            return [(self.atlas_id, s) for s in ids if s != self.atlas_id]
        if len(ids) < 2:
            return []
        rng = np.random.default_rng([self.data_cfg.split_seed, SPLITS.index(split)])
        pairs = []
        for fixed in ids:
            choices = [s for s in ids if s != fixed]
            pairs.append((choices[int(rng.integers(len(choices)))], fixed))
        return pairs

    def load(self, subject_id: str) -> Volume:
        """One subject resampled to `data.shape` (cached; the atlas is always kept)."""
        if subject_id not in self.files:
            raise ValueError(f"subject_id == {subject_id!r}: not in the cohort at {self.root}")
        with self._lock:
            if subject_id in self._pinned:
                return self._pinned[subject_id]
            if subject_id in self._cache:
                self._cache.move_to_end(subject_id)
                return self._cache[subject_id]
        files = self.files[subject_id]
        want_image = self.data_cfg.modality == "intensity" or (
            files.image is not None and files.image.exists())
        volume = load_subject(files, self.data_cfg.shape, want_image=want_image)
        with self._lock:
            if subject_id in (self.atlas_id, self.gt_atlas_id):
                self._pinned[subject_id] = volume
            elif self.cache_size > 0:
                self._cache[subject_id] = volume
                self._cache.move_to_end(subject_id)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return volume

    def __getstate__(self):  # DataLoader workers: send no cached arrays, no lock
        state = dict(self.__dict__)
        state["_cache"], state["_pinned"], state["_lock"] = OrderedDict(), {}, None
        return state

    def __setstate__(self, state):
        state["_lock"] = threading.Lock()
        self.__dict__.update(state)


def _split_location(root: Path, data_cfg) -> tuple[Path, str]:
    folder = root if root.is_dir() else root.parent
    prefix = "" if root.is_dir() else f"{root.stem}_"
    atlas = "".join(c if c.isalnum() or c in "_-" else "-" for c in data_cfg.atlas)
    name = (f"{prefix}split_{atlas}_seed{data_cfg.split_seed}_test{data_cfg.n_test}"
            f"_val{data_cfg.n_val}.json")
    return folder, name


def _load_or_make_split(root: Path, data_cfg, ids: list[str], atlas_id: str | None,
                        split_dir) -> tuple[dict[str, list[str]], Path | None]:
    folder, name = _split_location(root, data_cfg)
    record = {"version": SPLIT_VERSION, "split_seed": data_cfg.split_seed,
              "n_test": data_cfg.n_test, "n_val": data_cfg.n_val, "atlas": atlas_id,
              "subjects": sorted(ids)}
    candidates = ([Path(split_dir) / name] if split_dir is not None else []) + [folder / name]
    for path in candidates:
        if path.is_file():
            try:
                saved = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # unreadable: remade below
            if all(saved.get(k) == v for k, v in record.items()) and all(
                    isinstance(saved.get(s), list) for s in SPLITS):
                return {s: saved[s] for s in SPLITS}, path
            warnings.warn(f"{path}: saved split does not match the cohort or its parameters; "
                          "making a new one", stacklevel=3)
    split = make_split(ids, atlas_id, data_cfg.n_test, data_cfg.n_val, data_cfg.split_seed)
    text = json.dumps({**record, **split}, indent=1)
    for path in candidates:
        try:
            rio.atomic_write_text(path, text)
            return split, path
        except OSError:
            continue
    warnings.warn(f"{folder}: not writable, the split is kept in memory only (pass split_dir "
                  "to save it)", stacklevel=3)
    return split, None


def load_cohort(data_cfg, *, split_dir: str | Path | None = None, cache_size: int = 16,
                embedded_seed: int = 0) -> Cohort:
    """The cohort of `data_cfg` (a `regcore.config.DataConfig`).

    `data_cfg.data_dir=None` builds or reuses the embedded cohort (`ensure_embedded`).
    Raises FileNotFoundError / ValueError (missing folder, no subjects, atlas not found, a split
    that leaves no training subject, ...).
    """
    from regcore.data.embedded import COHORT_FILE, ensure_embedded

    if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 0:
        raise ValueError(f"cache_size == {cache_size!r}, must be an integer >= 0")
    if data_cfg.data_dir is None:
        root = ensure_embedded(data_cfg, seed=embedded_seed)
    else:
        root = Path(data_cfg.data_dir).expanduser()
    subjects = discover_subjects(root, data_cfg.space, data_cfg.modality)
    files = {s.subject_id: s for s in subjects}
    ids = sorted(files)
    atlas_id = None
    if data_cfg.pairing == "atlas":
        atlas_id = find_atlas(ids, data_cfg.atlas)
    else:
        try:
            atlas_id = find_atlas(ids, data_cfg.atlas)
        except ValueError:
            atlas_id = None  # subject-to-subject pairs need no atlas
    if data_cfg.pairing == "subject":
        if data_cfg.n_test < 2:
            raise ValueError(f"data.n_test == {data_cfg.n_test}, must be >= 2 with data.pairing "
                             "'subject' (a pair needs two subjects)")
        if data_cfg.n_val == 1:
            raise ValueError("data.n_val == 1, must be 0 or >= 2 with data.pairing 'subject' "
                             "(a pair needs two subjects)")
    split, split_path = _load_or_make_split(root, data_cfg, ids, atlas_id, split_dir)
    if data_cfg.pairing == "subject" and len(split["train"]) < 2:
        raise ValueError(
            f"data.n_test + data.n_val == {data_cfg.n_test} + {data_cfg.n_val} leave one training "
            f"subject of {len(ids)}, expected at least two with data.pairing 'subject'")
    gt_atlas_id = None
    info_path = root / COHORT_FILE if root.is_dir() else None
    if info_path is not None and info_path.is_file():
        try:
            gt_atlas_id = json.loads(info_path.read_text(encoding="utf-8")).get("atlas")
        except (OSError, ValueError):
            gt_atlas_id = None
        if gt_atlas_id not in files:
            gt_atlas_id = None
    return Cohort(data_cfg, root, files, atlas_id, split, split_path, gt_atlas_id, cache_size)


class PairDataset(Dataset):
    """A torch Dataset of the registration pairs of one split.

    Each item is a dict:
      moving, fixed:          (C, D, H, W) float32 tensors; C = 5 (seg4 one-hot) or 1 (intensity)
      moving_seg, fixed_seg:  (D, H, W) int64 seg4 labels (for evaluation)
      spacing_mm:             (3,) float32, the fixed image's voxel size
      fixed_affine:           (4, 4) float64, voxel -> world of the fixed grid (to write outputs)
      moving_id, fixed_id:    str
      has_true_ddf:           bool; True when the ground truth of this pair is known (embedded
                              cohort, moving = its atlas)
      true_ddf_vox:           (3, D, H, W) float32 with fixed(x) = moving(x + u(x)); present
                              only when has_true_ddf is True.
    """

    def __init__(self, cohort: Cohort, split: str):
        self.cohort = cohort
        self.split = split
        self.pairs = cohort.pairs(split)

    def __len__(self) -> int:
        return len(self.pairs)

    def _channels(self, volume: Volume) -> np.ndarray:
        if self.cohort.data_cfg.modality == "seg4_onehot":
            return one_hot(volume.seg4, N_SEG4_LABELS)
        return volume.image

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index == {index}, the {self.split} split has {len(self)} pairs")
        moving_id, fixed_id = self.pairs[index]
        moving, fixed = self.cohort.load(moving_id), self.cohort.load(fixed_id)
        if moving.shape != fixed.shape:
            raise ValueError(f"pair ({moving_id}, {fixed_id}): shapes {moving.shape} and "
                             f"{fixed.shape} differ")
        item = {
            "moving": torch.from_numpy(np.ascontiguousarray(self._channels(moving), np.float32)),
            "fixed": torch.from_numpy(np.ascontiguousarray(self._channels(fixed), np.float32)),
            "moving_seg": torch.from_numpy(moving.seg4.astype(np.int64)),
            "fixed_seg": torch.from_numpy(fixed.seg4.astype(np.int64)),
            "spacing_mm": torch.tensor(np.asarray(fixed.spacing_mm), dtype=torch.float32),
            "fixed_affine": torch.tensor(np.asarray(fixed.affine), dtype=torch.float64),
            "moving_id": moving_id,
            "fixed_id": fixed_id,
        }
        has_truth = (moving_id == self.cohort.gt_atlas_id and fixed.true_ddf_vox is not None)
        item["has_true_ddf"] = bool(has_truth)
        if has_truth:
            item["true_ddf_vox"] = torch.from_numpy(np.ascontiguousarray(fixed.true_ddf_vox,
                                                                         np.float32))
        return item


def check_data(data_cfg, *, split_dir: str | Path | None = None) -> dict:
    """Check every file of every split before training; raise at the first problem.

    Each failure is one line naming the file and the problem (FileNotFoundError for a missing
    folder or file, ValueError for an unreadable file, labels outside 0..4 or non-integer,
    NaN intensities, shapes that disagree within a subject, no subject, atlas not found).
    Returns a summary: root, subject count, split sizes, native shapes, the atlas.
    """
    cohort = load_cohort(data_cfg, split_dir=split_dir, cache_size=0)
    shapes: dict[tuple, int] = {}
    for split in SPLITS:
        for subject_id in cohort.split[split]:
            shape = check_subject(cohort.files[subject_id], data_cfg.modality)
            shapes[shape] = shapes.get(shape, 0) + 1
    return {"root": str(cohort.root), "subjects": len(cohort.files),
            "split": {s: len(cohort.split[s]) for s in SPLITS},
            "pairs": {s: len(cohort.pairs(s)) for s in SPLITS},
            "native_shapes": {"x".join(map(str, k)): v for k, v in shapes.items()},
            "atlas": cohort.atlas_id, "split_path": str(cohort.split_path)}


def dataset_identity(data_cfg) -> dict:
    """What identifies the data a run trains and is tested on, for a tracking store's dataset
    record: `name`, `digest`, `source` (the cohort's folder), `profile` (subjects, split, pairs).

    The digest (16 hex digits of a SHA-256) covers each subject's files by path relative to the
    cohort folder and size, the split and the data settings that change what a network sees
    (shape, modality, space, pairing): the same cohort gives the same digest on any machine or
    path. File contents are not read (a 128^3 cohort is gigabytes).
    """
    import hashlib

    cohort = load_cohort(data_cfg, cache_size=0)
    root = cohort.root.resolve()
    entries = []
    for subject_id in sorted(cohort.files):
        for path in sorted(cohort.files[subject_id].paths()):
            resolved = path.resolve()
            try:
                relative = str(resolved.relative_to(root))
            except ValueError:  # a list file naming files elsewhere: keep the file's name
                relative = resolved.name
            entries.append([subject_id, relative, resolved.stat().st_size])
    settings = {"shape": list(data_cfg.shape), "modality": data_cfg.modality,
                "space": data_cfg.space, "pairing": data_cfg.pairing}
    blob = json.dumps({"files": entries, "split": cohort.split, "settings": settings},
                      sort_keys=True).encode()
    embedded = data_cfg.data_dir is None
    return {
        "name": f"embedded-{root.name}" if embedded else root.name,
        "digest": hashlib.sha256(blob).hexdigest()[:16],
        "source": str(root),
        "profile": {"kind": "embedded cohort" if embedded else "data directory",
                    "subjects": len(cohort.files), "atlas": cohort.atlas_id,
                    "split": {s: len(cohort.split[s]) for s in SPLITS},
                    "pairs": {s: len(cohort.pairs(s)) for s in SPLITS}, **settings},
    }
