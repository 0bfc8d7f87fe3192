"""Tests for sd_jax/train/progress.py: stage, step of total, rate, ETA; full lines off a terminal."""
import io

from sd_jax.train.progress import Progress, duration


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _clock(times):
    """A clock that returns `times` one after the other."""
    it = iter(times)
    return lambda: next(it)


def test_duration_reads_as_a_clock():
    assert [duration(s) for s in (0, 59.6, 61, 3600, 3725)] == ["0:00", "1:00", "1:01", "1:00:00", "1:02:05"]


def test_a_log_gets_one_full_line_per_update_with_stage_rate_and_eta():
    log = io.StringIO()
    # started at 0 s; step 10 at 5 s, step 20 at 10 s.
    progress = Progress(log, clock=_clock([0.0, 5.0, 10.0]))
    progress.start("train", 100, images_per_step=128)
    progress.update(10, loss=0.5)
    progress.update(20, loss=0.25)
    progress.report("eval  epoch 1: accuracy 0.9000")
    assert "\r" not in log.getvalue()
    assert log.getvalue().splitlines() == [
        "train  step 10/100  256.0 images/s  ETA 0:45  loss 0.5",
        "train  step 20/100  256.0 images/s  ETA 0:40  loss 0.25",
        "eval  epoch 1: accuracy 0.9000",
    ]


def test_a_resumed_stage_counts_its_rate_from_where_it_resumed():
    log = io.StringIO()
    progress = Progress(log, clock=_clock([100.0, 102.0]))
    progress.start("train", 1000, done=900)
    progress.update(910)
    assert log.getvalue() == "train  step 910/1000  5.00 steps/s  ETA 0:18\n"


def test_a_terminal_rewrites_one_line_and_results_start_a_new_one():
    terminal = _Terminal()
    progress = Progress(terminal, clock=_clock([0.0, 1.0, 2.0]))
    progress.start("train", 10)
    progress.update(1)
    progress.update(2)
    progress.report("done")
    text = terminal.getvalue()
    assert text.count("\r") == 2 and text.endswith("ETA 0:08\ndone\n")


def test_transient_lines_show_only_on_a_terminal_and_a_disabled_progress_prints_nothing():
    log, terminal, silent = io.StringIO(), _Terminal(), _Terminal()
    for stream, enabled in ((log, True), (terminal, True), (silent, False)):
        progress = Progress(stream, enabled=enabled)
        assert list(progress.track("eval", iter("abc"), 3)) == ["a", "b", "c"]
        progress.report("eval  epoch 1: accuracy 0.5")
        progress.close()
    assert log.getvalue() == "eval  epoch 1: accuracy 0.5\n"
    assert "eval  step 3/3" in terminal.getvalue() and terminal.getvalue().endswith("\neval  epoch 1: accuracy 0.5\n")
    assert silent.getvalue() == ""


def test_the_rate_counts_from_the_first_update_so_compiling_does_not_skew_it():
    log = io.StringIO()
    progress = Progress(log, clock=_clock([0.0, 30.0, 31.0, 32.0]))  # the first step compiles for 30 s
    progress.start("train", 100)
    for done in (10, 20, 30):
        progress.update(done)
    assert progress.rate == 10.0
    assert log.getvalue().splitlines()[1:] == ["train  step 20/100  10.00 steps/s  ETA 0:08",
                                               "train  step 30/100  10.00 steps/s  ETA 0:07"]
