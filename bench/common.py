"""Shared helpers for the benchmarks: a short-socket-path local Ray, phantom records, process-tree memory."""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start_ray(num_cpus: int = 2, object_store_mb: int | None = None) -> None:
    import ray

    ray.init(num_cpus=num_cpus, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"),
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}, log_to_driver=False,
             object_store_memory=object_store_mb * 2**20 if object_store_mb else None)


def phantom_examples(n: int, task: str = "vqa", seed: int = 1) -> list[dict]:
    """Validated phantom records, as a plain PyTorch loop would read them."""
    from medvqa.data.phantoms import phantom_record
    from medvqa.data.records import validate_record

    return [validate_record(phantom_record(i, task, seed, "train")) for i in range(n)]


class TreeMemory:
    """Peak proportional set size (PSS: shared pages split between sharers) of this process and all descendants,
    which include the Ray workers and the object store, sampled every ``interval`` seconds."""

    def __init__(self, interval: float = 0.25):
        self.interval, self.peak, self.peak_processes, self._stop = interval, 0, 0, threading.Event()

    def _sample(self) -> tuple[int, int]:
        import psutil

        me = psutil.Process(os.getpid())
        total, processes = 0, [me, *me.children(recursive=True)]
        for p in processes:
            try:
                total += p.memory_full_info().pss
            except (psutil.Error, AttributeError):
                pass
        return total, len(processes)

    def _run(self):
        while not self._stop.is_set():
            total, n = self._sample()
            if total > self.peak:
                self.peak, self.peak_processes = total, n
            time.sleep(self.interval)

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
