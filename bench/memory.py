"""Peak resident memory of a block of code, sampled from a background thread (psutil)."""

from __future__ import annotations

import threading
import time

import psutil


class PeakRSS:
    """``with PeakRSS() as m: ...``; then ``m.peak_mb`` is the highest RSS seen, ``m.start_mb`` the first."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self._proc = psutil.Process()

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self):
        self.start = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20

    @property
    def start_mb(self) -> float:
        return self.start / 2**20
