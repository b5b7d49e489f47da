"""Injected faults: kill a training worker, a predictor actor or the whole job at an exact point, or hold it there
while a test removes its node, so resume is tested, not hoped for.

``MEDVQA_FAULT`` holds comma-separated specs ``<stage>:<point>:<target>``:

* stage ``stage1`` / ``stage2``, point ``step=N``: after optimizer step N of the stage, once that step's logging,
  validation and checkpoint are done; ``val_round=N``: the same, at the step of validation round N; ``end``: after
  the stage finished (its adapter is saved), before the next stage starts (driver side);
* stage ``eval``, point ``batch=N``: in a predictor actor of the evaluation matrix, before it answers its N-th batch
  (counted per actor), so that batch and any others queued on the actor are in flight;
* target ``worker``: Train worker rank 0 (or the predictor actor) exits (``os._exit``): Ray Train restarts the
  workers from the latest checkpoint (``run.max_failures``), Ray Data restarts the actor and retries its batches;
  ``driver``: SIGKILL to the driver's process group, as a preempted node or ``kill -9`` of the job would (the job
  dies; re-running the same command resumes it); ``hold``: the process blocks (for ``HOLD_TIMEOUT_S``, then it
  raises), so that a test can take its node away meanwhile (``ray.cluster_utils.Cluster.remove_node``) -- a machine
  lost at an exact step, never a race with a timer.

E.g. ``MEDVQA_FAULT=stage1:step=3:driver,stage1:end:driver,stage2:val_round=1:driver``. Each spec fires once per run
directory: firing appends ``{"event": "fault", "fault": <spec>, "node_id": <Ray node>}`` to metrics.jsonl first (for
``eval`` specs the evaluation folder's, ``RUN_DIR/eval/metrics.jsonl``), and a re-run, a restarted worker or actor
skips specs found there, so the same command and environment walk through the faults one after another; a test
waiting for a ``hold`` reads the node to remove from that record. Before a step fault fires, the worker waits until
Ray Train has registered the latest checkpoint it reported (registration lags the report by up to a controller poll,
~2 s): the run then restores exactly that checkpoint. With several predictor actors the first to reach batch N fires
an ``eval`` spec, and two reaching it at the same moment may both fire it: use one actor (``eval.concurrency=1``) for
exactly one. Unset, nothing happens.

The driver records its process group in ``MEDVQA_FAULT_PGID`` before starting a local Ray, so a Tune trial (another
process group) kills the sweep's driver, not just itself. Driver faults assume the driver and the workers share a
machine (a local Ray, or ``Cluster`` nodes on one machine, as in the tests).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Callable

FAULT_ENV = "MEDVQA_FAULT"
PGID_ENV = "MEDVQA_FAULT_PGID"
POINTS = {"stage1": ("step", "val_round", "end"), "stage2": ("step", "val_round", "end"), "eval": ("batch",)}
TARGETS = ("worker", "driver", "hold")
HOLD_TIMEOUT_S = 600  # a held process nobody removed raises after this: a broken test fails instead of hanging


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
        ok = (len(parts) == 3 and point in POINTS.get(parts[0], ()) and parts[2] in TARGETS
              and (value.isdigit() if point != "end" else not value and parts[2] == "driver"))
        if not ok:
            raise ValueError(f"{FAULT_ENV}: bad spec {spec!r}; expected <stage1|stage2>:<step=N|val_round=N|end>:"
                             f"<worker|driver|hold> ('end' with driver only) or eval:batch=N:<worker|driver|hold>, "
                             f"e.g. stage2:step=5:driver")
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
    append_metrics(run_dir, {"stage": stage, "event": "fault", "fault": fault.spec, **_node()})
    if fault.target == "hold":
        time.sleep(HOLD_TIMEOUT_S)  # until the node is removed, which kills this process
        raise RuntimeError(f"{FAULT_ENV} {fault.spec}: held for {HOLD_TIMEOUT_S} s and nobody removed this node")
    if fault.target == "driver":
        os.killpg(pgid, signal.SIGKILL)  # this process too when it is the driver
    os._exit(1)  # a worker dies; a driver-group kill may not include this process (Ray workers have their own)


def _node() -> dict:
    """The Ray node this process runs on (``{"node_id": hex}``), or {} outside Ray."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return {}
    return {"node_id": ray.get_runtime_context().get_node_id()}
