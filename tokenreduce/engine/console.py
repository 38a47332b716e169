"""The console of `python -m tokenreduce`, made to outlive its reader.

With the output piped (`... | tee log`), Ctrl-C ends the pipe's reader as well, and the next write
fails with a broken pipe; rich (Lightning's progress bar) answers that with `SystemExit(1)`, which
would skip writing the run's record and its resume command. Behind `SurvivingStream` the run goes
on: what it prints after the reader has gone is dropped, and what must be seen (`tell`) goes to
standard error as well.
"""

from __future__ import annotations

import logging
import os
import sys


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
    """Print what the user must see (how to resume, say): on standard output, and on standard error
    as well when standard output has lost its reader."""
    print(message)
    if isinstance(sys.stdout, SurvivingStream) and sys.stdout.broken:
        print(message, file=sys.stderr)
