"""Quantum-chemistry tasks run on a Dask cluster; the journal is written here only.

A task is plain data (a structure, the levels to compute, its provenance); a worker
turns it into a record with PySCF and sends it back.  The scheduling process writes
each record to the journal as it arrives and rebuilds the HDF5 output now and then, so
workers need aniserve and PySCF but no shared file system.  By default the cluster is a
``LocalCluster`` of worker processes on this machine; ``scheduler`` (``tcp://HOST:PORT``)
or ``scheduler_file`` joins an existing one (``dask scheduler`` + ``dask worker`` on any
hosts, or dask-jobqueue's ``SLURMCluster``/``PBSCluster``).

A task that raises (SCF not converged) or whose worker is lost is retried up to
``retries`` times, then reported by record id (and in ``failures.json``); running the
same command again retries it.  Nothing finished is recomputed: a record whose levels
are all in the journal or the output is not submitted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import sys
import time

from tqdm import tqdm

from aniserve.qmdata.levels import Level
from aniserve.qmdata.records import Journal, build, done_levels


@dataclasses.dataclass(frozen=True)
class Task:
    """One structure and the levels to compute for it."""

    id: str
    numbers: tuple[int, ...]
    positions: tuple[tuple[float, float, float], ...]  # Å
    levels: tuple[Level, ...]
    forces: frozenset[str]  # keys of the levels whose forces are computed too
    molecule: str
    source: str
    index: int
    temperature_k: float = float("nan")

    def marks(self) -> set[str]:
        """What the finished record holds (``records.marks``)."""
        return {lv.key for lv in self.levels} | {f"{key}.forces" for key in self.forces}


def compute_task(task: Task, threads: int = 1) -> dict:
    """Run on a worker: the task's record."""
    import numpy as np
    from pyscf import lib

    from aniserve.qmdata.levels import compute

    lib.num_threads(threads)
    numbers, positions = np.array(task.numbers), np.array(task.positions)
    levels: dict[str, dict] = {}
    record = {
        "id": task.id,
        "molecule": task.molecule,
        "source": task.source,
        "index": task.index,
        "temperature_k": task.temperature_k,
        "numbers": list(task.numbers),
        "positions": [list(p) for p in task.positions],
        "levels": levels,
    }
    for level in task.levels:
        result = compute(level, numbers, positions, forces=level.key in task.forces)
        levels[level.key] = {
            "energy": result["energy"],
            "forces": None if result["forces"] is None else result["forces"].tolist(),
            "wall_s": result["wall_s"],
            "attributes": level.attributes(),
        }
    return record


@dataclasses.dataclass
class Summary:
    total: int
    already_done: int
    computed: int = 0
    failures: dict[str, str] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    wall_s: float = 0.0  # the calculations' own time, summed

    def text(self) -> str:
        lines = [
            f"{self.computed} computed, {self.already_done} already done, {len(self.failures)} failed "
            f"of {self.total} in {_hms(self.seconds)} (calculations {_hms(self.wall_s)} of CPU time)"
        ]
        lines += [f"  failed: {rid}: {why}" for rid, why in sorted(self.failures.items())]
        return "\n".join(lines)


@contextlib.contextmanager
def connect(workers: int = 1, scheduler: str | None = None, scheduler_file: str | None = None):
    """A Dask client: an existing scheduler's, or a LocalCluster of ``workers`` processes."""
    from dask.distributed import Client, LocalCluster

    if scheduler or scheduler_file:
        with Client(address=scheduler, scheduler_file=scheduler_file, timeout="30s") as client:
            yield client
        return
    # One calculation per worker process; PySCF's own threads are the task's setting.  Worker
    # logs are silenced: a failed calculation is reported once, by record, here.
    with (
        LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=50
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def pending(tasks: list[Task], journal: Journal, out: pathlib.Path) -> list[Task]:
    done = done_levels(journal, out)
    return [t for t in tasks if not t.marks() <= done.get(t.id, set())]


def run(
    tasks: list[Task],
    out: str | pathlib.Path,
    journal: Journal,
    client,
    threads: int = 1,
    retries: int = 2,
    build_every: int = 25,
    sampling_note: str | None = None,
    log=sys.stderr,
) -> Summary:
    """Compute every task not yet done on ``client``; write the journal and ``out``."""
    from dask.distributed import as_completed

    out = pathlib.Path(out)
    with journal.exclusive(str(out)):
        todo = pending(tasks, journal, out)
        summary = Summary(total=len(tasks), already_done=len(tasks) - len(todo))
        print(
            f"{len(tasks)} calculations; {summary.already_done} already done; {len(todo)} to compute",
            file=log,
            flush=True,
        )
        started = time.perf_counter()
        # Keys name the record, so a scheduler shared by several jobs shows what runs.
        futures = {
            client.submit(compute_task, task, threads, key=f"aniserve-qm-{task.id}", pure=False, retries=retries): task
            for task in todo
        }
        since_build = 0
        # On a terminal a progress bar; in a log file (a cluster job) one line per record.
        bar = tqdm(total=len(todo), unit="calc", file=log, disable=not getattr(log, "isatty", lambda: False)())
        for future in as_completed(futures):
            task = futures[future]
            if future.status == "error":
                summary.failures[task.id] = _reason(future)
                print(f"failed {task.id}: {summary.failures[task.id]}", file=log, flush=True)
            else:
                record = future.result()
                journal.write(record)
                summary.computed += 1
                since_build += 1
                walls = {k: v["wall_s"] for k, v in record["levels"].items()}
                summary.wall_s += sum(walls.values())
                if bar.disable:
                    _progress(summary, task.id, walls, len(todo), _slots(client), log)
            future.release()
            bar.update(1)
            bar.set_postfix_str(f"{len(summary.failures)} failed", refresh=False)
            if since_build >= build_every:
                build(journal, out, sampling_note)
                since_build = 0
        bar.close()
        summary.seconds = time.perf_counter() - started
        build(journal, out, sampling_note)
        if summary.failures:
            journal.write_failures(summary.failures)
    return summary


def run_job(
    tasks: list[Task],
    out: str | pathlib.Path,
    *,
    workers: int = 1,
    threads: int = 1,
    scheduler: str | None = None,
    scheduler_file: str | None = None,
    retries: int = 2,
    sampling_note: str | None = None,
) -> Summary | None:
    """Compute ``tasks`` into ``out`` on a local cluster of ``workers`` processes or on
    the given scheduler; None when nothing was left to compute (``out`` rebuilt)."""
    out = pathlib.Path(out)
    journal = Journal(out.with_suffix(".work"))
    if not pending(tasks, journal, out):
        build(journal, out, sampling_note)
        return None
    with connect(workers, scheduler, scheduler_file) as client:
        return run(tasks, out, journal, client, threads=threads, retries=retries, sampling_note=sampling_note)


def _reason(future) -> str:
    error = future.exception()
    return f"{type(error).__name__}: {error}".splitlines()[0]


def _slots(client) -> int:
    try:
        return max(1, sum(client.nthreads().values()))
    except Exception:  # a scheduler that is going away: the ETA is only an estimate
        return 1


def _progress(summary: Summary, rid: str, walls: dict, todo: int, slots: int, log) -> None:
    finished = summary.computed + len(summary.failures)
    remaining = todo - finished
    eta = remaining * summary.wall_s / summary.computed / slots
    text = ", ".join(f"{k} {v:.1f} s" for k, v in walls.items())
    print(
        f"[{summary.already_done + finished}/{summary.total}] {rid}: {text}; {len(summary.failures)} failed; "
        f"ETA {_hms(eta)} on {slots} worker(s)",
        file=log,
        flush=True,
    )


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"
