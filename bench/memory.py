"""Peak resident memory of a block of code, sampled from a background thread (psutil)."""

from __future__ import annotations

import threading
import time

import psutil


class PeakRSS:
    """``with PeakRSS() as m: ...``; then ``m.peak_mb`` is the highest RSS seen, ``m.start_mb`` the first.
    ``children=True`` adds the RSS of child processes (a Prefect server, Dask workers)."""

    def __init__(self, interval: float = 0.02, children: bool = False):
        self.interval = interval
        self.children = children
        self._proc = psutil.Process()

    def _rss(self) -> int:
        rss = self._proc.memory_info().rss
        if self.children:
            for child in self._proc.children(recursive=True):
                try:
                    rss += child.memory_info().rss
                except psutil.Error:
                    pass
        return rss

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __enter__(self):
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20

    @property
    def start_mb(self) -> float:
        return self.start / 2**20
