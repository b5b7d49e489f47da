"""Injected faults: kill a training worker or the whole job at an exact point, so resume is tested, not hoped for.

``MEDVQA_FAULT`` holds comma-separated specs ``<stage>:<point>:<target>``:

* point ``step=N``: after optimizer step N of the stage, once that step's logging, validation and checkpoint are done;
  ``val_round=N``: the same, at the step of validation round N; ``end``: after the stage finished (its adapter is
  saved), before the next stage starts (driver side);
* target ``worker``: Train worker rank 0 exits (``os._exit``): Ray Train restarts the workers from the latest
  checkpoint (``run.max_failures``); ``driver``: SIGKILL to the driver's process group, as a preempted node or
  ``kill -9`` of the job would (the job dies; re-running the same command resumes it).

E.g. ``MEDVQA_FAULT=stage1:step=3:driver,stage1:end:driver,stage2:val_round=1:driver``. Each spec fires once per run
directory: firing appends ``{"event": "fault", "fault": <spec>}`` to metrics.jsonl first, and a re-run skips specs
found there, so the same command and environment walk through the faults one after another. Before a step fault
fires, the worker waits until Ray Train has registered the latest checkpoint it reported (registration lags the
report by up to a controller poll, ~2 s): the run then restores exactly that checkpoint. Unset, nothing happens.

The driver records its process group in ``MEDVQA_FAULT_PGID`` before starting a local Ray, so a Tune trial (another
process group) kills the sweep's driver, not just itself. Driver faults assume the driver and the workers share a
machine (a local Ray, as in the tests).
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Callable

FAULT_ENV = "MEDVQA_FAULT"
PGID_ENV = "MEDVQA_FAULT_PGID"
POINTS = ("step", "val_round", "end")
TARGETS = ("worker", "driver")


@dataclass(frozen=True)
class Fault:
    spec: str
    stage: str
    point: str
    value: int | None
    target: str


def parse_faults(text: str) -> list[Fault]:
    """Specs from ``MEDVQA_FAULT``'s syntax; a malformed one is a ValueError (a typo must not silently test
    nothing)."""
    faults = []
    for spec in (s.strip() for s in (text or "").split(",")):
        if not spec:
            continue
        parts = spec.split(":")
        point, _, value = parts[1].partition("=") if len(parts) == 3 else ("", "", "")
        ok = (len(parts) == 3 and parts[0] in ("stage1", "stage2") and point in POINTS and parts[2] in TARGETS
              and (value.isdigit() if point != "end" else not value and parts[2] == "driver"))
        if not ok:
            raise ValueError(f"{FAULT_ENV}: bad spec {spec!r}; expected <stage1|stage2>:<step=N|val_round=N|end>:"
                             f"<worker|driver> ('end' with driver only), e.g. stage2:step=5:driver")
        faults.append(Fault(spec, parts[0], point, int(value) if value else None, parts[2]))
    return faults


def faults_from_env() -> dict:
    """What the driver hands its Train workers: the specs and the process group to kill."""
    return {"faults": os.environ.get(FAULT_ENV, ""), "pgid": int(os.environ.get(PGID_ENV) or os.getpgid(0))}


def export_driver_pgid() -> None:
    """Remember this driver's process group for the Ray processes it starts (call before ``ray.init``)."""
    if os.environ.get(FAULT_ENV) and not os.environ.get(PGID_ENV):
        os.environ[PGID_ENV] = str(os.getpgid(0))


def fire(faults: list[Fault], stage: str, run_dir, pgid: int, wait: Callable[[], None] | None = None,
         **at: int | None) -> None:
    """Fire the first not-yet-fired fault of ``stage`` matching ``at`` (``step=…, val_round=…`` or ``end=None``);
    ``wait`` runs first (e.g. until the latest checkpoint is registered)."""
    from medvqa.runs import append_metrics, read_metrics

    due = [f for f in faults if f.stage == stage and f.point in at and (f.value is None or at[f.point] == f.value)]
    if not due:
        return
    fired = {r.get("fault") for r in read_metrics(run_dir, superseded=True) if r.get("event") == "fault"}
    due = [f for f in due if f.spec not in fired]
    if not due:
        return
    fault = due[0]
    if wait is not None:
        wait()
    append_metrics(run_dir, {"stage": stage, "event": "fault", "fault": fault.spec})
    if fault.target == "driver":
        os.killpg(pgid, signal.SIGKILL)  # this process too when it is the driver
    os._exit(1)  # a worker dies; a driver-group kill may not include this process (Ray workers have their own)
