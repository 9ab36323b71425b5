"""fsutil/progress.py, the one progress display: plain lines with count, total, percentage, elapsed time and ETA
off a terminal (a Slurm log, a pipe), a rich bar on one, nothing when disabled."""

from __future__ import annotations

import io

from fsutil.progress import Progress, clock, si_count, status, track


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_non_terminal_gets_plain_lines_with_the_count_and_total():
    stream = io.StringIO()
    with Progress(stream=stream, prefix="cmd: ", lines=5) as progress:
        assert not progress.live
        task = progress.add("work", 10, unit="items")
        for _ in range(10):
            progress.advance(task)
        progress.finish(task)
    lines = stream.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == [f"cmd: work: {n}/10 items ({10 * n}%)" for n in (2, 4, 6, 8, 10)]
    assert all(" elapsed, ETA " in line for line in lines)
    assert "\x1b[" not in stream.getvalue()  # no terminal control codes in a log


def test_lines_follow_counts_that_jump_and_unknown_totals_and_the_end_line_is_not_repeated():
    stream = io.StringIO()
    with Progress(stream=stream, lines=4) as progress:
        task = progress.add("copy", 100, unit="MB")
        progress.advance(task, 30)  # passes 25
        progress.advance(task, 10)  # 40: passes nothing
        progress.advance(task, 60)  # 100: the end
        progress.finish(task)
        unknown = progress.add("scan", None, unit="files")
        for _ in range(5):
            progress.advance(unknown)
        progress.finish(unknown)
        by_time = progress.add("tokenize", unit="tok", si=True, every=0)
        progress.advance(by_time, 1_234_567)
        progress.finish(by_time)
    lines = [line.split(", ")[0] for line in stream.getvalue().splitlines()]
    assert lines == ["copy: 30/100 MB (30%)", "copy: 100/100 MB (100%)", "scan: 4 files", "scan: 5 files",
                     "tokenize: 1.23M tok"]


def test_a_resumed_count_shows_a_step_counter_and_info():
    stream = io.StringIO()
    with Progress(stream=stream, interval_s=0.0) as progress:
        task = progress.add("train", 1000, counter="step", completed=500)
        progress.update(task, 501, info="loss 1.0000")
    assert stream.getvalue().startswith("train: step 501/1000 (50%), loss 1.0000, 0:00:00 elapsed, ETA ")


def test_a_terminal_gets_a_rich_bar():
    for stream, force in ((FakeTerminal(), None), (io.StringIO(), True)):
        with Progress(stream=stream, force_terminal=force) as progress:
            assert progress.live
            task = progress.add("work", 10, unit="items")
            for _ in range(10):
                progress.advance(task)
            progress.finish(task)
        out = stream.getvalue()
        assert "10/10" in out and "\x1b[" in out  # rich's MofN column, drawn with control codes
        assert "(100%)" not in out  # not the plain lines


def test_disabled_is_silent():
    for stream in (io.StringIO(), FakeTerminal()):
        with Progress(stream=stream, enabled=False) as progress:
            task = progress.add("work", 3)
            progress.advance(task, 3)
            progress.finish(task)
        with status("planning", stream=stream, enabled=False):
            pass
        assert stream.getvalue() == ""


def test_status_announces_a_step_and_times_it():
    stream = io.StringIO()
    with status("planning memory: x", stream=stream):
        pass
    lines = stream.getvalue().splitlines()
    assert lines[0] == "planning memory: x ..." and lines[1].startswith("planning memory: x: done in ")
    terminal = io.StringIO()
    with status("planning memory: x", stream=terminal, force_terminal=True):
        pass
    out = terminal.getvalue()  # a spinner, drawn with control codes, then the same "done in" line
    assert "\x1b[" in out and not out.startswith("planning memory: x ...") and "planning memory: x: done in " in out


def test_formats():
    assert clock(3725) == "1:02:05" and clock(0.4) == "0:00:00"
    assert si_count(999) == "999" and si_count(1500) == "1.5k" and si_count(2_500_000_000) == "2.5G"


def test_track_counts_every_item_a_loop_takes_including_skipped_ones():
    stream = io.StringIO()
    seen = []
    for item in track(list(range(4)), "grid", unit="points", prefix="bench: ", stream=stream, lines=4):
        if item == 1:
            continue  # the item still counts: it was taken
        seen.append(item)
    assert seen == [0, 2, 3]
    lines = stream.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == [f"bench: grid: {n}/4 points ({25 * n}%)" for n in (1, 2, 3, 4)]
