"""MLflow tracking of runs and sweeps (``run.tracking=mlflow``), logged where the data is produced.

What a run logs, and from which process:

- the driver, when a session starts (``start_run``): the MLflow run (named by our run id, tag ``medvqa.run_id``), the
  resolved config as params with dotted keys (``lora.r``, ``stage2.lr``), tags for the code version
  (``mlflow.source.git.commit``, ``medvqa.source_sha256``), the preset, the run directory and the adapters' path
  (``medvqa.adapters``: adapters are referenced, not uploaded, unless ``run.tracking_adapters=true``);
- the process that writes a ``metrics.jsonl`` record (``log_record``, via ``observe.record``): the rank-0 Train
  worker for per-step loss, lr, samples/s, tokens/s and validation rounds, the driver for stage events (data counts,
  stage seconds). Metric names carry the stage, ``<stage>/<field>`` (``stage1/loss``, ``stage2/val_normalized_f1``),
  with the stage's own optimizer step as the MLflow step: the stages train on different data, so each gets its own
  curve (the MLflow UI groups the charts by the prefix), and a resumed stage continues its step axis;
- the driver, after the evaluation (``log_evaluation``): every cell's metrics as ``eval/<model>/<condition>/<metric>``
  and the image-reliance drops as ``eval/<model>/image_reliance/<metric>`` (step 0), and the report folder as
  artifacts under ``report/`` (``log_artifacts``).

Resume: ``RUN_DIR/tracking.json`` holds the tracking URI, experiment and MLflow run id. A re-submitted run reopens that
MLflow run; when the file names another store (or is missing) the run is found by its ``medvqa.run_id`` tag; only then
is a new one created. Params are immutable in MLflow, so a resumed session logs only keys the run does not have yet.
Step records between a run's last checkpoint and a crash are logged again after the resume (as in metrics.jsonl).

Sweeps: one parent run per sweep (``SWEEP_DIR/tracking.json``, tag ``medvqa.sweep``, the search space as params, the
sweep report as artifacts) and one child run per trial (``mlflow.parentRunId``), each a normal run as above. Ray Tune's
MLflow integration does not fit: ``MLflowLoggerCallback`` opens a run per trial object on the Tune driver (a restored
sweep would start new runs), nests nothing and sees only what the trial reports to Tune (our validation rounds, not the
per-step curves, which happen inside each trial's own TorchTrainer workers); ``setup_mlflow`` starts a fresh run per
call in the Tune trainable, where neither the Train workers nor a resumed trial can find it again.

The tracking URI: ``run.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<output_dir>/mlflow.db``
(next to the run directories; no server needed; with run directories in object storage there is no such default and
one of the first two is required). The driver resolves it once (a relative sqlite path becomes absolute) and stores
it in tracking.json, so workers on other nodes use the same store -- on a multi-node cluster that must be a tracking
server (``http://...``), not a sqlite file. A store that cannot be opened when a session starts is
an error (the user asked for tracking); once training runs, a failed call is a warning (once per kind of call) and the
run goes on.

``mlflow`` (mlflow-skinny is enough) is imported only when tracking is on.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from medvqa.runs import git_info, read_json, source_hash, write_json
from medvqa.storage import StoragePath, local_copy

log = logging.getLogger("medvqa.tracking")

SESSION_FILE = "tracking.json"  # in a run or sweep directory
RUN_TAG = "medvqa.run_id"
SWEEP_TAG = "medvqa.sweep"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests the run under its parent
PARAM_VALUE_LIMIT = 6000  # MLflow's MAX_PARAM_VAL_LENGTH (mlflow.utils.validation); longer values are cut
PARAMS_PER_CALL = 100  # MLflow's MAX_PARAMS_TAGS_PER_BATCH (params and tags together)
METRICS_PER_CALL = 1000  # MLflow's MAX_METRICS_PER_BATCH
NOT_METRICS = ("step", "total_steps", "time")  # record fields that are coordinates, not measurements


# ------------------------------------------------------------------------------------------------- pure helpers


def flatten_params(data: Mapping, prefix: str = "") -> dict[str, str]:
    """A nested config dict as MLflow params: dotted keys, string values (lists as JSON), cut to MLflow's limit."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_params(value, name + "."))
            continue
        text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
        out[name] = text if len(text) <= PARAM_VALUE_LIMIT else text[:PARAM_VALUE_LIMIT - 3] + "..."
    return out


def finite_number(value: Any) -> float | None:
    """A finite float for int/float values (never bools), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def record_metrics(record: Mapping) -> dict[str, float]:
    """The measurements of a metrics.jsonl record as ``<stage>/<field>`` -> value: every finite number except the
    coordinates (step, total_steps, time); CIs (lists), flags and event names are left out."""
    prefix = record.get("stage") or "run"
    return {f"{prefix}/{k}": v for k, raw in record.items()
            if k not in NOT_METRICS and (v := finite_number(raw)) is not None}


def evaluation_metrics(metrics: Mapping) -> dict[str, float]:
    """``metrics.json`` of an evaluation as flat MLflow metrics: ``eval/<model>/<condition>/<metric>`` for every
    number of a cell (metric means, question counts, the abstention (decline) rate) and
    ``eval/<model>/image_reliance/<metric>`` for the true -> swapped drops."""
    out: dict[str, float] = {}
    for model, cells in (metrics.get("cells") or {}).items():
        for condition, cell in cells.items():
            for key, raw in cell.items():
                value = finite_number(raw)
                if key == "abstention_rate" and isinstance(raw, Mapping):
                    value = finite_number(raw.get("decline_rate"))
                if value is not None and key not in ("seed", "n_boot", "ci_level"):
                    out[f"eval/{model}/{condition}/{key}"] = value
    for model, per_metric in (metrics.get("image_reliance") or {}).items():
        for metric, res in per_metric.items():
            if (value := finite_number(res.get("drop"))) is not None:
                out[f"eval/{model}/image_reliance/{metric}"] = value
    return out


def tracking_uri(configured: str, default_dir: str | os.PathLike) -> str:
    """``configured`` (run.tracking_uri), else $MLFLOW_TRACKING_URI, else a sqlite store in ``default_dir`` (a local
    folder: SQLite cannot live in object storage); a relative sqlite path or plain folder is made absolute (workers
    and later sessions have other working dirs)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        default_dir = StoragePath(default_dir)
        if not default_dir.is_local:
            raise ValueError(f"run.tracking=mlflow: the runs are in object storage ({default_dir}), where no sqlite "
                             f"store can live; set run.tracking_uri or MLFLOW_TRACKING_URI (a tracking server)")
        return f"sqlite:///{(default_dir.local / 'mlflow.db').resolve()}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    if "://" not in uri:
        return Path(uri).resolve().as_uri()
    return uri


def _code_tags() -> dict[str, str]:
    git = git_info()
    tags = {"medvqa.source_sha256": source_hash()}
    if git["commit"]:
        tags.update({"mlflow.source.git.commit": git["commit"], "medvqa.git_dirty": str(git["dirty"])})
    return tags


# ------------------------------------------------------------------------------------------------ the store


_clients: dict[str, Any] = {}
_warned: set[str] = set()


def _client(uri: str):
    if uri not in _clients:
        from mlflow import MlflowClient

        _clients[uri] = MlflowClient(tracking_uri=uri)
    return _clients[uri]


def _safely(what: str, fn: Callable, *args, **kwargs) -> Any:
    """Call the tracking store; a failure is a warning (once per ``what``), never an error of the run."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 -- any store error (locked sqlite, unreachable server) is non-fatal
        if what not in _warned:
            _warned.add(what)
            log.warning("MLflow: %s failed (%s: %s); the run goes on without it", what, type(e).__name__, e)
        return None


def _experiment_id(client, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    # A sqlite store's default artifact root is ./mlruns of the *current* directory, which under `ray job submit` is a
    # temporary copy: keep artifacts beside the database instead.
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


def _find_run(client, stored: Mapping, uri: str, experiment_id: str, tag: str, value: str) -> str | None:
    """The MLflow run of this run directory: the stored id when it is in this store and not deleted, else the
    newest run of the experiment tagged ``tag=value``."""
    if stored.get("uri") == uri and stored.get("run_id"):
        run = _safely("get_run", client.get_run, stored["run_id"])
        if run is not None and run.info.lifecycle_stage == "active":
            return run.info.run_id
    found = client.search_runs([experiment_id], f"tags.`{tag}` = '{value}'", max_results=1,
                               order_by=["attributes.start_time DESC"])
    return found[0].info.run_id if found else None


def _open(session_path: StoragePath, uri: str, experiment: str | None, tag: str, name: str, params: Mapping[str, str],
          tags: Mapping[str, str], running: bool, experiment_id: str | None = None) -> dict:
    """Find or create the MLflow run of ``session_path``'s directory, log the params it lacks and the tags, write
    the session file; returns the session."""
    from mlflow.entities import Param, RunTag

    client = _client(uri)
    experiment_id = experiment_id or _experiment_id(client, experiment, uri)
    stored = read_json(session_path, default={})
    run_id = _find_run(client, stored, uri, experiment_id, tag, name)
    if run_id is None:
        run_id = client.create_run(experiment_id, run_name=name, tags={tag: name}).info.run_id
        log.info("MLflow: new run %s (%s) in %s", run_id, name, uri)
    else:
        log.info("MLflow: continuing run %s (%s) in %s", run_id, name, uri)
    have = client.get_run(run_id).data.params
    entries = [RunTag(k, v) for k, v in tags.items()] + [Param(k, v) for k, v in params.items() if k not in have]
    for i in range(0, len(entries), PARAMS_PER_CALL):
        chunk = entries[i:i + PARAMS_PER_CALL]
        client.log_batch(run_id, params=[e for e in chunk if isinstance(e, Param)],
                         tags=[e for e in chunk if isinstance(e, RunTag)])
    client.update_run(run_id, status="RUNNING" if running else "FINISHED")
    session = {"tracking": "mlflow", "uri": uri, "experiment_id": experiment_id, "run_id": run_id}
    write_json(session_path, session)
    return session


def _disable(session_path: StoragePath) -> None:
    """This session does not track: keep the stored ids (a later tracked session continues the same MLflow run) but
    tell the workers, which read the file, not to log."""
    stored = read_json(session_path, default={})
    if stored.get("tracking") == "mlflow":
        write_json(session_path, {**stored, "tracking": "none"})


# -------------------------------------------------------------------------------------------------- sessions


def read_session(folder: str | os.PathLike) -> dict | None:
    """The active tracking session of a run or sweep directory (``tracking.json`` with tracking=mlflow), else None."""
    path = StoragePath(folder) / SESSION_FILE
    try:
        session = read_json(path, default=None)
    except ValueError:
        return None
    return session if session and session.get("tracking") == "mlflow" else None


_cache: dict[str, tuple[int, dict | None]] = {}


def _cached_session(folder: StoragePath) -> dict | None:
    """``read_session`` cached by the file's mtime: ``log_record`` runs for every step record."""
    path = folder / SESSION_FILE
    try:
        mtime = path.mtime_ns()
    except OSError:
        return None
    if mtime is None:
        return None
    hit = _cache.get(str(path))
    if hit is None or hit[0] != mtime:
        hit = (mtime, read_session(folder))
        _cache[str(path)] = hit
    return hit[1]


def start_run(cfg, run_dir: str | os.PathLike, tags: Mapping[str, str] | None = None, parent: Mapping | None = None,
              running: bool = True) -> dict | None:
    """Open (or continue) the MLflow run of ``run_dir`` when ``cfg.run.tracking == "mlflow"``; returns the session
    (``uri``, ``experiment_id``, ``run_id``), which is also written to ``RUN_DIR/tracking.json`` for the workers.
    ``parent``: a sweep's session -- the run is logged in the sweep's store and experiment as its child.
    ``running=False`` leaves the run FINISHED (an evaluation logged on its own). With tracking off, the run
    directory's session is marked inactive and None is returned."""
    from medvqa.config import to_dict

    rd = StoragePath(run_dir)
    rd.mkdir()
    if cfg.run.tracking != "mlflow":
        _disable(rd / SESSION_FILE)
        return None
    uri = parent["uri"] if parent else tracking_uri(cfg.run.tracking_uri, rd.parent)
    all_tags = {**_code_tags(), "medvqa.run_dir": str(rd), "medvqa.adapters": str(rd / "adapters"),
                **(tags or {})}
    if parent:
        all_tags[PARENT_TAG] = parent["run_id"]
    return _open(rd / SESSION_FILE, uri, cfg.run.tracking_experiment, RUN_TAG, rd.name, flatten_params(to_dict(cfg)),
                 all_tags, running, experiment_id=parent["experiment_id"] if parent else None)


def start_sweep(space, sweep_dir: str | os.PathLike) -> dict | None:
    """The parent MLflow run of a sweep (``space``: a ``sweep.SweepSpace``; tracking follows its base config), with
    the search space as params; trials become its children (``start_run(..., parent=...)``)."""
    cfg = space.base_config()
    sdir = StoragePath(sweep_dir)
    if cfg.run.tracking != "mlflow":
        _disable(sdir / SESSION_FILE)
        return None
    uri = tracking_uri(cfg.run.tracking_uri, sdir)
    params = flatten_params({k: v for k, v in space.to_dict().items() if k != "output_dir"})
    return _open(sdir / SESSION_FILE, uri, cfg.run.tracking_experiment, SWEEP_TAG, sdir.name, params,
                 {**_code_tags(), "medvqa.sweep_dir": str(sdir)}, running=True)


def end_run(folder: str | os.PathLike, status: str = "FINISHED", upload: Mapping[str, str | os.PathLike] = ()) -> None:
    """Mark the tracked run of a run or sweep directory ``status`` (FINISHED, FAILED, KILLED), after uploading the
    folders in ``upload`` (artifact path -> folder or URI) that exist."""
    session = read_session(folder)
    if session is None:
        return
    for artifact_path, local in dict(upload).items():
        log_artifacts(folder, local, artifact_path)
    _safely("end run", _client(session["uri"]).set_terminated, session["run_id"], status)


def end_sweep(sweep_dir: str | os.PathLike, status: str, report_dir: str | os.PathLike,
              ended_without_error: Iterable[str | os.PathLike] = ()) -> None:
    """End a sweep's parent run after uploading its report, and give the trials that Tune stopped early (ASHA) the
    status KILLED: such a trial cannot end its own run -- Tune kills its actor (the run stays RUNNING) or its
    TorchTrainer fails as the actor goes (the trial marked it FAILED). ``ended_without_error``: the run directories of
    the trials Tune ended without an error; those not FINISHED were stopped."""
    session = read_session(sweep_dir)
    if session is None:
        return
    client = _client(session["uri"])
    stopped = {s["run_id"] for rd in ended_without_error if rd and (s := read_session(rd))}
    children = _safely("find trials", client.search_runs, [session["experiment_id"]],
                       f"tags.`{PARENT_TAG}` = '{session['run_id']}'") or []
    for run in children:
        if run.info.status == "RUNNING" or (run.info.run_id in stopped and run.info.status != "FINISHED"):
            _safely("end trial", client.set_terminated, run.info.run_id, "KILLED")
    end_run(sweep_dir, status, {"report": report_dir})


def log_metrics(session: Mapping, metrics: Mapping[str, float], step: int = 0, timestamp: float | None = None) -> None:
    from mlflow.entities import Metric

    ts = int((timestamp or time.time()) * 1000)
    batch = [Metric(k, v, ts, int(step)) for k, v in metrics.items()]
    client = _client(session["uri"])
    for i in range(0, len(batch), METRICS_PER_CALL):
        _safely("log metrics", client.log_batch, session["run_id"], metrics=batch[i:i + METRICS_PER_CALL])


def log_record(run_dir: str | os.PathLike, record: Mapping) -> None:
    """A metrics.jsonl record to the run's MLflow run, if this run is tracked (cheap when it is not)."""
    session = _cached_session(StoragePath(run_dir))
    if session is None:
        return
    metrics = record_metrics(record)
    if metrics:
        log_metrics(session, metrics, step=int(record.get("step") or 0), timestamp=record.get("time"))


def log_evaluation(cfg, run_dir: str | os.PathLike, metrics: Mapping) -> None:
    """An evaluation's per-cell metrics to the run's MLflow run (opened, FINISHED, if no session is active: an
    evaluation run on its own after training)."""
    if cfg.run.tracking != "mlflow":
        return
    session = read_session(run_dir) or _safely("open run", start_run, cfg, run_dir, running=False)
    if session:
        log_metrics(session, evaluation_metrics(metrics))


def log_artifacts(folder: str | os.PathLike, local_dir: str | os.PathLike, artifact_path: str) -> None:
    """Upload ``local_dir`` (e.g. the report; a folder or URI) to the tracked run of a run or sweep directory, if it is
    tracked."""
    session = read_session(folder)
    if session is not None and StoragePath(local_dir).is_dir():
        _safely(f"upload {artifact_path}", lambda: _client(session["uri"]).log_artifacts(
            session["run_id"], str(local_copy(local_dir)), artifact_path))
