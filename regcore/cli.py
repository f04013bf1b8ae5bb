"""How every command of the project turns a caller's mistake into one line and exit code 2.

Errors for callers are ValueError, TypeError, FileNotFoundError (and `UsageError`); the message
names the parameter or file, the value received and what was expected. A command wraps its
`main` with `run_cli`, which prints `error: <message>` on one line of stderr and exits 2, with no
traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

__all__ = ["UsageError", "ArgumentParser", "run_cli", "one_line"]


class UsageError(Exception):
    """A bad command line or environment (conflicting flags, unreachable server, ...)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises `UsageError` on a bad command line (one line and exit 2 through
    `run_cli`) instead of printing its usage and exiting."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message)


CALLER_ERRORS = (UsageError, ValueError, TypeError, FileNotFoundError, NotADirectoryError,
                 IsADirectoryError, PermissionError)


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, (FileNotFoundError, NotADirectoryError, IsADirectoryError,
                          PermissionError)) and error.filename and str(error.filename) not in text:
        text = f"{text}: {error.filename}"
    return text


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None,
            prog: str | None = None) -> None:
    """Run `main(argv)`; exit with its return code, or 2 with one line for a caller's error."""
    try:
        code = main(argv)
    except CALLER_ERRORS as error:
        name = prog or "regablate"
        print(f"{name}: error: {one_line(error)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
