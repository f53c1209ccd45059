"""The worker processes of a data build: each step of a build (parse the XML ranges, join the buckets) is a list of
independent tasks; with one worker they run in this process, otherwise in forked processes, and the caller gets
the results in task order either way, so the output does not depend on the number of workers.

Progress (bytes and rows) is counted in shared memory that the tasks add to, and drawn by this process.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

from tqdm.auto import tqdm

_counters = None  # mp.Array('q', 2): bytes, rows; inherited by forked workers
_inline_refresh: Callable[[], None] | None = None


def default_workers() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class Progress:
    """What a task reports: bytes read and rows done, added to the build's shared counters about every
    ``every`` bytes (a lock per report, not per row)."""

    def __init__(self, every: int = 1 << 20):
        self.every, self.bytes, self.rows = every, 0, 0

    def add(self, nbytes: int = 0, rows: int = 0) -> None:
        self.bytes += nbytes
        self.rows += rows
        if self.bytes >= self.every or rows and self.rows >= 512:
            self.flush()

    def flush(self) -> None:
        if _counters is not None and (self.bytes or self.rows):
            with _counters.get_lock():
                _counters[0] += self.bytes
                _counters[1] += self.rows
            if _inline_refresh is not None:
                _inline_refresh()
        self.bytes = self.rows = 0


class Workers:
    """Runs tasks in ``n`` processes (``fork``, so the workers start at once and share the parent's imports).
    Create it before anything in this process starts threads (a DuckDB connection): forking a process with
    threads is unsafe."""

    def __init__(self, n: int, progress: bool = True):
        global _counters
        # fork is what makes workers cheap (no second import of the data stack); where it is missing
        # (Windows) the build runs in this process
        self.n = max(1, n) if "fork" in mp.get_all_start_methods() else 1
        self.progress = progress
        _counters = mp.Array("q", 2)
        self._pool = None
        if self.n > 1:
            gc.freeze()  # a collection in a worker would otherwise touch, and so copy, every page it inherited
            self._pool = ProcessPoolExecutor(self.n, mp_context=mp.get_context("fork"))

    def map(self, fn: Callable, tasks: Sequence[tuple], desc: str, total: int | None = None, unit: str = "B",
            rows_label: str = "rows") -> list:
        """``[fn(*task) for task in tasks]``, in parallel; the bar counts bytes (``unit="B"``) or rows."""
        global _inline_refresh
        with _counters.get_lock():
            _counters[0] = _counters[1] = 0
        is_bytes = unit == "B"
        bar = tqdm(total=total, unit=unit, unit_scale=is_bytes, unit_divisor=1024 if is_bytes else 1000, desc=desc,
                   disable=not self.progress, leave=False)
        shown = [0]

        def refresh() -> None:
            done, rows = _counters[0], _counters[1]
            value = done if is_bytes else rows
            bar.update(value - shown[0])
            shown[0] = value
            if is_bytes:
                bar.set_postfix_str(f"{rows:,} {rows_label}", refresh=False)

        try:
            if self._pool is None:
                _inline_refresh = refresh if self.progress else None
                try:
                    return [fn(*task) for task in tasks]
                finally:
                    _inline_refresh = None
            futures = [self._pool.submit(fn, *task) for task in tasks]
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=0.25, return_when=FIRST_EXCEPTION)
                refresh()
                for f in done:
                    if f.exception() is not None:
                        for other in pending:
                            other.cancel()
                        raise f.exception()
            return [f.result() for f in futures]
        finally:
            refresh()
            bar.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            gc.unfreeze()

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
