"""Where a run's numbers go besides metrics.jsonl: MLflow (``tracking``), the Ray dashboard (``telemetry``) and the
driver's progress bars (``console``). The pipeline reaches them through a few one-line hooks:

- ``record`` = ``runs.append_metrics`` + ``on_record``: every metrics.jsonl record, in the process that writes it
  (the rank-0 Train worker for steps and validation rounds, the driver for stage events);
- ``evaluate.run_matrix`` -> ``eval_stream``: wraps the stream of predictions for a bar and the evaluation metrics;
- the CLI's ``train`` -> ``session``: calm console, run log, progress watcher, MLflow run start and end;
- a sweep's trial -> ``tracked``: the MLflow run of the trial, a child of the sweep's.

This module imports neither mlflow nor ray (the sinks import them only when they are in use).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from medvqa import console, telemetry, tracking
from medvqa.runs import RunDir, append_metrics, run_dir_for, run_id
from medvqa.storage import StoragePath, mirrored_file

log = logging.getLogger("medvqa.observe")
_failed: set[str] = set()


def record(run_dir: RunDir | str | Path, rec: dict) -> None:
    """Append ``rec`` to the run's metrics.jsonl and pass it on (``on_record``)."""
    rec = {**rec, "time": rec.get("time", time.time())}
    append_metrics(run_dir, rec)
    on_record(run_dir, rec)


def on_record(run_dir: RunDir | str | Path | StoragePath, record: Mapping) -> None:
    """A metrics.jsonl record to MLflow (if the run is tracked), the Ray metrics and the driver's progress board.
    Never raises: observing a run must not break it."""
    run_dir = StoragePath(run_dir)
    for name, fn in (("mlflow", tracking.log_record), ("ray metrics", _telemetry), ("progress", _publish)):
        try:
            fn(run_dir, record)
        except Exception as e:  # noqa: BLE001
            if name not in _failed:
                _failed.add(name)
                log.warning("%s: could not record a metrics line (%s: %s)", name, type(e).__name__, e)


def _telemetry(run_dir: StoragePath, record: Mapping) -> None:
    telemetry.record_training(run_dir.name, record)


def _publish(run_dir: StoragePath, record: Mapping) -> None:
    if telemetry.active():
        console.publish(run_dir.name, record)


def eval_stream(cfg, rows: list[Mapping], batches: Iterable) -> Iterator:
    """Yield the evaluation's prediction DataFrames (``batches``) unchanged, drawing a bar (one step per answer) on
    the session's console and recording answers/s, answers and finished cells as Ray metrics. ``rows``: every
    (model, condition) question of this pass."""
    run = run_id(cfg)
    totals = Counter((r["model"], r["condition"]) for r in rows)
    seen: Counter = Counter()
    done, t0 = 0, time.monotonic()
    t_last = t0
    bar = console.current()
    for df in batches:
        yield df
        now = time.monotonic()
        cells_done = 0
        for key, n in Counter(zip(df["model"], df["condition"])).items():
            seen[key] += n
            cells_done += seen[key] == totals[key]
        done += len(df)
        telemetry.record_evaluation(run, len(df), now - t_last, cells_done)
        t_last = now
        if bar is not None:  # the rate since the pass began, actor start-up included
            bar.progress("eval", done, len(rows), {"answers/s": f"{done / (now - t0):.1f}"})
    if bar is not None:
        bar.finish("eval")


@contextmanager
def tracked(cfg, run_dir: RunDir | Path, tags: Mapping[str, str] | None = None,
            parent: Mapping | None = None) -> Iterator[dict | None]:
    """The MLflow run of ``run_dir`` (when ``run.tracking=mlflow``) for the duration of the block: RUNNING inside,
    then FINISHED, FAILED or KILLED (Ctrl-C); the adapters are uploaded at the end with ``run.tracking_adapters``."""
    rd = StoragePath(run_dir)
    session = tracking.start_run(cfg, rd, tags=tags, parent=parent)
    status = "FAILED"
    try:
        yield session
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if session:
            upload = {"adapters": rd / "adapters"} if cfg.run.tracking_adapters and status == "FINISHED" else {}
            tracking.end_run(rd, status, upload)


@contextmanager
def session(cfg, command: str, preset: str | None = None, terminal=None,
            shutdown_ray: bool = False) -> Iterator[RunDir]:
    """A driver command on a run (``train``): its output and logs to ``RUN_DIR/logs/<command>.log``, progress bars
    and our log lines on the terminal (everything with ``run.verbose``), the run tracked in MLflow. A failure prints
    its cause and the log's path, and is re-raised. ``shutdown_ray``: disconnect from Ray at the end, while output
    still goes to the log (Ray prints the worker lines it held back for de-duplication when it disconnects; a
    command's process would otherwise print them at exit). With the run in object storage the log is written to a
    local file and uploaded when the command ends (``storage.mirrored_file``)."""
    rd = run_dir_for(cfg)
    log_path = rd.logs / f"{command}.log"
    with mirrored_file(log_path) as local_log, console.calm(local_log, cfg.run.verbose, terminal) as con:
        watcher = console.BoardWatcher(con, rd.name).start() if con is not None else None
        try:
            with tracked(cfg, rd, tags={"medvqa.preset": preset or "", "medvqa.command": command}):
                log.info("full log: %s", log_path)
                yield rd
        except BaseException as e:
            if watcher is not None:
                watcher.stop()
                watcher = None
            if con is not None:
                con.finish(note="stopped")
            if not isinstance(e, (SystemExit, GeneratorExit)):
                what = "interrupted" if isinstance(e, KeyboardInterrupt) else f"error: {console.failure_summary(e)}"
                log.error("%s\nfull log: %s", what, log_path, exc_info=e)  # the traceback goes to the log only
            raise
        finally:
            if watcher is not None:
                watcher.stop()
            if shutdown_ray and telemetry.active():
                import ray

                ray.shutdown()

