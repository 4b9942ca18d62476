"""Progress of long loops: a tqdm bar on a terminal, plain log lines anywhere else.

A cluster job's stderr is a file, where a bar's carriage-return redraws pile up into one physical
line that `tail -f` and `grep` cannot read. There, progress is written as ordinary log lines: one
at most every `interval` seconds, one per `note()`, and one at the end.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Iterable, Iterator

log = logging.getLogger("dod.progress")


def is_terminal(stream=None) -> bool:
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class PlainProgress:
    """tqdm's interface (update, set_postfix, iteration, close) writing log lines instead."""

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", initial: int = 0, interval: float | None = 30.0, quiet: bool = False):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n, self.interval, self.postfix = initial, interval, ""
        self._start = self._last = time.perf_counter()
        self._start_n = initial
        self._closed = quiet  # a quiet reporter (a process other than the main one) never writes

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.interval is not None and time.perf_counter() - self._last >= self.interval:
            self._write()

    def set_postfix(self, **fields) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in fields.items())

    def note(self, **fields) -> None:
        """Write a line now, with these fields (a training log row, say)."""
        self.set_postfix(**fields)
        self._write()

    def close(self) -> None:
        self._write()
        self._closed = True

    def _write(self) -> None:
        if self._closed:
            return
        self._last = time.perf_counter()
        rate = (self.n - self._start_n) / max(self._last - self._start, 1e-9)
        count = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        log.info("%s: %s %s (%.1f %s/s)%s", self.desc, count, self.unit, rate, self.unit,
                 f"; {self.postfix}" if self.postfix else "")


class _TerminalProgress:
    """A tqdm bar; `note()` shows its fields in the bar instead of writing a line."""

    def __init__(self, iterable, **kwargs):
        from tqdm import tqdm

        self.bar = tqdm(iterable, mininterval=2, dynamic_ncols=True, **kwargs)

    def __iter__(self):
        return iter(self.bar)

    def __getattr__(self, name):
        return getattr(self.bar, name)

    def note(self, **fields) -> None:
        self.bar.set_postfix(**fields)


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             initial: int = 0, enabled: bool = True, interval: float | None = 30.0, leave: bool = True):
    """A progress reporter for `iterable` (or for `update()` calls up to `total`): a bar when stderr
    is a terminal, log lines otherwise, nothing when not `enabled` (e.g. on processes other than
    the main one). `interval=None` writes lines only on `note()` and at the end."""
    if enabled and is_terminal():
        return _TerminalProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave)
    return PlainProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, interval=interval,
                         quiet=not enabled)
