"""How many threads a compiled step of a given size gets: chosen by timing the calls.

A thread team pays off on a large system and is a gamble on a small one.  On a small
molecule the second thread saves a fraction of a millisecond when the cores are free;
when other processes hold them, the team's closing barrier waits for a thread that the
scheduler has put aside, and one call can take ten times as long (measured here: 8 ms
instead of 1.3 for ethanol, with two busy processes on two cores).  No load figure the
kernel could read tells these apart reliably, so each size class keeps the recent times
of both choices (all of torch's threads, or one) and takes the faster, retrying the
other now and then so that a change of load is noticed.  Large work (``ALWAYS_TEAM``
pairs and more) always gets every thread: its runs are long enough for dynamic
scheduling to share them out whatever else runs.
"""

from __future__ import annotations

import time
from collections import deque

import torch

#: Pairs from which a step always runs on all of torch's threads.
ALWAYS_TEAM = 16_384


class ThreadChoice:
    """One size class's choice between ``team`` threads and one.

    ``pick()`` gives the count for the next call and ``record(threads, seconds)`` its
    time.  The choice with the lower median over its last ``window`` calls runs; the
    other is tried once every ``explore`` calls (and until each has ``window`` samples,
    they alternate)."""

    def __init__(self, team: int, window: int = 5, explore: int = 50):
        self.team, self.window, self.explore = team, window, explore
        self.times: dict[int, deque[float]] = {team: deque(maxlen=window), 1: deque(maxlen=window)}
        self.calls = 0

    def pick(self) -> int:
        self.calls += 1
        if self.team == 1:
            return 1
        team, one = self.times[self.team], self.times[1]
        if len(team) < self.window or len(one) < self.window:
            return self.team if len(team) <= len(one) else 1
        best = self.team if _median(team) <= _median(one) else 1
        if self.calls % self.explore == 0:
            return 1 if best == self.team else self.team
        return best

    def record(self, threads: int, seconds: float) -> None:
        if threads in self.times:
            self.times[threads].append(seconds)


class Threads:
    """Thread choices per size class (powers of two of the pair count) for one model."""

    def __init__(self) -> None:
        self.choices: dict[tuple[int, int], ThreadChoice] = {}

    def run(self, pairs: int, call) -> None:
        """``call(threads)``, with the thread count chosen for ``pairs`` pairs, timed."""
        team = torch.get_num_threads()
        if team == 1 or pairs >= ALWAYS_TEAM:
            call(team)
            return
        key = (team, pairs.bit_length())
        choice = self.choices.get(key)
        if choice is None:
            choice = self.choices[key] = ThreadChoice(team)
        threads = choice.pick()
        start = time.perf_counter()
        call(threads)
        choice.record(threads, time.perf_counter() - start)


def _median(values) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]
