"""`python -m regcore.data build|check`: build the embedded cohort, or check a data folder.

    python -m regcore.data build --out DIR --subjects 24 --shape 64 [--seed 0]
    python -m regcore.data check --data-dir DIR [--shape 64] [--modality seg4_onehot] ...

`check` reads every file of every split and prints a one-line JSON summary; a bad input is one
line on stderr and exit code 2 (`regcore.cli.run_cli`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Sequence

from regcore.cli import ArgumentParser, run_cli

PROG = "python -m regcore.data"


def _shape(text: str) -> tuple[int, int, int]:
    try:
        parts = [int(p) for p in text.replace("x", ",").split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape == {text!r}, expected N or D,H,W") from None
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"--shape == {text!r}, expected N or D,H,W")
    return tuple(parts)


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    build = sub.add_parser("build", help="build the embedded cohort into a new folder")
    build.add_argument("--out", required=True, help="new folder for the cohort")
    build.add_argument("--subjects", type=int, default=24, help="subjects besides the atlas")
    build.add_argument("--shape", type=_shape, default=(64, 64, 64), help="N or D,H,W")
    build.add_argument("--seed", type=int, default=0)
    check = sub.add_parser("check", help="check every file of every split")
    check.add_argument("--data-dir", default=None,
                       help="subject folders or a .npy list file (default: the embedded cohort)")
    check.add_argument("--embedded-dir", default=None)
    check.add_argument("--shape", type=_shape, default=None)
    for name in ("modality", "space", "pairing", "atlas"):
        check.add_argument(f"--{name}", default=None)
    for name in ("n-test", "n-val", "split-seed"):
        check.add_argument(f"--{name}", type=int, default=None)
    check.add_argument("--split-dir", default=None, help="where to save the split if the data "
                       "folder is read-only")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "build":
        from regcore.data.embedded import build_embedded

        start = time.perf_counter()
        out = build_embedded(args.out, args.subjects, args.shape, args.seed)
        size = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())
        print(json.dumps({"out": str(out), "subjects": args.subjects, "shape": list(args.shape),
                          "seed": args.seed, "build_s": round(time.perf_counter() - start, 2),
                          "size_mb": round(size / 2 ** 20, 2)}))
        return 0
    from regcore.config import DataConfig
    from regcore.data.dataset import check_data

    overrides = {k: v for k, v in {
        "data_dir": args.data_dir, "embedded_dir": args.embedded_dir, "shape": args.shape,
        "modality": args.modality, "space": args.space, "pairing": args.pairing,
        "atlas": args.atlas, "n_test": args.n_test, "n_val": args.n_val,
        "split_seed": args.split_seed}.items() if v is not None}
    summary = check_data(DataConfig(**overrides), split_dir=args.split_dir)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    run_cli(main, prog=PROG)
