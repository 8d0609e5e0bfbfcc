"""Progress reporters: updates collapse to one summary per stage; a log gets a few lines per stage,
never one per package; a terminal gets a live status replaced by the summary (pure, fake clocks)."""

from __future__ import annotations

import io

from reprobuild.progress import (
    NullProgress,
    PlainProgress,
    RichProgress,
    Update,
    format_rate,
    make_reporter,
    set_counts,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_update_is_the_old_message_for_a_plain_say() -> None:
    u = Update("extracting", 3, 59, "packages", "libc6")
    assert u == "extracting libc6 (3/59)" and (u.stage, u.done, u.total, u.unit, u.item) == (
        "extracting", 3, 59, "packages", "libc6")
    assert not u.final and Update("extracting", 59, 59, "packages").final
    assert Update("installing", 0, 9, "packages", "x", text="installing layer 1: x") == "installing layer 1: x"


def test_log_collapses_a_stage_of_59_packages_to_two_lines() -> None:
    out, clock = io.StringIO(), Clock()
    say = PlainProgress(out, interval=10.0, clock=clock)
    for i in range(59):
        say(Update("extracting", i, 59, "packages", f"pkg{i}"))
        clock.now += 0.05
    clock.now = 103.0
    say(Update("extracting", 59, 59, "packages"))
    assert out.getvalue().splitlines() == ["extracting: 59 packages …", "extracting: 59/59 packages (3.0s)"]


def test_log_prints_at_most_one_progress_line_per_interval() -> None:
    out, clock = io.StringIO(), Clock()
    say = PlainProgress(out, interval=10.0, clock=clock)
    for i in range(100):
        say(Update("installing", i, 100, "packages", f"pkg{i}"))
        clock.now += 0.4  # 40 s in all
    say(Update("installing", 100, 100, "packages"))
    lines = out.getvalue().splitlines()
    assert lines[0] == "installing: 100 packages …" and lines[-1] == "installing: 100/100 packages (40.0s)"
    middle = lines[1:-1]
    assert 3 <= len(middle) <= 4 and all(ln.startswith("installing: ") and "/100 packages (" in ln for ln in middle)
    assert middle[0].endswith("s): pkg25")  # what it is at


def test_a_new_stage_ends_the_previous_one_and_messages_pass_through() -> None:
    out, clock = io.StringIO(), Clock()
    say = PlainProgress(out, clock=clock)
    say(Update("extracting", 0, 2, "packages", "a"))
    say("note: something worth a line")
    clock.now += 1
    say(Update("installing", 0, 5, "packages", "b"))
    say.close()
    assert out.getvalue().splitlines() == [
        "extracting: 2 packages …", "note: something worth a line", "extracting: 0/2 packages (1.0s)",
        "installing: 5 packages …", "installing: 0/5 packages (0.0s)"]


def test_stage_api_for_a_stage_runner() -> None:
    out, clock = io.StringIO(), Clock()
    say = PlainProgress(out, clock=clock)
    say.stage_started("tree")
    say.stage_progress(12, 59, "packages")
    clock.now += 12.3
    say.stage_finished("59 packages installed")
    assert out.getvalue().splitlines() == ["tree …", "tree: 59 packages installed (12.3s)"]


def test_downloads_use_binary_units_in_bar_and_summary() -> None:
    out, clock = io.StringIO(), Clock()
    say = PlainProgress(out, interval=1.0, clock=clock)
    say.start("fetch", 2, 4 << 20)
    clock.now += 2
    say.advance(3 << 20)
    say.item_done("a", "fetched", 3 << 20)
    say.item_done("b", "failed")
    say.finish()
    lines = out.getvalue().splitlines()
    assert lines[0] == "fetch: 2 packages, 4.0 MiB …"
    assert lines[1] == "fetch: 0/2 packages, 3.0 MiB/4.0 MiB, 1.5 MiB/s (2s)"
    assert "failed b" in lines
    assert lines[-1] == "fetch: 2/2 packages, 3.0 MiB, 1.5 MiB/s, 1 failed (2.0s)"
    assert format_rate(3 << 20, 2.0) == "1.5 MiB/s"


def test_terminal_shows_the_summary_line_once_per_stage() -> None:
    tty, clock = FakeTTY(), Clock()
    say = RichProgress(tty, clock=clock)
    for i in range(5):
        say(Update("extracting", i, 5, "packages", f"pkg{i}"))
    clock.now += 1.5
    say(Update("extracting", 5, 5, "packages"))
    say.close()
    assert tty.getvalue().count("extracting: 5/5 packages (1.5s)") == 1


def test_reporter_choice_and_set_counts() -> None:
    assert isinstance(make_reporter(True, FakeTTY()), NullProgress)
    assert isinstance(make_reporter(False, FakeTTY(), environ={}), RichProgress)
    assert isinstance(make_reporter(False, FakeTTY(), environ={"CI": "true"}), PlainProgress)
    assert isinstance(make_reporter(False, io.StringIO(), environ={}), PlainProgress)
    assert set_counts({"image": 79, "tools": 72}) == "image 79, tools 72"
    assert set_counts([("image", 104), ("initrd", 72)]) == "image 104, initrd 72"
