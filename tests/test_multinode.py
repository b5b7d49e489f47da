"""Several Ray nodes on one machine with the run directories in an S3 bucket, the way Ray tests itself
(``ray.cluster_utils.Cluster``; moto's S3 server on loopback, as Ray's storage tests use):

* a head node (1 CPU) and two worker nodes carrying the custom resource ``medvqa_worker``;
  ``resources.worker_resource=medvqa_worker`` puts the Train workers, our Ray Data tasks and the predictor actors
  on the worker nodes (checked with Ray's state API);
* every job is ``python jobs/two_stage.py`` / ``medvqa eval`` / ``tune/sweep.py`` as a user types it, in its own
  process connected to the cluster (``RAY_ADDRESS``), started from an empty working directory that must stay empty:
  the bucket holds every artifact (listed key by key);
* the main job is killed at an exact step (``MEDVQA_FAULT``) and re-run from another working directory: it finds the
  run in the bucket, skips the finished stage and resumes the interrupted one from its checkpoint there.

Slow tier (``-m slow``): minutes each on 2 shared cores."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import ROOT, bucket_keys, job_env, make_bucket

from medvqa.config import load_config
from medvqa.runs import RunDir, read_json, read_metrics, run_dir_for

pytestmark = pytest.mark.slow

WORKER = "medvqa_worker"
BUCKET = "medvqa-multinode"
# stage 1: 32 records = 8 steps; stage 2: 48 records = 12 steps; checkpoints every 4 steps and at the end.
TRAIN_ARGS = ["--preset", "tiny", "stage1.data.num_records=32", "stage1.epochs=1", "stage2.data.num_records=48",
              "stage2.epochs=1", "run.checkpoint_every_n_steps=4", "run.log_every_n_steps=1",
              f"resources.worker_resource={WORKER}"]
FAULT = "stage2:step=6:driver"  # restores stage 2's step-4 checkpoint from the bucket


@pytest.fixture(scope="module")
def cluster(s3_server):
    """(cluster, worker node ids, head node id): a head with 1 CPU and two worker nodes with 2 logical CPUs and
    ``medvqa_worker`` each. Its temp dir is private, so no other Ray on this machine finds it by its address file;
    so is the download cache of its workers (``MEDVQA_STORAGE_CACHE``, inherited by every node)."""
    from ray.cluster_utils import Cluster

    saved = {k: os.environ.get(k) for k in ("RAY_TMPDIR", "MEDVQA_STORAGE_CACHE")}
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    os.environ["MEDVQA_STORAGE_CACHE"] = cache = tempfile.mkdtemp(prefix="medvqa-cache-")
    with socket.socket() as s:  # the default 8265 may be taken by another Ray on this machine
        s.bind(("127.0.0.1", 0))
        dashboard_port = s.getsockname()[1]
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True,
                                                      "dashboard_host": "127.0.0.1",
                                                      "dashboard_port": dashboard_port})
    workers = [c.add_node(num_cpus=2, resources={WORKER: 1}, object_store_memory=300 * 2**20) for _ in range(2)]
    c.wait_for_nodes()
    yield c, {w.node_id for w in workers}, c.head_node.node_id
    c.shutdown()
    shutil.rmtree(cache, ignore_errors=True)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def bucket(s3_server):
    return make_bucket(BUCKET)


def run_in(cwd: Path, argv: list[str], env: dict, log: Path) -> int:
    """``argv`` (python script and arguments) from the empty folder ``cwd``, in its own session (an injected driver
    fault kills only it); its return code."""
    cwd.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT,
                              start_new_session=True, timeout=1500).returncode


def cluster_env(cluster, **extra) -> dict:
    """A driver's environment: connected to the cluster, with this checkout's code."""
    return job_env(RAY_ADDRESS=cluster[0].address, PYTHONPATH=str(ROOT), **extra)


def placement(cluster) -> dict[str, set[str]]:
    """Node ids each kind of our work ran on (state API): Train workers, predictor actors, our Ray Data tasks."""
    from ray.util.state import list_actors, list_tasks

    c, _, _ = cluster
    address = c.webui_url if c.webui_url.startswith("http") else f"http://{c.webui_url}"
    out: dict[str, set[str]] = {}
    for a in list_actors(address=address, limit=10000, detail=True, raise_on_missing_output=False):
        if a.class_name == "RayTrainWorker":
            out.setdefault("train worker", set()).add(a.node_id)
        elif "Predictor" in a.class_name:  # MapWorker(MapBatches(Predictor))
            out.setdefault("predictor actor", set()).add(a.node_id)
    for t in list_tasks(address=address, limit=10000, detail=True, raise_on_missing_output=False):
        out.setdefault(f"task {t.name}", set()).add(t.node_id)
    return out


def captions_with_a_bad_image(path: Path, n: int = 32) -> Path:
    """A roco_hf parquet of ``n`` phantom captions and one record whose image is not an image (a reject)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from medvqa.data.phantoms import phantom_records

    rows = [{"image": {"bytes": r["image"], "path": f"{r['id']}.png"}, "caption": r["target"]}
            for r in phantom_records("caption", n, seed=0)]
    rows.append({"image": {"bytes": b"not an image", "path": "broken.png"}, "caption": "a broken file"})
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="module")
def trained(cluster, bucket, tiny_model_dir, tmp_path_factory):
    """The main job killed mid-stage-2 from one working directory and re-run from another: (run dir, the two
    return codes, the working directories, the logs folder). Stage 1 reads a parquet with one broken image (the
    driver reads the file; a task on a worker node rejects the record)."""
    tmp = tmp_path_factory.mktemp("main")
    captions = captions_with_a_bad_image(tmp / "captions.parquet")
    args = [*TRAIN_ARGS, f"run.output_dir={bucket}/runs", f"model.cache_dir={tiny_model_dir.parent}",
            "stage1.data.kind=roco_hf", f"stage1.data.path={captions}"]
    env = cluster_env(cluster, MEDVQA_FAULT=FAULT)
    cwds = [tmp / "cwd_a", tmp / "cwd_b"]
    codes = [run_in(cwd, [str(ROOT / "jobs" / "two_stage.py"), *args], env, tmp / f"job{i}.log")
             for i, cwd in enumerate(cwds)]
    rd = run_dir_for(load_config("tiny", args[2:]))
    return rd, codes, cwds, tmp


def test_main_job_lives_in_the_bucket_and_resumes_from_another_directory(trained, cluster, bucket):
    """Killed at stage 2's step 6, the job re-run from another directory resumes from the step-4 checkpoint in the
    bucket (stage 1 skipped, every step logged once); every artifact is in the bucket, the reject collected; the Train
    workers and our Ray Data tasks ran on the worker nodes."""
    rd, codes, cwds, logs = trained
    assert codes == [-9, 0], (logs / "job1.log").read_text()[-4000:]
    assert str(rd.path).startswith(f"{bucket}/runs/")
    rows = read_metrics(rd, superseded=True)
    assert [r["fault"] for r in rows if r.get("event") == "fault"] == [FAULT]
    starts = [(r["stage"], r["step"]) for r in rows if r.get("event") == "train_start"]
    assert starts == [("stage1", 0), ("stage2", 0), ("stage2", 4)]  # stage 1 skipped; stage 2 from its checkpoint
    steps = [(r["stage"], r["step"]) for r in read_metrics(rd) if "loss" in r]
    assert steps == [("stage1", s) for s in range(1, 9)] + [("stage2", s) for s in range(1, 13)]
    keys = {k.split("/", 2)[2] for k in bucket_keys(BUCKET, f"runs/{rd.name}/")}
    for expected in ("config.yaml", "environment.json", "manifest.json", "stages.json", "logs/train.log",
                     "rejects/stage1.jsonl", "rejects/stage2.jsonl", "data/stage1/manifest.json",
                     "adapters/stage1/adapter_config.json", "adapters/stage2/adapter_model.safetensors",
                     "checkpoints/stage2/checkpoint_manager_snapshot.json"):
        assert expected in keys, expected
    assert any(k.startswith("metrics/") for k in keys) and any(k.startswith("data/stage2/") and
                                                               k.endswith(".parquet") for k in keys)
    assert any(k.startswith("checkpoints/stage2/step_000012/") for k in keys)
    assert not any(k.startswith(("rejects/stage1/", "rejects/stage2/")) for k in keys)  # parts gathered, removed
    rejects = [json.loads(line) for line in (rd.path / "rejects" / "stage1.jsonl").read_text().splitlines()]
    assert len(rejects) == 1 and rejects[0]["reject_reason"], rejects
    assert read_json(rd.manifest)["stage1"]["rejected"] == 1
    assert all(list(cwd.iterdir()) == [] for cwd in cwds)  # nothing of the run on local disk
    _, worker_nodes, head = cluster
    workers = read_json(rd.environment)["workers"]
    assert {w["node_id"] for stage in workers.values() for w in stage} <= worker_nodes
    where = placement(cluster)
    print(f"\nplacement (head {head}; workers {sorted(worker_nodes)}):")
    for kind, nodes in sorted(where.items()):
        print(f"  {kind}: {'head' if head in nodes else ''} {len(nodes & worker_nodes)} worker node(s)")
    assert where.get("train worker") and where["train worker"] <= worker_nodes, where
    ours = ("_phantom_batch", "_validate_and_split", "Write", "_read_planned", "preprocess_batch")
    tasks = {k: nodes for k, nodes in where.items() if any(f in k for f in ours)}
    assert all(any(f in k for k in tasks) for f in ours), sorted(where)
    assert all(head not in nodes for nodes in tasks.values()), tasks


def test_evaluation_matrix_and_report_in_the_bucket(trained, cluster, tmp_path):
    """`medvqa eval` and `medvqa report` of the run in the bucket, from an empty working directory: predictor actors
    on the worker nodes, the stage adapters fetched from the bucket, predictions, metrics and report written there."""
    rd, codes, _, _ = trained
    assert codes[-1] == 0
    env = cluster_env(cluster)
    cwd = tmp_path / "cwd"
    argv = [str(ROOT / "jobs" / "eval_matrix.py"), str(rd.path), "eval.conditions=true,swapped", "eval.test_limit=16",
            "eval.max_new_tokens=4", "eval.concurrency=2", "eval.cpus_per_actor=0.25", "eval.n_boot=50"]
    assert run_in(cwd, argv, env, tmp_path / "eval.log") == 0, (tmp_path / "eval.log").read_text()[-4000:]
    assert run_in(cwd, ["-m", "medvqa.cli", "report", str(rd.path), "--no-audit"], env, tmp_path / "report.log") == 0, \
        (tmp_path / "report.log").read_text()[-4000:]
    metrics = read_json(rd.eval_metrics)
    assert set(metrics["settings"]["evaluated"]) == {"base", "two_stage"}
    assert {c: metrics["cells"]["two_stage"][c]["n"] for c in ("true", "swapped")} == {"true": 16, "swapped": 16}
    keys = {k.split("/", 2)[2] for k in bucket_keys(BUCKET, f"runs/{rd.name}/")}
    cells = [k for k in keys if k.startswith("eval/predictions/") and k.endswith(".parquet")]
    assert len(cells) == 4 and not any(".parts/" in k for k in keys), sorted(keys)
    assert {"report/report.md", "report/report.html", "report/plots/metrics.png"} <= keys
    assert list(cwd.iterdir()) == []
    _, worker_nodes, _ = cluster
    where = placement(cluster)
    assert where.get("predictor actor") and where["predictor actor"] <= worker_nodes, where


SPACE = """\
# a 2-trial sweep small enough for the test cluster
preset: tiny
overrides:
  - stage1.data.num_records=16
  - stage1.epochs=1
  - stage2.data.num_records=48
  - stage2.data.validation_fraction=0.25
  - stage2.epochs=1
  - run.checkpoint_every_n_steps=100000
  - run.log_every_n_steps=4
  - resources.worker_resource=medvqa_worker
params:
  lora.r: {values: [2, 4]}
metric: val_normalized_f1
mode: max
num_samples: 2
max_concurrent: 2
seed: 0
tpe_startup_trials: 2
asha: null
report: {x: lora.r, line: null}
"""


def test_sweep_lives_in_the_bucket(cluster, bucket, tiny_model_dir, tmp_path):
    """`tune/sweep.py` with MEDVQA_RUNS_BASE=s3://…: Tune's experiment, both trials' run directories and the sweep
    report in the bucket; the Optuna study in memory (no optuna.db); nothing on local disk."""
    from medvqa.sweep import load_space, sweep_dir_for
    from medvqa.sweep_report import load_trials

    space_file = tmp_path / "space" / "mini.yaml"
    space_file.parent.mkdir()
    space_file.write_text(SPACE)
    overrides = [f"model.cache_dir={tiny_model_dir.parent}"]
    env = cluster_env(cluster, MEDVQA_RUNS_BASE=f"{bucket}/base")
    cwd = tmp_path / "cwd"
    argv = [str(ROOT / "tune" / "sweep.py"), "--preset", str(space_file), *overrides]
    assert run_in(cwd, argv, env, tmp_path / "sweep.log") == 0, (tmp_path / "sweep.log").read_text()[-4000:]
    os.environ["MEDVQA_RUNS_BASE"] = f"{bucket}/base"
    try:
        sdir = sweep_dir_for(load_space(str(space_file), overrides=overrides))
    finally:
        os.environ.pop("MEDVQA_RUNS_BASE")
    assert str(sdir).startswith(f"{bucket}/base/sweeps/mini-")
    _, trials, _ = load_trials(sdir)
    assert sorted(trials["status"]) == ["completed", "completed"] and trials["val_normalized_f1"].notna().all()
    assert all(str(r).startswith(f"{sdir}/runs/trial-") for r in trials["run_dir"])
    prefix = f"base/sweeps/{sdir.name}/"
    keys = {k[len(prefix):] for k in bucket_keys(BUCKET, prefix)}
    assert {"space.yaml", "report/trials.csv", "report/report.md", "report/best.yaml"} <= keys
    trial_dirs = {k.rsplit("/", 1)[0] for k in keys if k.startswith("tune/") and k.endswith("/params.json")}
    assert len(trial_dirs) == 2 and {f"{d}/medvqa_run.json" for d in trial_dirs} <= keys  # each trial's link
    assert sum(k.endswith("/adapters/stage2/adapter_config.json") for k in keys) == 2
    assert "optuna.db" not in keys and list(cwd.iterdir()) == []
    for run_dir in trials["run_dir"]:
        assert any(r.get("event") == "validation" for r in read_metrics(RunDir(run_dir)))
