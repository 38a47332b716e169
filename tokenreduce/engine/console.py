"""The console of `python -m tokenreduce`, made to outlive its reader.

With the output piped (`... | tee log`), Ctrl-C ends the pipe's reader as well, and the next write
fails with a broken pipe; rich (Lightning's progress bar) answers that with `SystemExit(1)`, which
would skip writing the run's record and its resume command. Behind `SurvivingStream` the run goes
on: what it prints after the reader has gone is dropped, and what must be seen (`tell`) goes to
standard error as well.

What the run says goes through `show`, which also writes it into the run's log file (Hydra's
`tokenreduce.log`), so a batch job's log holds the tables and paths the console showed. A phase
longer than a moment is a `Progress`: a tqdm bar at a terminal, dated lines at a steady pace where
standard output is a file or a pipe (SLURM, nohup), where a bar would show only its final state.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator

from tokenreduce.errors import ConfigError

PACE_VARIABLE = "TOKENREDUCE_PROGRESS_SECONDS"
DEFAULT_PACE = 30.0  # seconds between two progress lines when standard output is not a terminal
LOG_NAME = "tokenreduce"


class SurvivingStream:
    """A text stream that drops its output, instead of raising, once its reader has gone."""

    def __init__(self, stream):
        self._stream = stream
        self.broken = False

    def _guarded(self, call, *args):
        if self.broken:
            return None
        try:
            return call(*args)
        except (BrokenPipeError, ValueError):  # ValueError: the stream was closed
            self._drop()
            return None

    def _drop(self) -> None:
        self.broken = True
        try:  # what the interpreter flushes at exit goes to /dev/null, not into another broken pipe
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError):
            pass

    def write(self, text: str) -> int:
        self._guarded(self._stream.write, text)
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._guarded(self._stream.flush)

    def __getattr__(self, name: str):  # fileno, isatty, encoding, ...
        return getattr(self._stream, name)


def survive_lost_reader() -> None:
    """Put standard output behind a `SurvivingStream`, the logging handlers that print to it too."""
    if isinstance(sys.stdout, SurvivingStream) or sys.stdout is None:
        return
    original = sys.stdout
    sys.stdout = SurvivingStream(original)
    loggers = [logging.getLogger(), *(lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger))]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is original:
                handler.setStream(sys.stdout)


def tell(message: str) -> None:
    """Show what the user must see (how to resume, say): on standard output and in the run's log, and
    on standard error as well when standard output has lost its reader."""
    show(message)
    if isinstance(sys.stdout, SurvivingStream) and sys.stdout.broken:
        print(message, file=sys.stderr)


def log_only(text: str, level: int = logging.INFO) -> None:
    """`text` into the run's log files (the root logger's file handlers, which Hydra points at the run
    directory's `tokenreduce.log`) and not onto the console, whose handler already has or will print it."""
    text = text.strip("\n")
    if "\n" in text:  # a table starts on a line of its own, not after the log line's prefix
        text = "\n" + text
    record = logging.LogRecord(LOG_NAME, level, __file__, 0, text, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and level >= handler.level:
            handler.handle(record)


_bars: list = []  # the tqdm bars on the screen now, which `show` writes above


def show(text: str, *, logged: str | None = None) -> None:
    """Print `text` on standard output (above any progress bar, flushed, so that a redirected
    output keeps pace) and into the run's log (`logged` instead, where given)."""
    if _bars:
        from tqdm import tqdm

        tqdm.write(text, file=sys.stdout)
        sys.stdout.flush()
    else:
        print(text, flush=True)
    log_only(text if logged is None else logged)


def interactive() -> bool:
    """Whether standard output is a terminal (progress as a bar) rather than a file or a pipe (lines)."""
    try:
        return bool(sys.stdout.isatty())
    except (AttributeError, ValueError):  # no stream, or a closed one
        return False


def pace_seconds() -> float:
    """The least seconds between two progress lines: $TOKENREDUCE_PROGRESS_SECONDS, 30 when unset;
    0 writes a line for every step."""
    text = os.environ.get(PACE_VARIABLE, "").strip()
    if not text:
        return DEFAULT_PACE
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{PACE_VARIABLE}={text!r} is invalid; allowed: seconds >= 0 between two progress "
                          f"lines (unset: {DEFAULT_PACE:g})")
    return value


def stamped(text: str) -> str:
    """`text` after the date and time, as the progress lines of a redirected output show it."""
    return f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S} {text}"


class Progress:
    """A phase of `total` steps (None: unknown), counted with `update`: a tqdm bar at a terminal;
    elsewhere a dated line when it starts, then at most every `pace_seconds()`, and when it ends:

        2026-12-06 05:40:12 compare, top-1: 7/21 settings, 64 s; tome ratio=0.7

    `bar`: True or False forces one or the other; `done`: the steps done before (a resumed phase).
    The log gets the lines (without the date, which its own lines carry), or at a terminal the last one."""

    def __init__(self, what: str, total: int | None, unit: str = "steps", *, bar: bool | None = None,
                 done: int = 0):
        self.what, self.total, self.unit = what, total, unit
        self.done, self.note = done, ""
        self.pace = pace_seconds()
        self.started = time.monotonic()
        self._shown: int | None = None  # the count the last line showed
        self._last = self.started
        self._bar = None
        if interactive() if bar is None else bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=done, desc=what, unit=unit, file=sys.stdout, leave=False,
                             dynamic_ncols=True)
            _bars.append(self._bar)
        else:
            self._line()

    def words(self) -> str:
        """The phase's state, as its lines show it (undated)."""
        count = f"{self.done}/{self.total}" if self.total is not None else str(self.done)
        text = f"{self.what}: {count} {self.unit}, {time.monotonic() - self.started:.0f} s"
        note = self.note_text()
        return f"{text}; {note}" if note else text

    def note_text(self) -> str:
        return self.note() if callable(self.note) else self.note

    def _line(self) -> None:
        words = self.words()
        show(stamped(words), logged=words)
        self._shown, self._last = self.done, time.monotonic()

    def update(self, steps: int = 1, note: str | Callable[[], str] | None = None) -> None:
        """`steps` more done; `note`: what to say after the count (the setting under way, a loss), or
        a function that says it, called only when a line or the bar shows it."""
        self.done += steps
        if note is not None:
            self.note = note
        if self._bar is not None:
            if note is not None:
                self._bar.set_postfix_str(self.note_text(), refresh=False)
            self._bar.update(steps)
        elif self.done != self._shown and time.monotonic() - self._last >= self.pace:
            self._line()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            _bars.remove(self._bar)
            self._bar = None
            log_only(self.words())
        elif self._shown != self.done:
            self._line()
        self._shown = self.done  # closing twice says nothing more

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False


def progress(items: Iterable, what: str, total: int | None = None, unit: str = "steps",
             note: Callable[[object], str] | None = None) -> Iterator:
    """`items`, one by one, counted by a `Progress` (`total`: len(items) where it has one); `note(item)`
    says what each step was."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    with Progress(what, total, unit) as shown:
        for item in items:
            yield item
            shown.update(1, None if note is None else note(item))
