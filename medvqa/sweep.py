"""Ray Tune + Optuna sweeps (the study's Figure 3, reproducible): search spaces as YAML, one two-stage run per trial.

A search space (``tune/<preset>.yaml``, loaded by ``load_space``) names a base preset, overrides applied to every
trial (e.g. the validation carve), the parameters to sample (dotted config keys: ``stage1.data.limit``, ``lora.r``,
``stage2.lr``), replicate seeds, the metric and the early-stopping rule. ``run_sweep``:

- builds ``Tuner(trial_fn)`` (the current Ray API; ``Tuner(trainer)`` fails under Train V2, GUIDE §5) where each trial
  is ``medvqa.train.run_two_stage`` with its own ``TorchTrainer`` per stage, in its own run directory
  ``<sweep_dir>/runs/trial-<trial_id>-<hash>``;
- samples with ``OptunaSearch`` (seeded TPE) whose study is persisted to ``<sweep_dir>/optuna.db`` (open it with
  ``optuna-dashboard sqlite:///<sweep_dir>/optuna.db``), under a ``ConcurrencyLimiter`` derived from the cluster's
  GPUs (or CPUs on a CPU-only cluster). A sweep directory in object storage (``output_dir=s3://…``) cannot hold a
  SQLite file: there the study lives in memory and is checkpointed with the searcher's state by Tune into
  ``<sweep_dir>/tune/`` (as every searcher is), and ``Tuner.restore`` brings it back, from any machine;
- stops poor trials with ASHA on the stage-2 validation metric, reported once per validation round (``val_round``,
  by default every stage-2 epoch) on a validation split carved from the training split
  (``stage2.data.validation_fraction``): never the test split;
- restores: re-running the same command finds ``<sweep_dir>/tune`` and continues it with ``Tuner.restore``; finished
  trials are not repeated, an interrupted trial resumes from its run directory's checkpoints (finished stages are
  skipped), and the Optuna state is restored with the searcher (and is in optuna.db either way).

Replicate seeds (``replicates: {run.seed: [0, 1]}``) are replicates, not a dimension of the search: a trial is one
sampled configuration, and it trains every replicate (every combination of the replicate values) at once, each a
two-stage run in its own run directory. The trial reports to Tune, once per validation round, the mean over its
replicates at that round (``run_replicates``, reading the runs' metrics.jsonl): Optuna sees one objective per
configuration, ASHA compares configurations at equal rounds and stops all replicates of a configuration together,
and a restored trial resumes every replicate from its run directory. Trials run ``max_concurrent`` at a time, each
taking its replicates' resources (the default concurrency divides by them). The report shows each configuration's
mean and per-replicate values and pools replicates into the cells' bands (``medvqa.sweep_report``).

``medvqa.sweep_report`` reads the sweep directory (no Ray needed) and writes the report and the best preset.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medvqa.config import ConfigError, load_config, named_yaml
from medvqa.runs import output_root, read_json, run_dir_for, write_json
from medvqa.storage import StoragePath
from medvqa.sweep_report import TRIAL_LINK, validation_rounds, write_report

log = logging.getLogger("medvqa.sweep")

SPACES_DIR = Path(__file__).resolve().parent.parent / "tune"
PARAM_KINDS = ("values", "loguniform", "uniform", "int")
TIME_ATTR = "val_round"  # ASHA's clock: validation rounds of stage 2 (one per epoch by default)


@dataclass
class SweepSpace:
    """A search space and how to search it (one YAML file under ``tune/``)."""

    name: str
    preset: str = "tiny"
    overrides: list = field(default_factory=list)  # dotted config overrides applied to every trial
    params: dict = field(default_factory=dict)  # key -> {values: [...]} | {loguniform: [lo, hi]} | ...
    replicates: dict = field(default_factory=dict)  # key -> [values] aggregated over in the report (seeds)
    metric: str = "val_normalized_f1"
    mode: str = "max"
    num_samples: int = 8
    max_concurrent: int | None = None  # None: from the cluster's GPUs (or CPUs) and the trial's resources
    seed: int = 0  # TPE sampler seed
    tpe_startup_trials: int = 4  # random trials before TPE models the space (Optuna's default is 10)
    asha: dict | None = field(default_factory=lambda: {"grace_period": 1, "reduction_factor": 2})
    report: dict = field(default_factory=lambda: {"x": "stage1.data.limit", "line": "lora.r"})
    output_dir: str = "sweeps"  # a folder or URI (s3://…); relative: under $MEDVQA_RUNS_BASE when set, else the cwd

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def base_config(self):
        """The base preset with the space's overrides: what every trial shares before its sampled parameters."""
        return load_config(self.preset, list(self.overrides))


def space_path(preset_or_path: str) -> Path:
    return named_yaml(preset_or_path, SPACES_DIR, "no search space")


def load_space(preset_or_path: str = "tiny", changes: dict | None = None, overrides: list[str] = ()) -> SweepSpace:
    """A search space from ``tune/<name>.yaml`` (or a path), with top-level ``changes`` (e.g. num_samples) and config
    ``overrides`` appended to the space's, checked: unknown keys, malformed parameter specs and parameter keys the
    config does not have are errors naming them."""
    path = space_path(preset_or_path)
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a search space must be a mapping")
    data = {**data, **(changes or {})}
    if overrides:
        data["overrides"] = list(data.get("overrides") or []) + list(overrides)
    known = {f.name for f in dataclasses.fields(SweepSpace)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown} (known: {', '.join(sorted(known))})")
    data.setdefault("name", path.stem)
    space = SweepSpace(**data)
    validate_space(space, str(path))
    return space


def _check_param(key: str, spec: Any, where: str) -> None:
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in PARAM_KINDS:
        raise ConfigError(f"{where}: params.{key} must be one of {{values: [...]}}, {{loguniform: [lo, hi]}}, "
                          f"{{uniform: [lo, hi]}}, {{int: [lo, hi]}}; got {spec!r}")
    kind, arg = next(iter(spec.items()))
    if kind == "values":
        if not isinstance(arg, list) or not arg:
            raise ConfigError(f"{where}: params.{key}.values must be a non-empty list")
    elif not (isinstance(arg, list) and len(arg) == 2 and all(isinstance(v, (int, float)) for v in arg)
              and arg[0] < arg[1] and (kind != "loguniform" or arg[0] > 0)):
        raise ConfigError(f"{where}: params.{key}.{kind} must be [lo, hi] with lo < hi (lo > 0 for loguniform)")


def _example_value(spec: dict) -> Any:
    (arg,) = spec.values()
    return arg[0]


def validate_space(space: SweepSpace, where: str = "search space") -> None:
    if space.mode not in ("max", "min"):
        raise ConfigError(f"{where}: mode must be 'max' or 'min'")
    from medvqa.metrics import VALIDATION_METRICS

    if space.metric.removeprefix("val_") not in VALIDATION_METRICS or not space.metric.startswith("val_"):
        raise ConfigError(f"{where}: metric {space.metric!r}: trials are scored on the carved validation split, so "
                          f"the metric must be one of {['val_' + m for m in VALIDATION_METRICS]}")
    if space.num_samples < 1 or (space.max_concurrent is not None and space.max_concurrent < 1):
        raise ConfigError(f"{where}: num_samples and max_concurrent must be >= 1")
    if not space.params:
        raise ConfigError(f"{where}: params is empty: nothing to search")
    for key, spec in space.params.items():
        _check_param(key, spec, where)
    for key, values in space.replicates.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: replicates.{key} must be a non-empty list")
    overlap = set(space.params) & set(space.replicates)
    if overlap:
        raise ConfigError(f"{where}: {sorted(overlap)} both a parameter and a replicate")
    # Every key must exist in the config, with values of the right type: build one trial's config, then one per
    # further categorical value.
    example = {k: _example_value(s) for k, s in space.params.items()}
    example.update({k: v[0] for k, v in space.replicates.items()})
    cfg = trial_config(space, example)
    choices = {k: s["values"] for k, s in space.params.items() if "values" in s} | space.replicates
    for key, values in choices.items():
        for value in values[1:]:
            trial_config(space, {**example, key: value})
    if not cfg.stage2.enabled or cfg.stage2.data.validation_fraction <= 0:
        raise ConfigError(f"{where}: trials need stage2.data.validation_fraction > 0 (set it in overrides): the "
                          "sweep scores trials on a validation split carved from stage-2 training data")
    if space.asha is not None:
        unknown = set(space.asha) - {"grace_period", "reduction_factor", "max_t"}
        if unknown:
            raise ConfigError(f"{where}: asha: unknown key(s) {sorted(unknown)}")
        if cfg.stage2.validate_every_n_steps is not None and "max_t" not in space.asha:
            raise ConfigError(f"{where}: with stage2.validate_every_n_steps set, give asha.max_t (validation rounds "
                              "in a full trial)")
    for role in ("x", "line"):
        key = space.report.get(role)
        if key is not None and key not in space.params:
            raise ConfigError(f"{where}: report.{role}={key!r} is not a searched parameter")


def trial_config(space: SweepSpace, params: dict, trial_name: str = "trial", output_dir: str | None = None):
    """The Config of one trial: base preset -> space overrides -> sampled parameters -> run name/location."""
    sampled = [f"{k}={json.dumps(v)}" for k, v in params.items()]
    extra = [f"run.name={trial_name}", "run.evaluate=false"]
    if output_dir:
        extra.append(f"run.output_dir={output_dir}")
    return load_config(space.preset, list(space.overrides) + sampled + extra)


def asha_max_t(space: SweepSpace) -> int:
    """Validation rounds in a full trial: one per stage-2 epoch unless ``asha.max_t`` says otherwise."""
    if space.asha and "max_t" in space.asha:
        return int(space.asha["max_t"])
    return max(1, math.ceil(space.base_config().stage2.epochs))


def space_hash(space: SweepSpace) -> str:
    """Sweep identity: the search space minus what only controls scale-out (num_samples and max_concurrent may change
    when a sweep is extended or moved to a bigger cluster)."""
    data = {k: v for k, v in space.to_dict().items() if k not in ("num_samples", "max_concurrent", "output_dir")}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def sweep_dir_for(space: SweepSpace) -> StoragePath:
    return output_root(space.output_dir) / f"{space.name}-{space_hash(space)}"


def replicate_points(space: SweepSpace) -> list[dict]:
    """Every combination of the replicate values (``[{}]`` without replicates), in the order written: the runs of
    one trial."""
    import itertools

    keys = list(space.replicates)
    return [dict(zip(keys, values)) for values in itertools.product(*(space.replicates[k] for k in keys))]


def replicate_label(point: dict) -> str:
    """'run.seed=0' (keys joined with ','): a replicate's name in links, reports and run names."""
    return ",".join(f"{k}={v}" for k, v in point.items())


def tune_param_space(space: SweepSpace) -> dict:
    """Tune domains of the searched parameters (replicates are not searched: every trial runs all of them)."""
    from ray import tune

    def domain(spec: dict):
        kind, arg = next(iter(spec.items()))
        if kind == "values":
            return tune.choice(arg)
        if kind == "loguniform":
            return tune.loguniform(*arg)
        if kind == "uniform":
            return tune.uniform(*arg)
        return tune.randint(int(arg[0]), int(arg[1]) + 1)  # inclusive upper bound, as written

    return {k: domain(s) for k, s in space.params.items()}


LAUNCHER_CONFIG = "~/ray_bootstrap_config.yaml"  # `ray up` writes the cluster config here on the head node


def launcher_max_resources(config: dict) -> dict:
    """The most of each resource a cluster-launcher config lets the cluster have: the head node's, plus, per resource,
    the worker node types richest in it, each up to its ``max_workers``, all together up to the cluster's
    ``max_workers`` (Ray's defaults: a type's ``max_workers`` is the cluster's, the head type's is 0)."""
    types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    budget = config.get("max_workers", 0)
    total = dict(types.get(head, {}).get("resources") or {})
    workers = [(t.get("resources") or {}, t.get("max_workers", 0 if name == head else budget))
               for name, t in types.items()]
    for key in {k for res, _ in workers for k in res}:
        left = budget
        for res, count in sorted(workers, key=lambda w: -w[0].get(key, 0)):
            take = min(count, left)
            total[key] = total.get(key, 0) + take * res.get(key, 0)
            left -= take
    return total


def cluster_max_resources(launcher_config: str | os.PathLike = LAUNCHER_CONFIG) -> dict | None:
    """The most resources the connected cluster can scale to, or None where Ray does not tell.

    Sources, in order: the cluster config an autoscaler publishes in the GCS (what Ray Train V2 and Ray Data read;
    Ray 2.60's own autoscalers do not publish it yet), then the cluster launcher's config on the head node, where
    `ray job submit` drivers run (``ray up`` writes it; Tune reads the same file). KubeRay's autoscaler publishes
    neither, so on KubeRay the sweep needs ``max_concurrent``."""
    try:
        from ray._private.state import state

        published = state.get_max_resources_from_cluster_config()
    except Exception as e:  # a private API: gone or changed in another Ray version -> the next source
        log.debug("no cluster config from the GCS: %s", e)
        published = None
    if published:
        log.info("cluster maximum (autoscaler config in the GCS): %s", published)
        return published
    path = Path(launcher_config).expanduser()
    if path.is_file():
        maximum = launcher_max_resources(yaml.safe_load(path.read_text()) or {})
        log.info("cluster maximum (cluster launcher config %s): %s", path, maximum)
        return maximum
    return None


def max_concurrent_trials(space: SweepSpace, present: dict, maximum: dict | None = None) -> int:
    """Trials that run at once: ``max_concurrent`` when given; else (at most ``num_samples``) the GPUs over the GPUs a
    trial's workers take (``num_workers * gpus_per_worker``: 4 trials per GPU at 0.25; a GPU run), or the CPUs over a
    trial's Train workers and data tasks (a CPU run), counting the most the cluster can scale to (``maximum``, from
    ``cluster_max_resources``) or else what is ``present``. An autoscaling cluster whose GPU nodes start at zero has no GPU present: without a known maximum that is an error
    saying what to set, never a guess."""
    if space.max_concurrent:
        return space.max_concurrent
    r = space.base_config().resources
    runs = len(replicate_points(space))  # a trial trains all its replicates at once
    have = {k: max(present.get(k, 0), (maximum or {}).get(k, 0)) for k in ("CPU", "GPU")}
    if r.use_gpu:
        per_trial = runs * r.num_workers * r.gpus_per_worker  # fractions pack trials: 4 per GPU at 0.25
        if have["GPU"] < per_trial:
            seen = ("at most, by its autoscaling config" if maximum else
                    "now, and Ray publishes no autoscaling maximum for it (an autoscaling cluster may start its GPU "
                    "nodes on demand, from zero, as on KubeRay)")
            raise RuntimeError(
                f"the cluster has {have['GPU']:g} GPU(s) {seen}; a trial needs {per_trial:g} (resources.num_workers x "
                f"resources.gpus_per_worker x {runs} replicate run(s)). Set how many trials run at once: "
                f"max_concurrent in the search space ({space.name}) or --max-concurrent N, with N = the GPUs the "
                f"cluster can scale to / {per_trial:g}")
        derived = int(have["GPU"] / per_trial + 1e-9)
    else:
        per_trial = runs * (r.num_workers * r.cpus_per_worker + r.data_concurrency * r.data_cpus_per_task)
        derived = max(1, int(have["CPU"] // per_trial))
    return min(derived, space.num_samples)


def _round_mean(rows: dict[str, dict], metric: str) -> dict:
    """One Tune result from the replicates' rows of one validation round: the mean of every numeric val_* metric,
    the metric per replicate, and whether every replicate finished (``val_final``)."""
    import numpy as np

    first = next(iter(rows.values()))
    out = {k: float(np.mean([r[k] for r in rows.values()])) for k, v in first.items()
           if k.startswith("val_") and isinstance(v, (int, float)) and not isinstance(v, bool)
           and all(isinstance(r.get(k), (int, float)) for r in rows.values())}
    out.update({TIME_ATTR: first[TIME_ATTR], "val_final": all(r.get("val_final") for r in rows.values()),
                "n_replicates": len(rows), f"{metric}_by_replicate": {k: r[metric] for k, r in rows.items()}})
    return out


def run_replicates(cfgs: dict[str, Any], metric: str, report, poll_s: float = 1.0, train=None) -> None:
    """Train the runs ``cfgs`` (replicate label -> Config) at once, one thread each (``train(cfg)``, by default
    ``train.run_two_stage``), and
    call ``report(result)`` for every validation round once all replicates have reached it, in round order, with
    the mean over the replicates (``_round_mean``). Rounds are read from the runs' metrics.jsonl, where the workers
    write them; after a restart the rounds already there are reported again (ASHA keeps its first decision per
    rung). The first failing replicate fails the whole trial."""
    import threading
    import time

    from medvqa.train import run_two_stage

    errors: list[BaseException] = []
    train_one = train or run_two_stage

    def train(cfg) -> None:
        try:
            train_one(cfg)
        except BaseException as e:  # noqa: BLE001 - re-raised in the trial's thread
            errors.append(e)

    threads = [threading.Thread(target=train, args=(cfg,), name=f"replicate-{label}", daemon=True)
               for label, cfg in cfgs.items()]
    for t in threads:
        t.start()
    dirs = {label: run_dir_for(cfg).path for label, cfg in cfgs.items()}
    done = 0
    while True:
        finished = not any(t.is_alive() for t in threads)
        if errors:
            raise errors[0]
        rounds = {label: {r[TIME_ATTR]: r for r in validation_rounds(d)} for label, d in dirs.items()}
        common = sorted(set.intersection(*(set(v) for v in rounds.values())))
        for k in (k for k in common if k > done):
            report(_round_mean({label: rounds[label][k] for label in dirs}, metric))
            done = k
        if finished:
            return
        time.sleep(poll_s)


def trial_fn(params: dict, space: dict, sweep_dir: str) -> None:
    """One Tune trial: one sampled configuration trained for every replicate (``run_replicates``), each a two-stage
    run in its own run directory, reporting the replicates' mean per validation round to Tune."""
    from ray import tune

    from medvqa.observe import tracked
    from medvqa.tracking import read_session
    from medvqa.train import run_two_stage

    sp = SweepSpace(**space)
    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    sdir = StoragePath(sweep_dir)
    points = replicate_points(sp)
    cfgs = {replicate_label(p): trial_config(sp, {**params, **p},
                                             "-".join([f"trial-{trial_id}", *(f"{k.rsplit('.', 1)[-1]}{v}"
                                                                              for k, v in p.items())]),
                                             str(sdir / "runs"))
            for p in points}
    runs = {label: str(run_dir_for(cfg).path) for label, cfg in cfgs.items()}
    log.info("trial %s: %s x %d replicate(s) -> %s", trial_id, params, len(points), runs)
    # The report reads a trial's numbers from its run directories (metrics.jsonl), found through this link, written
    # into the trial's folder in the sweep's storage (get_trial_dir() is a local staging folder of this node).
    write_json(sdir / "tune" / Path(ctx.get_trial_dir()).name / TRIAL_LINK,
               {"trial_id": trial_id, "runs": runs, "replicates": {replicate_label(p): p for p in points}})
    parent = read_session(sweep_dir)

    def train(cfg) -> None:  # each replicate is an MLflow child run of the sweep
        with tracked(cfg, run_dir_for(cfg), tags={"medvqa.trial_id": trial_id}, parent=parent):
            run_two_stage(cfg)

    run_replicates(cfgs, sp.metric, lambda result: tune.report({**result, "trial_id": trial_id}), train=train)


def run_sweep(space: SweepSpace, ray_temp_dir: str | None = None, report: bool = True) -> StoragePath:
    """Run (or continue) the sweep; returns its directory. Re-running with the same space restores it."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from medvqa import tracking
    from medvqa.faults import export_driver_pgid
    from medvqa.model import resolve_model_path
    from medvqa.ray_init import init_ray

    sdir = sweep_dir_for(space)
    sdir.mkdir()
    (sdir / "space.yaml").write_text(yaml.safe_dump(space.to_dict(), sort_keys=False))
    base = space.base_config()
    resolve_model_path(base.model)  # build the tiny model once, before trials race for it
    export_driver_pgid()  # an injected driver fault in a trial kills this process group (medvqa.faults)
    init_ray(base, ray_temp_dir)
    tracking.start_sweep(space, sdir)  # the parent MLflow run of the trials (run.tracking=mlflow)
    trainable = tune.with_resources(tune.with_parameters(trial_fn, space=space.to_dict(), sweep_dir=str(sdir)),
                                    {"CPU": 0.01})  # the trial driver only waits on its TorchTrainer (GUIDE §5)
    tune_path = sdir / "tune"
    if tune.Tuner.can_restore(str(tune_path)):
        log.info("sweep %s: restoring from %s (finished trials are kept)", space.name, tune_path)
        tuner = tune.Tuner.restore(str(tune_path), trainable, resume_unfinished=True, resume_errored=True)
    else:
        import optuna

        concurrent = max_concurrent_trials(space, ray.cluster_resources(), cluster_max_resources())
        sampler = optuna.samplers.TPESampler(seed=space.seed, n_startup_trials=space.tpe_startup_trials)
        # SQLite cannot live in a bucket: there the study is in memory, checkpointed with the searcher (module doc).
        storage = optuna.storages.RDBStorage(f"sqlite:///{sdir / 'optuna.db'}") if sdir.is_local else None
        searcher = OptunaSearch(metric=space.metric, mode=space.mode, sampler=sampler, study_name=space.name,
                                storage=storage)
        if space.asha is None:
            scheduler = FIFOScheduler()
        else:
            scheduler = ASHAScheduler(time_attr=TIME_ATTR, max_t=asha_max_t(space),
                                      grace_period=int(space.asha.get("grace_period", 1)),
                                      reduction_factor=float(space.asha.get("reduction_factor", 2)),
                                      # a trial at max_t must finish (save its adapter), not be stopped
                                      stop_last_trials=False)
        log.info("sweep %s: %d trials, %d at a time, %s, metric %s (%s) -> %s", space.name, space.num_samples,
                 concurrent, "ASHA" if space.asha else "no early stopping", space.metric, space.mode, sdir)
        tuner = tune.Tuner(
            trainable, param_space=tune_param_space(space),
            tune_config=tune.TuneConfig(metric=space.metric, mode=space.mode, num_samples=space.num_samples,
                                        search_alg=ConcurrencyLimiter(searcher, max_concurrent=concurrent),
                                        scheduler=scheduler),
            run_config=tune.RunConfig(name="tune", storage_path=str(sdir),
                                      failure_config=tune.FailureConfig(max_failures=1)))
    results = tuner.fit()
    errors = [r.error for r in results if r.error]
    if errors:
        log.warning("sweep %s: %d trial(s) failed; first error: %s", space.name, len(errors), errors[0])
    if report:
        write_report(sdir)
    ended = [d for r in results if not r.error and r.path  # each trial's link in its folder (trial_fn)
             for d in read_json(sdir / "tune" / Path(r.path).name / TRIAL_LINK, {}).get("runs", {}).values()]
    tracking.end_sweep(sdir, "FAILED" if errors else "FINISHED", sdir / "report", ended)  # the parent, stopped runs
    log.info("sweep done: %s", sdir)
    return sdir
