"""What a long run tells its user while it works: each stage's name as it starts, and a bar for
degradation scoring with records, tokens/s and an ETA.

On a terminal the scoring bar is a tqdm bar; elsewhere (a log file, CI, a Prefect worker) it
writes a log line at most every ``LOG_EVERY`` seconds instead, so logs do not fill with carriage
returns. ``set_quiet(True)`` (``--quiet``) silences both. Messages go to stderr: stdout stays the
command's result.

The scoring bar is fed two ways: per batch from shards scored in this process (``batch``), and
per finished shard (``shard_done``), which tops up what the shard's batches did not report: a
resumed shard read from disk, or one scored by a Dask or Ray worker in another process. So one
bar covers every engine and a resumed run starts where it stopped.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

LOG_EVERY = 30.0
_QUIET = False


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (a test's capture, a redirected stream)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


LOG = logging.getLogger("paser")
LOG.setLevel(logging.INFO)
if not LOG.handlers:  # its own plain lines, whatever Prefect or the user did to the root logger
    _handler = _Stderr()
    _handler.setFormatter(logging.Formatter("%(asctime)s paser: %(message)s", "%H:%M:%S"))
    LOG.addHandler(_handler)
    LOG.propagate = False


def set_quiet(quiet: bool) -> None:
    global _QUIET
    _QUIET = quiet


def library_bars() -> None:
    """Hide transformers' own bars (loading weights) off a terminal and when quiet. Before the
    Hugging Face libraries are imported (a command that has not loaded a model yet, ``--help``),
    through the environment variable they read when imported, so that this imports nothing."""
    if bar_enabled(True):
        return
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    elif "huggingface_hub" in sys.modules:  # transformers takes the hub's setting when imported
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    else:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def quiet() -> bool:
    return _QUIET


def _terminal() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def bar_enabled(wanted: bool = True) -> bool:
    """Whether a tqdm bar should be drawn: asked for, not quiet, and stderr is a terminal."""
    return wanted and not _QUIET and _terminal()


def announce(message: str) -> None:
    """One line on stderr (a log record when stderr is not a terminal), unless quiet."""
    if _QUIET:
        return
    if _terminal():
        print(f"paser: {message}", file=sys.stderr, flush=True)
    else:
        LOG.info(message)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class ScoringProgress:
    """One progress display over every shard of a scoring run (thread-safe)."""

    def __init__(self, total: int, desc: str = "degradation", enabled: bool = True):
        self.total, self.desc = total, desc
        self.enabled = enabled and not _QUIET
        self.done = self.tokens = 0
        self.computed_records = 0
        self.logged_end = False
        self.per_shard: dict[int, int] = {}
        self.start = self.last_log = time.perf_counter()
        self.lock = threading.Lock()
        self.bar = None
        if self.enabled and _terminal():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="rec", file=sys.stderr)

    def batch(self, shard: int, records: int, tokens: int) -> None:
        """A batch of ``records`` (``tokens`` tokens through each model) scored in this process."""
        with self.lock:
            self.per_shard[shard] = self.per_shard.get(shard, 0) + records
            self.tokens += tokens
            self.computed_records += records
            self._advance(records)

    def shard_done(self, shard: int, records: int, computed: bool = True) -> None:
        """Shard ``shard`` of ``records`` records is on disk: count what its batches did not.
        ``computed``: it was scored in this run (not read back from a finished shard)."""
        with self.lock:
            missing = records - self.per_shard.get(shard, 0)
            self.per_shard[shard] = records
            if computed:
                self.computed_records += missing
            self._advance(missing)

    def _advance(self, records: int) -> None:
        self.done += records
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        if self.bar is not None:
            if self.tokens:
                self.bar.set_postfix_str(f"{self.tokens / elapsed:,.0f} tok/s", refresh=False)
            self.bar.update(records)
        elif self.enabled and not self.logged_end and (time.perf_counter() - self.last_log >= LOG_EVERY
                                                        or self.done >= self.total):
            self.last_log = time.perf_counter()
            self.logged_end = self.done >= self.total
            LOG.info(self.line())

    def line(self) -> str:
        """The state as one line: records, rate, tokens/s, ETA."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = self.computed_records / elapsed
        left = self.total - self.done
        eta = _duration(left / rate) if rate > 0 and left > 0 else "0:00"
        tokens = f", {self.tokens / elapsed:,.0f} tok/s" if self.tokens else ""
        return f"{self.desc}: {self.done:,}/{self.total:,} records, {rate:,.1f} rec/s{tokens}, ETA {eta}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        for key in [k for k, shown in _ACTIVE.items() if shown is self]:
            del _ACTIVE[key]  # shards scored in this process stop reporting to a closed display

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_ACTIVE: dict[str, ScoringProgress] = {}


def register(key: str, progress: ScoringProgress | None) -> None:
    """Make ``progress`` the display of scoring run ``key`` in this process (None removes it):
    shards scored in this process by a task runner report their batches to it."""
    if progress is None:
        _ACTIVE.pop(key, None)
    else:
        _ACTIVE[key] = progress


def active(key: str) -> ScoringProgress | None:
    return _ACTIVE.get(key)
