"""Live metrics for the Ray dashboard: ``ray.util.metrics`` gauges and counters, tagged by run and stage.

Every Ray node serves the metrics its processes record on a Prometheus endpoint,
``http://<node ip>:<MetricsExportPort>/metrics`` (the port is in ``ray.nodes()``; ``ray.init(_metrics_export_port=…)``
or ``ray start --metrics-export-port`` fixes it), under a ``ray_`` prefix: ``ray_medvqa_samples_per_s{run="tiny-…",
stage="stage1"}``. Prometheus scrapes it and the dashboard's Metrics view and Grafana plot it (cluster/README.md).

============================  =======  ==========================  =============================================
metric                        kind     tags                        recorded by
============================  =======  ==========================  =============================================
medvqa_samples_per_s          gauge    run, stage                  rank-0 Train worker, every logged step
medvqa_tokens_per_s           gauge    run, stage                  (all workers together, as in metrics.jsonl)
medvqa_loss, medvqa_lr        gauge    run, stage                  rank-0 Train worker, every logged step
medvqa_step                   gauge    run, stage                  rank-0 Train worker, every logged step
medvqa_validation             gauge    run, stage, metric          rank-0 Train worker, every validation round
medvqa_gpu_memory_bytes       gauge    run, stage, device, kind    rank-0 Train worker on CUDA (allocated, peak)
medvqa_records                gauge    run, stage                  driver, once a stage's data is prepared
medvqa_rejected_records       gauge    run, stage                  driver, once a stage's data is prepared
medvqa_questions_per_s        gauge    run, stage (eval)           driver, every streamed evaluation batch
medvqa_questions_answered     counter  run, stage (eval)           driver, every streamed evaluation batch
medvqa_cells_done             counter  run, stage (eval)           driver, when a (model, condition) cell is full
============================  =======  ==========================  =============================================

Gauges, not counters, for record counts: a resumed stage prepares its data again and must not count it twice.
Nothing is recorded unless this process is connected to Ray (``ray`` is never imported here).
"""

from __future__ import annotations

import sys
from typing import Any, Mapping

from medvqa.tracking import finite_number

TAGS = ("run", "stage")
STEP_GAUGES = {
    "samples_per_s": "Training samples per second, all workers together.",
    "tokens_per_s": "Training tokens (attention-mask ones) per second, all workers together.",
    "loss": "Mean training loss over the last logging window.",
    "lr": "Learning rate after the last optimizer step.",
    "step": "Optimizer steps done in the stage.",
}

_metrics: dict[str, Any] = {}


def active() -> bool:
    """This process is connected to Ray (a driver after ray.init, or a Ray worker)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _metric(kind: str, name: str, description: str, tag_keys: tuple[str, ...] = TAGS):
    if name not in _metrics:
        from ray.util import metrics

        _metrics[name] = getattr(metrics, kind)(name, description=description, tag_keys=tag_keys)
    return _metrics[name]


def _gauge(name: str, value: Any, tags: dict, description: str = "", extra: tuple[str, ...] = ()) -> None:
    number = finite_number(value)
    if number is not None:
        _metric("Gauge", name, description, TAGS + extra).set(number, tags=tags)


def record_training(run: str, record: Mapping) -> None:
    """Set the gauges from a metrics.jsonl record (a logged step, a validation round, a stage's data counts)."""
    if not active():
        return
    tags = {"run": run, "stage": str(record.get("stage") or "run")}
    if "loss" in record:
        for field, description in STEP_GAUGES.items():
            _gauge(f"medvqa_{field}", record.get(field), tags, description)
        _gpu_memory(tags)
    for key, value in record.items():
        if key.startswith("val_") and key not in ("val_round", "val_n", "val_seconds"):
            _gauge("medvqa_validation", value, {**tags, "metric": key[4:]},
                   "Validation metrics of the last round (fractions in [0, 1]).", ("metric",))
    if record.get("event") == "data":
        _gauge("medvqa_records", record.get("records"), tags, "Valid records of the stage.")
        _gauge("medvqa_rejected_records", record.get("rejected"), tags, "Records rejected with a reason.")


def _gpu_memory(tags: dict) -> None:
    torch = sys.modules.get("torch")  # only where the training loop already imported it
    if torch is None or not torch.cuda.is_available():
        return
    for device in range(torch.cuda.device_count()):
        for kind, value in (("allocated", torch.cuda.memory_allocated(device)),
                            ("peak", torch.cuda.max_memory_allocated(device))):
            _gauge("medvqa_gpu_memory_bytes", value, {**tags, "device": str(device), "kind": kind},
                   "CUDA memory held by tensors of the training process, bytes.", ("device", "kind"))


def record_evaluation(run: str, questions: int, seconds: float, cells_done: int = 0) -> None:
    """An evaluation batch of ``questions`` answers that took ``seconds`` since the previous one arrived."""
    if not active():
        return
    tags = {"run": run, "stage": "eval"}
    if seconds > 0:
        _gauge("medvqa_questions_per_s", questions / seconds, tags, "Evaluation answers per second.")
    _metric("Counter", "medvqa_questions_answered", "Evaluation answers written.").inc(questions, tags=tags)
    if cells_done:
        _metric("Counter", "medvqa_cells_done", "Evaluation cells (model x condition) finished.").inc(
            cells_done, tags=tags)
