"""Node loss on a multi-node Ray on one machine, the way Ray tests itself (``ray.cluster_utils.Cluster``): a head
(the driver, Ray Data's reads) and two worker nodes that alone have the custom resource ``medvqa_worker``, which
Train workers, Ray Data tasks and predictor actors ask for (``resources.worker_resource``). A node is taken away
(``Cluster.remove_node``, no graceful shutdown) while a ``hold`` fault (``medvqa.faults``) keeps its worker at an
exact point -- the test reads the fault's record to know when and which node, so nothing depends on timing:

* during training, right after a step past a checkpoint: Ray Train restarts the worker group on the remaining node
  from the latest checkpoint, loses fewer steps than the checkpoint interval, and ends with the adapter of an
  uninterrupted run;
* during the evaluation matrix, while a predictor actor holds a batch: Ray Data restarts the actor on the remaining
  node and runs its in-flight batches again; every question of every cell reaches the driver exactly once.

The two node-loss tests are in the slow tier (``-m slow``; durations on the loaded 2-core machine are in the
README's cluster section); the default tier checks the Ray Data defaults the evaluation relies on.
"""

import os
import shutil
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from medvqa.config import load_config
from medvqa.runs import read_metrics, run_dir_for

EXACT_RESUME = 1e-5  # max |Δw| of a resumed run vs the uninterrupted one (CPU, fp32), as in test_resume_faults
WORKER = {"medvqa_worker": 1}
# One Train worker; 24 records in micro-batches of 2, accumulated in pairs: 6 steps per epoch x 2 epochs, checkpoints
# every 4 steps and at epoch ends (4, 6, 8, 12). The node is lost after step 11: the restart resumes from step 8.
CHECKPOINT_EVERY = 4
TRAIN_ARGS = ["stage2.data.num_records=24", "stage2.epochs=2", "stage2.batch_size=2", "stage2.global_batch_size=4",
              f"run.checkpoint_every_n_steps={CHECKPOINT_EVERY}", "run.log_every_n_steps=1",
              "resources.worker_resource=medvqa_worker"]
TRAIN_FAULT, FAULT_STEP = "stage2:step=11:hold", 11
# One predictor actor (so exactly one holds), 2 models x 2 conditions x 12 questions in batches of 2; the actor holds
# its 3rd batch.
EVAL_ARGS = ["eval.concurrency=1", "eval.conditions=true,swapped", "eval.test_limit=12", "eval.batch_size=2",
             "eval.max_new_tokens=4", "eval.n_boot=10"]
EVAL_FAULT = "eval:batch=3:hold"
# A node killed without a goodbye is declared dead after health_check_failure_threshold missed checks, every
# health_check_period_ms (defaults 5 x 3 s): ~5 s here.
FAST_NODE_DEATH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                   "health_check_failure_threshold": 5}


def test_ray_data_restarts_predictor_actors_and_retries_their_batches():
    """Ray Data's actor pool recreates a lost actor and retries its in-flight batches unless told otherwise;
    ``infer.predict_dataset`` relies on that (passing these options explicitly is deprecated in Ray 2.60)."""
    from ray.data import DataContext
    from ray.data._internal.execution.operators.actor_pool_map_operator import ActorPoolMapOperator

    args = ActorPoolMapOperator._apply_default_remote_args({"resources": WORKER}, DataContext.get_current())
    assert args["max_restarts"] == -1 and args["max_task_retries"] == -1 and args["resources"] == WORKER


def _add_worker_nodes(cluster, n: int = 2) -> None:
    while len(cluster.worker_nodes) < n:
        cluster.add_node(num_cpus=1, resources=WORKER)
    cluster.wait_for_nodes()


@pytest.fixture(scope="module")
def cluster():
    """Head (2 logical CPUs, no ``medvqa_worker``) + two worker nodes (1 logical CPU and ``medvqa_worker: 1`` each:
    room for the one Train worker or predictor actor, and for it again when the other node is lost), the driver
    connected to the head."""
    import ray
    from ray.cluster_utils import Cluster

    mp = pytest.MonkeyPatch()
    temp = tempfile.mkdtemp(prefix="rnl", dir="/tmp")  # short: Ray's socket paths live under it
    mp.setenv("RAY_TMPDIR", temp)  # the cluster's address file too, so no other Ray on the machine joins it
    mp.delenv("RAY_ADDRESS", raising=False)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False,
                                                      "_system_config": FAST_NODE_DEATH})
    try:
        _add_worker_nodes(c)
        ray.init(address=c.address, runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        mp.undo()
        shutil.rmtree(temp, ignore_errors=True)


class NodeRemover(threading.Thread):
    """Waits for the record of ``spec`` in ``record_dir``/metrics.jsonl (written by the held process), then removes
    the node it names, as a machine that dies would (no graceful shutdown)."""

    def __init__(self, cluster, record_dir: Path, spec: str, timeout_s: float = 900):
        super().__init__(daemon=True)
        self.cluster, self.record_dir, self.spec, self.timeout_s = cluster, record_dir, spec, timeout_s
        self.removed: str | None = None
        self.error: BaseException | None = None

    def run(self):
        try:
            deadline = time.monotonic() + self.timeout_s
            while time.monotonic() < deadline:
                held = [r for r in read_metrics(self.record_dir, superseded=True) if r.get("fault") == self.spec]
                if held:
                    node = next(n for n in self.cluster.worker_nodes if n.node_id == held[0]["node_id"])
                    self.cluster.remove_node(node, allow_graceful=False)
                    self.removed = node.node_id
                    return
                time.sleep(0.2)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e


def _max_dw(run_a, run_b, stage: str) -> float:
    from safetensors.torch import load_file

    from medvqa.trainstep import adapter_max_abs_diff

    a, b = (load_file(str(r / "adapters" / stage / "adapter_model.safetensors")) for r in (run_a, run_b))
    return adapter_max_abs_diff(a, b)


@pytest.fixture(scope="module")
def plain_run(cluster, tmp_path_factory):
    """The uninterrupted run, on the same cluster."""
    from medvqa.train import run_two_stage

    out = tmp_path_factory.mktemp("plain")
    t0 = time.perf_counter()
    run = run_two_stage(load_config("tiny_single_stage", [*TRAIN_ARGS, f"run.output_dir={out}"]))
    print(f"\nuninterrupted run: {time.perf_counter() - t0:.0f} s")
    return run


@pytest.mark.slow
def test_training_survives_losing_its_node(cluster, plain_run, tmp_path, monkeypatch):
    from medvqa.train import run_two_stage

    _add_worker_nodes(cluster)
    monkeypatch.setenv("MEDVQA_FAULT", TRAIN_FAULT)
    monkeypatch.setenv("MEDVQA_FAULT_PGID", str(os.getpgid(0)))  # restored afterwards (the driver would export it)
    cfg = load_config("tiny_single_stage", [*TRAIN_ARGS, f"run.output_dir={tmp_path}"])
    remover = NodeRemover(cluster, run_dir_for(cfg).path, TRAIN_FAULT)
    remover.start()
    t0 = time.perf_counter()
    run = run_two_stage(cfg)
    remover.join(timeout=60)
    print(f"\nrun that lost its node at step {FAULT_STEP}: {time.perf_counter() - t0:.0f} s")
    assert remover.error is None and remover.removed, remover.error
    assert len(cluster.worker_nodes) == 1  # it finished on the remaining node (the head has no medvqa_worker)

    rows = read_metrics(run, superseded=True)
    fault = [r for r in rows if r.get("event") == "fault"]
    assert [(r["fault"], r["node_id"]) for r in fault] == [(TRAIN_FAULT, remover.removed)]
    starts = [r["step"] for r in rows if r.get("event") == "train_start"]
    assert starts[0] == 0 and len(starts) == 2
    lost = FAULT_STEP - starts[1]
    print(f"restarted from step {starts[1]}: {lost} steps lost (checkpoint interval {CHECKPOINT_EVERY})")
    assert 0 < lost <= CHECKPOINT_EVERY
    steps = [r["step"] for r in read_metrics(run) if "loss" in r]
    assert steps == list(range(1, 13))  # each step once after the superseded rows are dropped
    dw = _max_dw(run, plain_run, "stage2")
    print(f"max |Δw| vs the uninterrupted run: {dw:.3g}")
    assert dw <= EXACT_RESUME


@pytest.mark.slow
def test_evaluation_survives_losing_a_predictor_node(cluster, plain_run, monkeypatch):
    from medvqa.evaluate import evaluate_run
    from medvqa.predictions import CellWriter

    _add_worker_nodes(cluster)
    received: list[tuple[str, str, str]] = []  # every prediction row that reaches the driver
    add = CellWriter.add

    def spy(self, df: pd.DataFrame) -> None:
        received.extend(zip(df["model"], df["condition"], df["question_id"]))
        add(self, df)

    monkeypatch.setattr(CellWriter, "add", spy)
    monkeypatch.setenv("MEDVQA_FAULT", EVAL_FAULT)
    monkeypatch.setenv("MEDVQA_FAULT_PGID", str(os.getpgid(0)))
    remover = NodeRemover(cluster, plain_run / "eval", EVAL_FAULT)
    remover.start()
    t0 = time.perf_counter()
    out = evaluate_run(plain_run, EVAL_ARGS)
    remover.join(timeout=60)
    print(f"\nevaluation that lost its predictor's node: {time.perf_counter() - t0:.0f} s, {len(received)} rows")
    assert remover.error is None and remover.removed, remover.error
    assert [r["node_id"] for r in read_metrics(plain_run / "eval") if r.get("fault") == EVAL_FAULT] == [
        remover.removed]

    assert out["rows_predicted"] == {f"{m}/{c}": 12 for m in ("base", "single_stage") for c in ("true", "swapped")}
    assert len(received) == len(set(received))  # nothing doubled ...
    assert Counter(f"{m}/{c}" for m, c, _ in received) == out["rows_predicted"]  # ... nothing lost
    cells = out["metrics"]["settings"]["cells"]
    for m, by_condition in cells.items():
        for c, rel in by_condition.items():
            ids = pd.read_parquet(plain_run / "eval" / rel)["question_id"].tolist()
            assert sorted(ids) == sorted(q for mm, cc, q in received if (mm, cc) == (m, c))
