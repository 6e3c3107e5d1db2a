"""What a person sees while near_ray runs: one line per stage start and end, progress for long work,
warnings that matter. Ray's own logs (workers, actors, Ray Data's operator bars) go to Ray's log
folder unless ``-v`` asks for them.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

log = logging.getLogger("near_ray")

_VERBOSE_ENV = "NEAR_RAY_VERBOSE"  # set by `-v`; read when a local Ray starts (workers' logs to the console)


def verbose() -> bool:
    return os.environ.get(_VERBOSE_ENV, "") not in ("", "0")


def setup_console(verbose_logs: bool = False) -> None:
    """Logging for the CLI and jobs: near_ray at INFO (DEBUG with -v), Ray's Python loggers at WARNING."""
    if verbose_logs:
        os.environ[_VERBOSE_ENV] = "1"
    logging.basicConfig(
        level=logging.DEBUG if verbose_logs else logging.INFO,
        format="%(asctime)s %(message)s" if not verbose_logs else "%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    quiet = logging.DEBUG if verbose_logs else logging.WARNING
    for name in ("ray", "ray.data", "ray.train", "ray.serve", "ray.tune", "filelock", "urllib3", "botocore",
                 "httpx", "sentence_transformers", "transformers", "aiohttp.access"):
        logging.getLogger(name).setLevel(quiet)


def quiet_ray_data() -> None:
    """Ray Data's per-operator progress bars and execution banners are for debugging: off unless -v."""
    if verbose():
        return
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # Ray Data configures its own loggers when it is imported (after setup_console): quiet them again,
    # and drop its one-time note that the bars are off.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


@contextmanager
def stage(name: str) -> Iterator[None]:
    """``── label ──`` … ``── label done in 12.3 s ──``; a failure says how long it ran."""
    log.info("── %s ──", name)
    t0 = time.monotonic()
    try:
        yield
    except BaseException:
        log.info("── %s failed after %.1f s ──", name, time.monotonic() - t0)
        raise
    log.info("── %s done in %.1f s ──", name, time.monotonic() - t0)


class Progress:
    """A progress line: redrawn in place on a terminal, a plain line every 10% (or 30 s) elsewhere (job logs, CI)."""

    def __init__(self, what: str, total: int | None, unit: str = "", stream: TextIO | None = None) -> None:
        self.what, self.total, self.unit = what, total, unit
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.done, self.extra = 0, ""
        self.start = self._last = time.monotonic()
        self._last_fraction = 0.0

    def update(self, n: int = 0, extra: str = "", done: int | None = None) -> None:
        self.done = self.done + n if done is None else done
        self.extra = extra or self.extra
        now = time.monotonic()
        fraction = self.done / self.total if self.total else 0.0
        if self.tty:
            if now - self._last >= 0.2 or (self.total and self.done >= self.total):
                self.stream.write("\r" + self._line() + "\033[K")
                self.stream.flush()
                self._last = now
        elif fraction - self._last_fraction >= 0.1 or now - self._last >= 30:
            self.stream.write(self._line() + "\n")
            self.stream.flush()
            self._last, self._last_fraction = now, fraction

    def close(self) -> None:
        if self.tty:
            self.stream.write("\r" + self._line() + "\033[K\n")
            self.stream.flush()

    def _line(self) -> str:
        elapsed = time.monotonic() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        pace = f"{rate:.1f}/s" if rate >= 1 or not self.done else f"{elapsed / self.done:.0f} s each"
        of = f"/{self.total}" if self.total else ""
        pct = f" {100 * self.done / self.total:3.0f}%" if self.total else ""
        extra = f"  {self.extra}" if self.extra else ""
        return f"  {self.what}:{pct} {self.done}{of} {self.unit} ({pace}, {elapsed:.0f} s){extra}"
