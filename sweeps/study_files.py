"""The study a sweep runs: `--study NAME` (a file shipped in sweeps/studies/) or `--study PATH`.

A study file (regcore.study) declares the factors, their levels as config overrides, the
cells, the seeds, the metrics and the weight-search space. Without `--study` a sweep runs
the original 2x2 (`affine_x_regularizers`).
"""

from __future__ import annotations

from pathlib import Path

from regcore.study import Study, read_study

__all__ = ["STUDIES_DIR", "DEFAULT_STUDY", "shipped_studies", "load_study"]

STUDIES_DIR = Path(__file__).resolve().parent / "studies"
DEFAULT_STUDY = "affine_x_regularizers"


def shipped_studies() -> list[str]:
    """Names of the studies shipped in sweeps/studies/ (file names without .yaml)."""
    return sorted(p.stem for p in STUDIES_DIR.glob("*.yaml"))


def load_study(spec: str | None, cwd: Path) -> Study:
    """The validated study named `spec` (a shipped name, or a path to a .yaml/.json file)."""
    spec = DEFAULT_STUDY if spec is None else spec
    path = Path(spec).expanduser()
    if not path.is_absolute():
        path = cwd / path
    if path.is_file():
        return read_study(path)
    shipped = STUDIES_DIR / f"{spec}.yaml"
    if shipped.is_file():
        return read_study(shipped)
    raise FileNotFoundError(f"--study {spec!r}: no such file and no shipped study of that name "
                            f"(shipped: {', '.join(shipped_studies())})")
