"""Shared helpers for the benchmarks: a short-socket-path local Ray, phantom records, process-tree memory."""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start_ray(num_cpus: int = 2) -> None:
    import ray

    ray.init(num_cpus=num_cpus, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"),
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}, log_to_driver=False)


def phantom_examples(n: int, task: str = "vqa", seed: int = 1) -> list[dict]:
    """Validated phantom records, as a plain PyTorch loop would read them."""
    from medvqa.data.phantoms import phantom_record
    from medvqa.data.records import validate_record

    return [validate_record(phantom_record(i, task, seed, "train")) for i in range(n)]


class TreeMemory:
    """Peak proportional set size (PSS: shared pages split between sharers) of this process and all descendants,
    which include the Ray workers and the object store, sampled every ``interval`` seconds."""

    def __init__(self, interval: float = 0.25):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def _sample(self) -> int:
        import psutil

        me = psutil.Process(os.getpid())
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_full_info().pss
            except (psutil.Error, AttributeError):
                pass
        return total

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(self.interval)

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
