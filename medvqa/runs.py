"""Run identity, the run-directory layout, and the small files every run writes.

A run id is ``<run.name>-<12 hex of sha256(canonical config)>``: a hash of the resolved config (seeds included),
never a timestamp, so re-submitting the same command (after a crash, a preemption, a ``ray job stop``) finds the same
run directory and resumes from its checkpoints.

Fields left out of the hash (``ID_EXCLUDED``) are the ones that cannot change the trained weights or the scores:

- ``run.output_dir``: where the run lives, not what it is; a run moved to another disk keeps its id.
- ``run.evaluate``: whether the evaluation matrix follows training; a training run re-submitted with ``evaluate=true``
  must find its finished adapters instead of training again.
- ``run.log_every_n_steps``, ``run.checkpoint_every_n_steps``, ``run.max_failures``: logging, checkpoint cadence and
  fault tolerance; resuming is exact (optimizer, scheduler, data position and random state are checkpointed), so they
  only decide how much work a failure costs.
- ``stage1.grad_accum``, ``stage2.grad_accum``: implied by ``global_batch_size``, ``batch_size`` and ``num_workers``
  (config validation refuses a value that disagrees), so stating it or leaving it ``null`` is the same run.
- ``run.tracking*``, ``run.verbose``: where the numbers are also sent (MLflow) and what the terminal shows.
- ``model.cache_dir``: where the tiny model is built and cached (the tiny model is a function of ``model.seed``,
  which is hashed).
- ``resources.cpus_per_worker``, ``resources.data_cpus_per_task``, ``resources.data_concurrency``,
  ``resources.num_cpus``, ``resources.gpus_per_worker``, ``resources.worker_resource``: scheduling only (a worker on
  a quarter of a GPU computes what it computes on a whole one; which node it runs on changes nothing).
- ``eval``: evaluation settings cannot change the trained weights; the predictions are keyed by what produced them
  (``medvqa.predictions``), not by the run id.

Deliberately *kept* in the hash although they live under ``resources``: ``num_workers`` and ``use_gpu``. The global
batch does not change with the worker count (``global_batch_size`` is the experiment), but how it is computed does:
each worker trains on its own part of every epoch's order, so the micro-batches hold different records (their loss is
a per-micro-batch mean), an epoch drops its last ``records % num_workers`` records, and a checkpoint's data position
counts one worker's records; ``use_gpu`` means bf16 compute on CUDA, fp32 on CPU. Changing either is a different
(if statistically equivalent) run, whose checkpoints would not line up.

Caveat: adding a field to ``Config`` changes every run id (the canonical dict gains a key); old run directories stay
readable (``from_dict`` fills defaults) but a re-submission starts a new run.

Layout (``RunDir``)::

    <output_dir>/<run_id>/    (output_dir: a folder or a URI, s3://bucket/runs (medvqa.storage); a relative one is
                              taken relative to $MEDVQA_RUNS_BASE when set, else the cwd)
      config.yaml          resolved config (re-written on resume; only hashed fields must match)
      environment.json     python, platform, package versions, code version (git / source hash), CUDA if known;
                           ``workers``: per stage, each Train worker's host, GPU, capability and CUDA version
      metrics.jsonl        one JSON object per line, each with a wall-clock ``time`` (seconds since the epoch);
      metrics/             in object storage (no append) the same records as parts, one writer each
      manifest.json        run-level manifest (stage data manifests live in data/<stage>/manifest.json)
      stages.json          per-stage summaries written by the training driver
      data/<stage>/        prepared, validated records (parquet) + manifest.json
      rejects/<stage>/     rejected records (part-*.jsonl, no image bytes)
      checkpoints/<stage>/ Ray Train storage of the stage (step_* checkpoints)
      adapters/<stage>/    the finished stage's LoRA adapter
      eval/                the evaluation matrix: metrics.json, predictions/ (layout: ``medvqa.predictions``)
      report/              report.md/.html, plots/, human_eval.csv
      logs/<command>.log   everything a calm console keeps off the terminal (Ray output, worker logs, tracebacks)
      tracking.json        MLflow tracking URI and run id of this run (when run.tracking=mlflow)

Every path of a run directory, and every read or write of its config and JSON files, goes through ``RunDir``, on
whatever storage the run lives (``medvqa.storage``). This module imports neither torch nor ray.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from medvqa.config import Config, ConfigError, dump_yaml, from_dict, to_dict
from medvqa.storage import StoragePath, is_uri

log = logging.getLogger(__name__)

ID_EXCLUDED: tuple[str, ...] = (
    "run.output_dir",
    "run.evaluate",
    "run.log_every_n_steps",
    "run.checkpoint_every_n_steps",
    "run.max_failures",
    "run.tracking",
    "run.tracking_uri",
    "run.tracking_experiment",
    "run.tracking_adapters",
    "run.verbose",
    "stage1.grad_accum",
    "stage2.grad_accum",
    "model.cache_dir",
    "resources.cpus_per_worker",
    "resources.data_cpus_per_task",
    "resources.data_concurrency",
    "resources.num_cpus",
    "resources.worker_resource",
    "eval",
    "resources.gpus_per_worker",
)
"""Dotted config keys that do not enter the run id (see the module docstring for why)."""

PACKAGES = ("ray", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "pyarrow", "optuna",
            "pandas", "numpy")
"""Distributions whose versions go into environment.json (read from metadata, never imported)."""

_HASH_CHARS = 12
_MISSING = object()
_PACKAGE_DIR = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------------------------ identity


def _without(data: dict, keys: tuple[str, ...]) -> dict:
    data = json.loads(json.dumps(data))  # deep copy
    for key in keys:
        *parents, leaf = key.split(".")
        node = data
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    return data


def canonical_config(cfg: Config) -> dict:
    """The part of the resolved config that defines the run: ``to_dict(cfg)`` without ``ID_EXCLUDED``."""
    return _without(to_dict(cfg), ID_EXCLUDED)


def config_hash(cfg: Config) -> str:
    text = json.dumps(canonical_config(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:_HASH_CHARS]


def run_id(cfg: Config) -> str:
    """``<run.name>-<hash>``, deterministic from the config and its seeds (no timestamps)."""
    return f"{cfg.run.name}-{config_hash(cfg)}"


# ------------------------------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class RunDir:
    """One run directory, local or in object storage (``medvqa.storage``): its paths, and reading and writing its
    config and JSON files. ``path`` and every path below are ``StoragePath``s; ``RunDir(x)`` takes a local path, a
    URI or a ``StoragePath``. For a local run ``os.fspath(rd)``, ``Path(rd)`` work; ``rd / "x"`` works for both."""

    path: StoragePath

    def __post_init__(self):
        object.__setattr__(self, "path", StoragePath(self.path))

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __truediv__(self, other: str | os.PathLike) -> StoragePath:
        return self.path / other

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config(self) -> StoragePath:
        return self.path / "config.yaml"

    @property
    def metrics(self) -> StoragePath:
        """``metrics.jsonl`` of a local run; in object storage the records are parts under ``metrics_parts``."""
        return self.path / "metrics.jsonl"

    @property
    def metrics_parts(self) -> StoragePath:
        """``metrics/``: metrics.jsonl as JSON-lines parts, one writer each (object storage has no append)."""
        return self.path / METRICS_PARTS

    @property
    def manifest(self) -> StoragePath:
        return self.path / "manifest.json"

    @property
    def environment(self) -> StoragePath:
        return self.path / "environment.json"

    @property
    def stages_summary(self) -> StoragePath:
        return self.path / "stages.json"

    @property
    def eval(self) -> StoragePath:
        """The evaluation matrix's folder (``evaluate.run_matrix``'s ``out_dir``)."""
        return self.path / "eval"

    @property
    def eval_metrics(self) -> StoragePath:
        return self.eval / "metrics.json"

    def eval_rejects(self, source: str) -> Path:
        """The evaluation's rejected records of one source ('test', 'ood', 'medhalt'), one JSON line each with its
        reason (as ``rejects/<stage>.jsonl`` for training)."""
        return self.eval / "rejects" / f"{source}.jsonl"

    @property
    def report(self) -> StoragePath:
        return self.path / "report"

    @property
    def human_eval(self) -> StoragePath:
        """Clinician scores merged by ``medvqa human-merge``."""
        return self.report / "human_eval.csv"

    @property
    def logs(self) -> StoragePath:
        """Per-command logs (``train.log``): everything the calm console keeps off the terminal (medvqa.console)."""
        return self.path / "logs"

    def checkpoints(self, stage: str | None = None) -> StoragePath:
        """``checkpoints/`` (Ray Train ``storage_path``) or ``checkpoints/<stage>/`` (its run ``name``)."""
        return self.path / "checkpoints" / stage if stage else self.path / "checkpoints"

    def adapters(self, stage: str | None = None) -> StoragePath:
        """``adapters/`` or ``adapters/<stage>/``."""
        return self.path / "adapters" / stage if stage else self.path / "adapters"

    adapter = adapters  # singular alias

    def data(self, stage: str) -> StoragePath:
        return self.path / "data" / stage

    def rejects(self, stage: str) -> StoragePath:
        """A folder of ``part-*.jsonl`` files (one per validation batch, so a retried Ray task overwrites its own)."""
        return self.path / "rejects" / stage

    def subdirs(self) -> list[StoragePath]:
        return [self.path / d for d in ("checkpoints", "adapters", "data", "rejects")]

    def read_config(self, overrides: Sequence[str] = ()) -> Config:
        """The run's resolved config, with dotted ``key=value`` overrides merged in."""
        if not self.config.exists():
            raise FileNotFoundError(f"{self.config}: not a run directory (no config.yaml)")
        return from_dict(yaml.safe_load(self.config.read_text()) or {}, overrides)

    def write_config(self, cfg: Config) -> None:
        self.config.write_text(dump_yaml(cfg))

    def read_json(self, path: StoragePath, default: Any = _MISSING) -> Any:
        """A JSON file of this run (``path``: one of its paths); ``default`` (if given) when it does not exist."""
        return read_json(path, default)

    def write_json(self, path: StoragePath, obj: Any) -> None:
        write_json(path, obj)


RUNS_BASE_ENV = "MEDVQA_RUNS_BASE"
"""Base for a relative ``run.output_dir`` (default: the current directory): a folder or a URI
(``s3://bucket``). cluster/start_local.sh sets it to the checkout, so a job submitted with ``--working-dir .`` writes
``runs/`` into the checkout rather than into Ray's temporary copy of it; on a real cluster set it (runtime_env
env_vars) to shared persistent storage, e.g. ``s3://medvqa-bucket``."""


def output_root(output_dir: str) -> StoragePath:
    """An output folder (``run.output_dir``, a sweep's ``output_dir``) as an absolute location: a URI as it is; a
    relative path below ``$MEDVQA_RUNS_BASE`` (a folder or a URI) when set, else below the current directory."""
    if is_uri(output_dir):
        return StoragePath(output_dir)
    out = Path(output_dir).expanduser()
    base = os.environ.get(RUNS_BASE_ENV)
    if not out.is_absolute() and base:
        if is_uri(base):
            return StoragePath(base) / out.as_posix()
        out = Path(base).expanduser() / out
    return StoragePath(out.resolve())


def run_dir_for(cfg: Config) -> RunDir:
    """Where ``cfg``'s run lives (nothing is created): ``output_root(run.output_dir) / run_id``."""
    return RunDir(output_root(cfg.run.output_dir) / run_id(cfg))


def _warn_if_ephemeral(path: StoragePath) -> None:
    # Under `ray job submit --working-dir`, the driver's cwd is Ray's unpacked copy of the working dir inside the Ray
    # temp dir (…/runtime_resources/working_dir_files/_ray_pkg_<hash>/): a relative output_dir lands there and is
    # deleted with the session.
    if "runtime_resources" in path.parts or "working_dir_files" in path.parts:
        log.warning("run dir %s is inside Ray's runtime-env working dir and will be deleted with the Ray session; "
                    "set run.output_dir to an absolute path on persistent storage (or %s)", path, RUNS_BASE_ENV)


def prepare_run_dir(cfg: Config) -> RunDir:
    """Create (or reopen, to resume) the run directory of ``cfg``; write config.yaml and environment.json.

    Refuses (``ConfigError``) when the directory already holds a config.yaml whose hashed part differs from ``cfg``
    (only possible if someone edited it). Non-hashed fields (output_dir, logging, cadence, CPU resources) may differ
    on resume; config.yaml is then rewritten with the current values.
    """
    rd = run_dir_for(cfg)
    _warn_if_ephemeral(rd.path)
    for d in rd.subdirs():
        d.mkdir()  # local folders; object storage has none (a prefix exists once an object lies under it)

    if rd.config.exists():
        try:
            old_canonical = canonical_config(rd.read_config())
        except (yaml.YAMLError, ConfigError, TypeError) as e:
            raise ConfigError(f"{rd.config} exists but cannot be read as a config ({e}); move the run directory "
                              f"away or restore its config.yaml") from e
        new_canonical = canonical_config(cfg)
        if old_canonical != new_canonical:
            diff = sorted(_diff_keys(old_canonical, new_canonical))
            raise ConfigError(f"{rd.config} differs from this run's config in {', '.join(diff)} although the run id "
                              f"{rd.name} is the same (was config.yaml edited?). Move {rd.path} away or restore "
                              f"its config.yaml.")
        log.info("resuming run %s", rd.path)
    rd.write_config(cfg)
    _write_environment(rd)
    return rd


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


# -------------------------------------------------------------------------------------------------- environment


def _git(*args: str) -> str | None:
    try:
        # --no-optional-locks: `git status` must not rewrite the index (another process may hold the lock).
        out = subprocess.run(["git", "--no-optional-locks", *args], cwd=_PACKAGE_DIR, capture_output=True, text=True,
                             timeout=15, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_info() -> dict:
    """Commit and dirty flag of the git checkout holding this package; ``None`` values outside a checkout (e.g. a
    ``ray job submit --working-dir`` copy, which excludes .git)."""
    top = _git("rev-parse", "--show-toplevel")
    # The package must sit at the top of that checkout: a copy of it nested in some other repository (e.g. Ray's
    # working_dir copy inside a temp dir under the checkout) would otherwise report that repository's commit.
    if top is None or Path(top.strip()).resolve() != _PACKAGE_DIR.parent:
        return {"commit": None, "dirty": None}
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = _git("status", "--porcelain")
    return {"commit": commit.strip(), "dirty": None if status is None else bool(status.strip())}


def source_hash() -> str:
    """sha256 of the package's source files (``medvqa/**/*.py`` and presets): identifies the code even where git is
    not available, e.g. in a Ray working_dir upload."""
    h = hashlib.sha256()
    for f in sorted(_PACKAGE_DIR.rglob("*")):
        if f.suffix in (".py", ".yaml") and "__pycache__" not in f.parts:
            h.update(f.relative_to(_PACKAGE_DIR).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def package_versions() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def environment() -> dict:
    """What produced the numbers: interpreter, platform, package versions, code version, CUDA (only when torch is
    already imported; this never imports torch)."""
    env: dict[str, Any] = {
        "time": time.time(),
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "hostname": platform.node(),
        "packages": package_versions(),
        "git": git_info(),
        "source_sha256": source_hash(),
        "argv": list(sys.argv),
        "ray_job_submission_id": _ray_job_submission_id(),
    }
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "cuda"):
        env["cuda"] = {"available": torch.cuda.is_available(), "version": torch.version.cuda,
                       "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
    else:
        env["cuda"] = None  # not checked: torch was not imported by this process
    return env


def worker_facts(device, rank: int = 0) -> dict:
    """What one Train worker ran on, for environment.json's ``workers``: host, Ray node id, rank, device, torch and the
    CUDA it was built for, and on a CUDA ``device`` the GPU's name, compute capability, memory and the driver-visible GPUs. Reads
    torch from ``sys.modules`` (a worker has imported it)."""
    torch = sys.modules["torch"]
    facts: dict[str, Any] = {"hostname": platform.node(), "rank": rank, "device": str(device),
                             "torch": torch.__version__, "cuda": torch.version.cuda}
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        facts["node_id"] = ray.get_runtime_context().get_node_id()
    if str(device).startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        facts.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                     memory_gib=round(props.total_memory / 2**30, 1),
                     cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))
    return facts


def record_workers(run_dir: RunDir, stage: str, workers: list[dict]) -> None:
    """Put a stage's ``worker_facts`` (one per rank) into environment.json under ``workers.<stage>``. Called by rank
    0 only, while the driver waits for the stage, so the file has one writer."""
    env = read_json(run_dir.environment, {})
    env.setdefault("workers", {})[stage] = workers
    write_json(run_dir.environment, env)


def _ray_job_submission_id() -> str | None:
    """The ``ray job submit`` id (``raysubmit_…``) when this process is a submitted job's driver: Ray passes it in the
    job config's metadata (``RAY_JOB_CONFIG_JSON_ENV_VAR``); there is no plain env var for it."""
    try:
        meta = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("metadata") or {}
    except (ValueError, AttributeError):
        return None
    return meta.get("job_submission_id")


_VOLATILE = ("time", "argv", "hostname", "ray_job_submission_id", "run_dir", "previous", "workers")


def _write_environment(rd: RunDir) -> None:
    """Write environment.json; when resuming under a different environment (code, packages, machine), keep the
    earlier ones under ``previous`` so every number can be traced to the code that produced it."""
    env = environment()
    env["run_dir"] = str(rd.path)
    if rd.environment.exists():
        try:
            old = read_json(rd.environment)
        except (OSError, ValueError):
            old = {}
        previous = old.pop("previous", [])
        if _without(old, _VOLATILE) != _without(env, _VOLATILE) and old:
            previous.append(old)
        if previous:
            env["previous"] = previous
        if old.get("workers"):
            env["workers"] = old["workers"]  # finished stages' workers; a resumed stage's workers replace theirs
    write_json(rd.environment, env)


# ------------------------------------------------------------------------------------------------------- files


METRICS_PARTS = "metrics"
"""metrics.jsonl in object storage: a folder of JSON-lines parts (see ``append_metrics``)."""
_PART_BYTES = 256 * 2**10  # a part is rewritten whole on every append: roll over to a new one past this size
_parts_lock = threading.Lock()
_parts: dict[tuple[str, int], list] = {}  # (metrics folder, pid) -> [part name, its lines, their bytes]


def append_metrics(run_dir: RunDir | str | os.PathLike, record: dict) -> None:
    """Append one JSON line to ``metrics.jsonl`` with a wall-clock ``time`` (unless the record has one). The training
    loop and driver write through ``medvqa.observe.record``, which also passes the record on (MLflow, Ray metrics,
    progress bars).

    Local: one ``write`` on an ``O_APPEND`` descriptor, so lines from the driver and a Train worker do not interleave.
    Object storage has no append: each process writes its own part objects ``metrics/<ns>-<host>-<pid>-<id>.jsonl``,
    re-uploading its current part whole on every record (one PUT, atomic) and starting a new part past 256 KiB. A
    record is stored once the call returns, as with the local file; no two processes write the same object, so no
    write is lost; ``read_metrics`` merges the parts by ``time``."""
    rd = RunDir(run_dir)
    line = json.dumps({**record, "time": record.get("time", time.time())}, default=str) + "\n"
    if rd.path.is_local:
        fd = os.open(rd.metrics.local, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)  # unbuffered: the line is in the file once write returns
        return
    folder = rd.metrics_parts
    with _parts_lock:
        key = (folder.uri, os.getpid())
        part = _parts.get(key)
        if part is None or (part[2] + len(line) > _PART_BYTES and part[1]):
            name = f"{time.time_ns():020d}-{platform.node()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
            part = _parts[key] = [name, [], 0]
        part[1].append(line)
        part[2] += len(line)
        (folder / part[0]).write_text("".join(part[1]))


def read_metrics(run_dir: RunDir | str | os.PathLike, superseded: bool = False) -> list[dict]:
    """The records of ``metrics.jsonl`` in order ([] when there is none): what every reader of training metrics
    (curves, reports, sweep scores) goes through. A torn last line (a crash mid-write) is skipped with a warning. In
    object storage (parts under ``metrics/``, also read when a run directory was copied to disk) the records of all
    parts are merged in ``time`` order: across nodes that order is as good as their clocks (NTP keeps them within
    milliseconds; a resumed worker starts seconds after its predecessor died).

    Rows superseded by a resume are left out unless ``superseded``: each start of a stage's training writes
    ``{"event": "train_start", "stage": S, "step": k}`` (k: the restored checkpoint's step, 0 for a fresh start), and
    the steps after k were trained again, so earlier rows of stage S with a step past k (losses, validation rounds,
    checkpoints of the interrupted attempt) are dropped. The file itself stays append-only -- the full history of
    attempts, faults and resumes is kept, and no reader races a writer -- and every step appears once here."""
    rd = RunDir(run_dir)
    rows = read_jsonl(rd.metrics)
    part_files = rd.metrics_parts.glob("*.jsonl")
    if part_files:
        rows += [r for f in part_files for r in read_jsonl(f)]
        rows.sort(key=lambda r: r.get("time") or 0)  # stable: a part's own order is kept
    records: list[dict] = []
    for record in rows:
        if record.get("event") == "train_start" and not superseded:
            stage, step = record.get("stage"), record.get("step", 0)
            records = [r for r in records if r.get("stage") != stage or r.get("step", -1) <= step]
        records.append(record)
    return records


def read_jsonl(path: str | os.PathLike | StoragePath) -> list[dict]:
    """The records of a JSON-lines file in order ([] when there is none); a line that is not JSON (torn by a crash
    mid-write) is skipped with a warning."""
    path = StoragePath(path)
    if not path.is_file():
        return []
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s:%d: skipping a line that is not JSON", path, n)
            continue
        records.append(record)
    return records


def write_json(path: str | os.PathLike | StoragePath, obj: Any) -> None:
    """Write ``obj`` as JSON atomically (a temp file renamed in place locally, one PUT in object storage): a reader
    never sees half a file."""
    StoragePath(path).write_text(json.dumps(obj, indent=2, default=str) + "\n")


def read_json(path: str | os.PathLike | StoragePath, default: Any = _MISSING) -> Any:
    """Parsed JSON at ``path``; ``default`` (if given) when the file does not exist."""
    path = StoragePath(path)
    if default is not _MISSING and not path.exists():
        return default
    return json.loads(path.read_text())
