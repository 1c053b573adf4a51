"""What a long benchmark says while it runs: for each run the count, the time spent and
an estimate of the time left (tqdm's formatting), logged (``aniserve.log``)."""

from __future__ import annotations

import logging
import time

from tqdm import tqdm

log = logging.getLogger(__name__)


class Runs:
    """``runs.start("transfer: delta, seed 0")`` before each of ``total`` runs."""

    def __init__(self, total: int):
        self.total, self.begun, self.t0 = total, 0, time.perf_counter()

    def start(self, text: str) -> None:
        elapsed = time.perf_counter() - self.t0
        eta = (
            f", about {tqdm.format_interval(elapsed / self.begun * (self.total - self.begun))} left"
            if self.begun
            else ""
        )
        self.begun += 1
        log.info(f"[run {self.begun}/{self.total}, {tqdm.format_interval(elapsed)} so far{eta}] {text}")
