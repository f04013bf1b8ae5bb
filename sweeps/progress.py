"""The sweep's live view on the terminal, and where Ray's own output goes instead.

One line: trials done / running / failed of all of the sweep's trials (both Tuners), the
elapsed time, an ETA and the best value so far of the primary metric, e.g.

    sweep  3/6 done, 2 running, 0 failed | 1m12s elapsed, ETA 0m40s | best val.dice_mean 0.734 (regloss-s0)

On a terminal it is redrawn in place (carriage return and ANSI erase-line) at most once a
second; elsewhere (a log, CI) it is printed as a plain line when a trial changes state, at most
once every `interval_s` seconds, and once at the end. The ETA counts work in epochs: the epochs
trained since the view started (a resumed sweep's earlier trials are not counted as speed),
the epochs still to train (a finished trial, or one stopped early by the scheduler, has none
left) and their ratio to the time elapsed.

Ray's status tables, its checkpoint messages and the trials' own output go to `ray.log` in the
sweep's folder (`RayLog` points the process's stdout and stderr there for the Tune part;
`--verbose` copies them to the terminal too).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ray import tune

__all__ = ["Progress", "ProgressCallback", "RayLog", "Console", "View", "format_duration"]

FINISHED, FAILED, RUNNING = "TERMINATED", "ERROR", "RUNNING"


def format_duration(seconds: float | None) -> str:
    """62 -> '1m02s', 3700 -> '1h01m', None or NaN -> '?'."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


@dataclass
class Progress:
    """The counts, timing and best result of a sweep; `line()` formats them (pure: the clock is
    passed in)."""

    total: int  # every trial the sweep will run (the grid plus the search's samples)
    epochs: int  # epochs of one trial
    metric: str = "val.dice_mean"
    mode: str = "max"
    started: float = 0.0
    #: (part, trial id) -> [status, epochs trained]
    trials: dict[tuple[str, str], list[Any]] = field(default_factory=dict)
    #: epochs already trained when the view first saw each trial (not counted as speed)
    _work_at_start: float = 0.0
    best: tuple[float, str] | None = None

    def observe(self, part: str, trial_id: str, status: str, epoch: int | None = None) -> bool:
        """Record a trial's status (and epochs trained); True when its status changed."""
        key = (part, trial_id)
        known = self.trials.get(key)
        if known is None:
            known = self.trials[key] = [status, 0]
            self._work_at_start += self._work(known[0], epoch or 0)
            changed = True
        else:
            changed = known[0] != status
            known[0] = status
        if epoch is not None:
            known[1] = max(known[1], int(epoch))
        return changed

    def result(self, name: str, value: Any) -> None:
        """A reported value of the primary metric from trial `name`."""
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
            return
        better = (self.best is None or (value > self.best[0] if self.mode == "max"
                                        else value < self.best[0]))
        if better:
            self.best = (float(value), name)

    def _work(self, status: str, epoch: int) -> float:
        return float(self.epochs if status in (FINISHED, FAILED) else min(epoch, self.epochs))

    def counts(self) -> tuple[int, int, int]:
        """(done, running, failed) over every trial seen."""
        states = [s for s, _ in self.trials.values()]
        return states.count(FINISHED), states.count(RUNNING), states.count(FAILED)

    def eta_s(self, now: float) -> float | None:
        """Seconds left at the speed (epochs per second) since the view started; None until
        one epoch was trained."""
        work = sum(self._work(s, e) for s, e in self.trials.values())
        remaining = self.total * self.epochs - work
        if remaining <= 0:
            return 0.0
        gained, elapsed = work - self._work_at_start, now - self.started
        if gained <= 0 or elapsed <= 0:
            return None
        return remaining * elapsed / gained

    def line(self, now: float) -> str:
        done, running, failed = self.counts()
        width = len(str(self.total))
        text = (f"sweep {done + failed:>{width}}/{self.total} done, {running} running, "
                f"{failed} failed | {format_duration(now - self.started)} elapsed, "
                f"ETA {format_duration(self.eta_s(now))}")
        if self.best is not None:
            text += f" | best {self.metric} {self.best[0]:.4g} ({self.best[1]})"
        return text


class Console:
    """Where the sweep's own lines go: the terminal as it was before `RayLog` redirected the
    process's output. `quiet`: only errors and the final summary."""

    def __init__(self, stream: IO[str] | None = None, quiet: bool = False,
                 interval_s: float = 10.0, tty: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.quiet = quiet
        self.interval_s = interval_s
        self.tty = self.stream.isatty() if tty is None else tty
        self._drawn = False

    def say(self, text: str) -> None:
        """A line of the sweep (not shown with --quiet)."""
        if not self.quiet:
            self.write_line(text)

    def write_line(self, text: str) -> None:
        if self._drawn:  # end the live line first
            self.stream.write("\n")
            self._drawn = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def draw(self, text: str) -> None:
        """Redraw the live line in place (terminal only)."""
        try:
            width = os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, ValueError, AttributeError):
            width = 0
        width = width if width >= 40 else 200  # unknown (a pty without a size): don't cut
        self.stream.write("\r\x1b[K" + text[: max(width - 1, 20)])
        self.stream.flush()
        self._drawn = True

    def end_live(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


class View:
    """A Progress shown on a Console: redraws (tty) or plain lines (else), rate-limited."""

    def __init__(self, progress: Progress, console: Console,
                 clock=time.monotonic) -> None:
        self.progress, self.console, self.clock = progress, console, clock
        self._last = float("-inf")
        self._pending = False
        self._lock = threading.Lock()

    def changed(self) -> None:
        self._pending = True
        self.tick()

    def tick(self) -> None:
        if self.console.quiet:
            return
        with self._lock:
            now = self.clock()
            if self.console.tty:
                if now - self._last >= 1.0 or self._pending:
                    self.console.draw(self.progress.line(now))
                    self._last, self._pending = now, False
            elif self._pending and now - self._last >= self.console.interval_s:
                self.console.write_line(self.progress.line(now))
                self._last, self._pending = now, False

    def finish(self) -> None:
        if self.console.quiet:
            return
        now = self.clock()
        if self.console.tty:
            self.console.draw(self.progress.line(now))
            self.console.end_live()
        else:
            self.console.write_line(self.progress.line(now))


def _run_name(trial) -> str:
    name, trial_id = str(trial), str(trial.trial_id)
    return name[: -len(trial_id) - 1] if name.endswith(f"_{trial_id}") else name


class ProgressCallback(tune.Callback):
    """Tune callback that feeds the sweep's view. The view is a class attribute set by the
    driver (Tune pickles its callbacks into the experiment state; a terminal does not pickle),
    so a restored Tuner's copy reaches the same view."""

    view: View | None = None

    def __init__(self, part: str) -> None:
        self.part = part

    def _observe(self, trials, epoch_of=None) -> None:
        view = type(self).view
        if view is None:
            return
        changed = False
        for trial in trials:
            epoch = (trial.last_result or {}).get("epoch") if epoch_of is None else None
            changed |= view.progress.observe(self.part, str(trial.trial_id), str(trial.status),
                                             int(epoch) if isinstance(epoch, (int, float))
                                             else None)
        if changed:
            view.changed()
        else:
            view.tick()

    def on_step_end(self, iteration, trials, **info) -> None:
        self._observe(trials)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        view = type(self).view
        if view is not None:
            view.progress.result(_run_name(trial), result.get(view.progress.metric))
        self._observe(trials)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._observe(trials)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._observe(trials)


class RayLog:
    """Point the process's stdout and stderr (file descriptors 1 and 2: Python, Ray's loggers,
    its C++ core and the trials' forwarded output alike) at `path` for the block; `tee` copies
    everything to the terminal too. `terminal` is a text stream on the original stdout, for
    the sweep's own lines meanwhile."""

    #: seconds without new output before the block ends, and the most it waits for them
    QUIET_S = 1.0
    DRAIN_LIMIT_S = 5.0

    def __init__(self, path: Path, tee: bool = False, preamble: str = "") -> None:
        self.path, self.tee, self.preamble = Path(path), tee, preamble
        self.terminal: IO[str] | None = None

    def __enter__(self) -> "RayLog":
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved = [os.dup(1), os.dup(2)]
        self.terminal = os.fdopen(os.dup(1), "w", buffering=1)
        self._log = open(self.path, "a", encoding="utf-8")
        if self.preamble:
            self._log.write(self.preamble)
            self._log.flush()
        self._pump = None
        if self.tee:
            read_fd, write_fd = os.pipe()
            self._pump = threading.Thread(target=self._copy, args=(read_fd,), daemon=True)
            self._pump.start()
            target = write_fd
        else:
            target = self._log.fileno()
        os.dup2(target, 1)
        os.dup2(target, 2)
        if self.tee:
            os.close(write_fd)
        return self

    def _drain(self) -> None:
        """Wait until the log has not grown for `QUIET_S` seconds (at most `DRAIN_LIMIT_S`):
        Ray forwards the trials' output to the driver asynchronously, and a line that arrives
        after the file descriptors are restored (a last checkpoint message) would land on the
        terminal."""
        def size() -> int:
            return os.fstat(self._log.fileno()).st_size

        deadline = time.monotonic() + self.DRAIN_LIMIT_S
        last, quiet_since = size(), time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - quiet_since < self.QUIET_S:
            time.sleep(0.05)
            now = size()
            if now != last:
                last, quiet_since = now, time.monotonic()

    def _copy(self, read_fd: int) -> None:
        with os.fdopen(read_fd, "rb", buffering=0) as source:
            while chunk := source.read(65536):
                self._log.buffer.write(chunk)
                self._log.flush()
                os.write(self._saved[0], chunk)

    def __exit__(self, *exc) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self._drain()
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        if self._pump is not None:
            self._pump.join(timeout=5)  # the pipe closes once fds 1 and 2 let go of it
        for fd in self._saved:
            os.close(fd)
        self._log.close()
        self.terminal.close()
