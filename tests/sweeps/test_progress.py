"""The sweep's live view as a unit: counts, ETA maths, best so far, tty redraw vs plain lines."""

from __future__ import annotations

import io

import pytest

from sweeps.progress import Console, Progress, View, format_duration


def test_format_duration():
    assert format_duration(0) == "0m00s"
    assert format_duration(62.4) == "1m02s"
    assert format_duration(3700) == "1h01m"
    assert format_duration(None) == "?" and format_duration(float("nan")) == "?"


def test_counts_eta_and_best():
    p = Progress(total=6, epochs=2, started=100.0)
    assert p.line(100.0) == "sweep 0/6 done, 0 running, 0 failed | 0m00s elapsed, ETA ?"
    for trial in "abcd":
        p.observe("ablation" if trial != "d" else "search", trial, "PENDING")
    p.observe("ablation", "a", "RUNNING", epoch=1)
    p.observe("ablation", "b", "TERMINATED", epoch=2)
    p.observe("ablation", "c", "PENDING")
    assert p.counts() == (1, 1, 0)
    # work: 1 + 2 = 3 of 6 x 2 = 12 epochs in 30 s -> 9 epochs left at 0.1 epoch/s = 90 s
    assert p.eta_s(130.0) == pytest.approx(90.0)
    p.observe("search", "d", "ERROR", epoch=1)  # a failed trial has no work left
    assert p.counts() == (1, 1, 1)
    assert p.eta_s(130.0) == pytest.approx((12 - 5) * 30 / 5)
    p.result("regloss-s0", 0.71)
    p.result("baseline-s0", 0.65)
    p.result("x", float("nan"))
    assert p.best == (0.71, "regloss-s0")
    assert p.line(130.0) == ("sweep 2/6 done, 1 running, 1 failed | 0m30s elapsed, ETA 0m42s "
                             "| best val.dice_mean 0.71 (regloss-s0)")


def test_eta_ignores_work_done_before_the_view_started():
    """A resumed sweep: trials finished in the first run are not counted as speed."""
    p = Progress(total=4, epochs=5, started=0.0)
    p.observe("ablation", "old1", "TERMINATED", epoch=5)
    p.observe("ablation", "old2", "TERMINATED", epoch=5)
    p.observe("ablation", "new", "RUNNING", epoch=0)
    assert p.eta_s(10.0) is None  # nothing trained since the start
    p.observe("ablation", "new", "RUNNING", epoch=2)  # 2 epochs in 10 s; 8 epochs left
    assert p.eta_s(10.0) == pytest.approx(40.0)
    p.observe("ablation", "new", "TERMINATED", epoch=5)
    p.observe("ablation", "last", "TERMINATED", epoch=5)
    assert p.eta_s(20.0) == 0.0 and p.counts() == (4, 0, 0)


def test_min_mode_keeps_the_lowest():
    p = Progress(total=1, epochs=1, metric="val.loss", mode="min")
    p.result("a", 2.0)
    p.result("b", 1.0)
    p.result("c", 3.0)
    assert p.best == (1.0, "b")


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_plain_lines_on_state_changes_at_most_every_interval():
    out, clock = io.StringIO(), _Clock()
    p = Progress(total=2, epochs=1, started=0.0)
    view = View(p, Console(out, interval_s=10.0, tty=False), clock=clock)
    p.observe("ablation", "a", "RUNNING")
    view.changed()  # printed: the first line
    clock.now = 3.0
    p.observe("ablation", "b", "RUNNING")
    view.changed()  # within 10 s of the last line: held back
    view.tick()
    assert out.getvalue().count("\n") == 1
    clock.now = 12.0
    view.tick()  # the held-back change, now due
    clock.now = 20.0
    view.tick()  # nothing changed: no line
    p.observe("ablation", "a", "TERMINATED", epoch=1)
    p.observe("ablation", "b", "TERMINATED", epoch=1)
    clock.now = 25.0
    view.finish()
    lines = out.getvalue().splitlines()
    assert lines == ["sweep 0/2 done, 1 running, 0 failed | 0m00s elapsed, ETA ?",
                     "sweep 0/2 done, 2 running, 0 failed | 0m12s elapsed, ETA ?",
                     "sweep 2/2 done, 0 running, 0 failed | 0m25s elapsed, ETA 0m00s"]
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()


def test_terminal_redraws_in_place():
    out, clock = io.StringIO(), _Clock()
    p = Progress(total=1, epochs=2, started=0.0)
    console = Console(out, tty=True)
    view = View(p, console, clock=clock)
    p.observe("ablation", "a", "PENDING")
    p.observe("ablation", "a", "RUNNING", epoch=1)
    view.changed()
    clock.now = 0.5
    view.tick()  # under a second: no redraw
    clock.now = 1.5
    view.tick()
    console.say("a line of the sweep")  # ends the live line first
    view.finish()
    text = out.getvalue()
    assert text.count("\r\x1b[K") == 3
    assert "\r\x1b[Ksweep 0/1 done, 1 running" in text
    assert "ETA 0m02s\na line of the sweep\n" in text  # 1 of 2 epochs in 1.5 s
    assert text.endswith("\n")


def test_quiet_shows_nothing():
    out = io.StringIO()
    p = Progress(total=1, epochs=1)
    view = View(p, Console(out, quiet=True, tty=False))
    p.observe("ablation", "a", "RUNNING")
    view.changed()
    view.finish()
    Console(out, quiet=True).say("hello")
    assert out.getvalue() == ""


def test_ray_log_keeps_output_that_arrives_just_after_the_block(tmp_path, capfd):
    # Ray forwards a trial's last lines to the driver asynchronously: one arriving a moment
    # after the Tune block ends must still go to ray.log, not to the terminal
    import os
    import threading

    from sweeps.progress import RayLog

    path = tmp_path / "ray.log"
    late = threading.Timer(0.3, lambda: os.write(2, b"late line from a trial\n"))
    with RayLog(path) as redirected:
        redirected.terminal.write("the sweep's own line\n")
        redirected.terminal.flush()
        os.write(1, b"early line from a trial\n")
        late.start()
    late.join()
    out, err = capfd.readouterr()
    log = path.read_text()
    assert "early line from a trial" in log and "late line from a trial" in log
    assert "late line" not in err and "early line" not in out
    assert "the sweep's own line" in out
