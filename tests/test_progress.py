"""Progress reporting: bars on a terminal, whole log lines in a job's log file."""

import io
import logging

from dodlib.progress import PlainProgress, is_terminal, progress


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_log_file_gets_lines_and_a_terminal_gets_a_bar(monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert not is_terminal()
    assert isinstance(progress(range(3), desc="x"), PlainProgress)
    monkeypatch.setattr("sys.stderr", _Terminal())
    assert is_terminal()
    assert not isinstance(progress(range(3), desc="x"), PlainProgress)
    # a process other than the main one reports nothing, terminal or not
    assert isinstance(progress(range(3), desc="x", enabled=False), PlainProgress)


def test_plain_progress_writes_counted_lines(caplog):
    caplog.set_level(logging.INFO, logger="dod.progress")
    assert list(PlainProgress(range(4), desc="evaluate", unit="batch", interval=0)) == [0, 1, 2, 3]
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("evaluate: 1/4 batch") and lines[-1].startswith("evaluate: 4/4 batch")
    assert len(lines) == 5  # one per batch at interval 0, and the closing line


def test_notes_only_when_no_interval_and_nothing_when_quiet(caplog):
    caplog.set_level(logging.INFO, logger="dod.progress")
    bar = PlainProgress(total=100, desc="train", unit="img", interval=None)
    bar.update(50)
    assert not caplog.records
    bar.note(loss="0.5000")
    assert caplog.records[-1].getMessage().startswith("train: 50/100 img") and "loss 0.5000" in caplog.text
    quiet = PlainProgress(total=10, desc="other rank", interval=0, quiet=True)
    quiet.update(10)
    quiet.note(loss=1)
    quiet.close()
    assert "other rank" not in caplog.text
