"""The evaluation matrix: models × conditions (``medvqa.conditions``) predicted in ONE Ray Data job, stored and
resumed per cell (``medvqa.predictions``), scored (``metrics.matrix_metrics``) into ``metrics.json``.

Ablation hygiene (GUIDE §3): every model runs at the same precision, with the same instruction per condition and the
same greedy decoding; each actor loads the base model once with every model's adapters and switches them per row
(``infer.Predictor``). Settings: the config's ``eval`` section.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pandas as pd

from medvqa.conditions import build_cells
from medvqa.config import Config, DataConfig, actor_gpus, to_dict
from medvqa.metrics import SEED_SEP, json_ready, matrix_metrics
from medvqa.predictions import CellWriter, producer, read_frame
from medvqa.runs import RunDir, read_json, write_json
from medvqa.storage import StoragePath

log = logging.getLogger(__name__)

#: batches per Ray Data block: 1 streams finest but halved the tiny CPU model's throughput (per-block actor call,
#: object store, one parquet part per block; bench/eval_matrix.py: 1 -> 160, 4 -> 300, 8 -> 360 questions/s); on a
#: GPU model a batch takes ~1 s and that overhead is noise, so a finer block costs nothing there
BATCHES_PER_BLOCK = 8


def _predict_rows(rows: list[dict], cfg: Config, models: Mapping[str, Mapping[str, str]]) -> Iterator[pd.DataFrame]:
    """One Ray Data job over ``rows`` of every model in ``models`` (name -> adapters), in several blocks so every
    actor gets work -> prediction DataFrames, streamed as the job produces them (not after it ends)."""
    import ray

    from medvqa.infer import predict_dataset
    from medvqa.ray_init import init_ray

    init_ray(cfg)
    e = cfg.eval
    # BATCHES_PER_BLOCK batches per block (and at least 4 blocks per actor): an output block reaches the driver, and
    # disk, only once all of it is done, so a killed job loses at most ~concurrency blocks.
    n_blocks = max(4 * e.concurrency, -(-len(rows) // max(1, e.batch_size * BATCHES_PER_BLOCK)))
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), n_blocks)))
    out = predict_dataset(ds, cfg, models=models, max_new_tokens=e.max_new_tokens, concurrency=e.concurrency,
                          cpus_per_actor=e.cpus_per_actor, num_gpus=e.gpus_per_actor, batch_size=e.batch_size,
                          feature_cache_mb=e.feature_cache_mb)
    yield from out.iter_batches(batch_size=None, batch_format="pandas")  # None: blocks as they are produced


def group_by_image(rows: list[dict]) -> list[dict]:
    """Rows ordered by their image's content hash (stable: a condition's order is kept within an image), so the
    consecutive rows that make up a block and a batch share images, whatever their condition."""
    from medvqa.infer import image_key

    keys = {id(r): image_key(r["image"]) for r in rows}
    return sorted(rows, key=lambda r: keys[id(r)])


def model_adapters(cfg: Config, name: str, run_dir: str | os.PathLike | None) -> dict[str, str] | None:
    """Adapters of a model: {} for ``base``; the run's final adapters (``run_adapters`` with the run's own config)
    otherwise; None (skip) when no run directory is given. Refuses a run trained on another base model config."""
    if name == "base":
        return {}
    if run_dir is None:
        return None
    rd = RunDir(run_dir)
    run_cfg = rd.read_config()
    if to_dict(run_cfg)["model"] != to_dict(cfg)["model"]:
        raise ValueError(f"model {name}: {rd} was trained with model config {to_dict(run_cfg)['model']}, the "
                         f"evaluation uses {to_dict(cfg)['model']}; every model must run at the same precision")
    from medvqa.model import run_adapters

    adapters = run_adapters(run_cfg, rd.adapters())
    missing = [p for p in adapters.values() if not (StoragePath(p) / "adapter_config.json").exists()]
    if missing:
        raise FileNotFoundError(f"model {name}: adapter(s) missing: {missing}")
    return adapters


def run_matrix(cfg: Config, models: Mapping[str, str | os.PathLike | None], test_records: Sequence[Mapping],
               out_dir: str | os.PathLike, ood_records: Sequence[Mapping] | None = None,
               progress: Callable[[str, int], None] | None = None) -> dict:
    """Predict every missing (model, condition) cell under ``out_dir`` -- ONE Ray Data job for all models over the
    missing questions of every cell, ordered by model then image -- then score all cells into
    ``out_dir/metrics.json``. ``progress(model, n_rows)`` is called after each streamed batch is on disk.

    ``models``: name -> run directory (``base`` needs none; another model with None is skipped). ``test_records``:
    validated records. Returns ``{"metrics", "predicted": [[model, condition], ...] (cells finished by this call),
    "skipped": [...] (finished before), "rows_predicted": {"model/condition": n}, "rows_reused": {"model/condition":
    n} (kept from an interrupted run's parts), "metrics_path"}``.
    """
    import time

    e = cfg.eval
    seed = cfg.run.seed if e.seed is None else e.seed
    out_dir = StoragePath(out_dir)
    instruction = cfg.stage2.prompt  # the same for every model (the study's baseline used another; GUIDE §3)
    cells = build_cells(test_records, e.conditions, instruction, seed, e.medhalt_path or None, e.medhalt_limit,
                        ood_records)
    model_cfg = to_dict(cfg)["model"]
    predicted, skipped, evaluated = [], [], []
    rows_predicted: dict[str, int] = {}
    rows_reused: dict[str, int] = {}
    writers: dict[str, CellWriter] = {}
    producers: dict[str, dict] = {}
    todo: dict[str, dict[str, str]] = {}  # model -> adapters, for models with questions to predict
    rows: list[dict] = []
    for name, run_dir in models.items():
        adapters = model_adapters(cfg, name, run_dir)
        if adapters is None:
            log.info("model %s: no run directory given, skipped", name)
            continue
        evaluated.append(name)
        producers[name] = producer(model_cfg, adapters, cfg.resources.use_gpu, e.max_new_tokens)
        writers[name] = writer = CellWriter(out_dir, name, cells, producers[name])
        skipped += [[name, c] for c in writer.finished]
        for c, n in writer.reused_rows.items():
            if n:
                rows_reused[f"{name}/{c}"] = n
                log.info("cell %s/%s: %d of %d questions kept from an interrupted run", name, c, n, len(cells[c]))
        pending = writer.pending()
        if pending:
            todo[name] = adapters
            log.info("model %s: %d rows to predict for cells %s (adapters: %s)", name, len(pending),
                     sorted({r["condition"] for r in pending}), adapters or "none")
            for r in pending:
                key = f"{name}/{r['condition']}"
                rows_predicted[key] = rows_predicted.get(key, 0) + 1
            rows += group_by_image([{**r, "model": name} for r in pending])  # model-major: features are per model
    # Cost per cell (the report's): cells interleave in one job, so each streamed block's wall time (since the
    # previous block) is split over its rows, and the wait for the first block (actor start-up, model load) over all
    # rows; the cells' seconds add up to the job's.
    timing: dict[str, dict] = {}
    gpus = e.concurrency * actor_gpus(cfg)
    if rows:
        from medvqa.observe import eval_stream  # a progress bar and Ray metrics over the streamed answers

        t_last = time.perf_counter()
        for df in eval_stream(cfg, rows, _predict_rows(rows, cfg, todo)):
            now = time.perf_counter()
            if not timing:
                timing = {k: {"rows": n, "seconds": (now - t_last) * n / len(rows), "gpus": gpus}
                          for k, n in rows_predicted.items()}
            else:
                for (name, c), part in df.groupby(["model", "condition"], sort=False):
                    timing[f"{name}/{c}"]["seconds"] += (now - t_last) * len(part) / len(df)
            t_last = now
            for name, part in df.groupby("model", sort=False):
                writers[str(name)].add(part)
                if progress is not None:
                    progress(str(name), len(part))
    for name, writer in writers.items():
        if writer.done:  # the job ended without some rows: never happens unless Ray dropped rows
            raise RuntimeError(f"model {name}: cells {sorted(writer.done)} incomplete after the job")
        predicted += [[name, c] for c in writer.written]
    paths = {(m, c): writers[m].path(c) for m in evaluated for c in cells}
    metrics = matrix_metrics({k: read_frame(p) for k, p in paths.items()}, n_boot=e.n_boot, seed=seed)
    earlier = (read_json(out_dir / "metrics.json", {}).get("timing") or {}).get("cells") or {}
    metrics["timing"] = {"cells": {**{f"{m}/{c}": earlier[f"{m}/{c}"] for m, c in skipped if f"{m}/{c}" in earlier},
                                   **timing}}
    metrics["settings"] = {
        "models": {m: (str(models[m]) if models[m] is not None else None) for m in models},
        "evaluated": evaluated, "conditions": list(cells), "seed": seed, "n_questions": len(test_records),
        "instructions": {c: sorted({r["instruction"] for r in rows}) for c, rows in cells.items()},
        "producers": producers, "eval": to_dict(cfg)["eval"],
        "cells": {m: {c: paths[m, c].relative_to(out_dir).as_posix() for c in cells} for m in evaluated},
    }
    metrics = json_ready(metrics)
    path = out_dir / "metrics.json"
    write_json(path, metrics)
    return {"metrics": metrics, "predicted": predicted, "skipped": skipped, "rows_predicted": rows_predicted,
            "rows_reused": rows_reused, "metrics_path": str(path)}


# ------------------------------------------------------------------------------------------------ a run's evaluation


def heldout_records(data: DataConfig, limit: int | None = None, seed: int | None = None) -> list[dict]:
    """Validated records of the ``test`` split of a data source (phantoms: the same kind with split='test',
    ``limit`` or ``num_records`` of them; another ``seed`` gives an out-of-distribution phantom set). Rejected
    records are dropped with a log line."""
    from medvqa.data.adapters import iter_raw_records
    from medvqa.data.records import valid_records

    data = dataclasses.replace(data, split="test", limit=limit, seed=data.seed if seed is None else seed)
    rows, rejected = valid_records(iter_raw_records(data))
    if rejected:
        log.warning("test split of %s: %d of %d records rejected", data.kind, rejected, rejected + len(rows))
    return rows


def evaluate_run(run_dir: str | os.PathLike, overrides: Sequence[str] = (),
                 single_stage: str | os.PathLike | None = None, base_only: bool = False,
                 seed_runs: Sequence[str | os.PathLike] = ()) -> dict:
    """The matrix for a run directory (and optionally a single-stage one) on its stage-2 source's test split, with
    the settings of the run's ``eval`` section (``overrides``: dotted ``key=value``, e.g. eval.max_new_tokens=8),
    written to ``run_dir/eval/``. The ``eval`` section used is recorded in the run's config.yaml (it is not part of
    the run id). ``seed_runs``: more run directories of the same model trained with other seeds (``run.seed``):
    every run of the model is then evaluated as ``<model>@<seed>`` and summarised across seeds."""
    rd = RunDir(run_dir)
    cfg = rd.read_config(overrides)
    stored = rd.read_config()
    if stored.eval != cfg.eval:
        rd.write_config(dataclasses.replace(stored, eval=cfg.eval))
    e = cfg.eval
    data = cfg.stage2.data
    test = heldout_records(data, limit=e.test_limit)
    ood_records = None
    if "ood" in e.conditions:
        if e.ood_path:
            ood = DataConfig(kind="pathvqa_hf", path=e.ood_path, seed=cfg.run.seed if e.seed is None else e.seed)
            ood_records = heldout_records(ood, limit=e.test_limit)
        elif data.kind == "phantom":
            ood_records = heldout_records(data, limit=e.test_limit, seed=data.seed + 1000)
        else:
            log.info("condition ood: needs eval.ood_path (PathVQA) for a %s run, skipped", data.kind)
    models: dict[str, Any] = {"base": None}
    if not base_only:
        name = "two_stage" if cfg.stage1.enabled else "single_stage"  # a run without stage 1 is the baseline
        if cfg.stage1.enabled:
            models["single_stage"] = single_stage
        if seed_runs:
            for other in [run_dir, *seed_runs]:
                rc = RunDir(other).read_config()
                if rc.stage1.enabled != cfg.stage1.enabled:
                    raise ValueError(f"{other}: not the same kind of run as {run_dir} (stage1.enabled differs)")
                key = f"{name}{SEED_SEP}{rc.run.seed}"
                if key in models:
                    raise ValueError(f"two runs of {name} with seed {rc.run.seed}: {models[key]} and {other}")
                models[key] = other
        else:
            models[name] = run_dir
    out = run_matrix(cfg, models, test, rd.eval, ood_records=ood_records)
    from medvqa.tracking import log_evaluation  # per-cell metrics to the run's MLflow run (run.tracking=mlflow)

    log_evaluation(cfg, run_dir, out.get("metrics", {}))
    return out
