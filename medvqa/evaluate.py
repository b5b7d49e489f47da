"""The evaluation matrix: models × conditions (``medvqa.conditions``) predicted in ONE Ray Data job, stored and
resumed per cell (``medvqa.predictions``), scored (``metrics.matrix_metrics``) into ``metrics.json``.

Ablation hygiene (GUIDE §3): every model runs at the same precision, with the same instruction per condition and the
same greedy decoding; each actor loads the base model once with every model's adapters and switches them per row
(``infer.Predictor``). Settings: the config's ``eval`` section.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
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


def _predict_rows(rows: list[dict], cfg: Config, models: Mapping[str, Mapping[str, str]],
                  out_dir: StoragePath) -> Iterator[pd.DataFrame]:
    """One Ray Data job over ``rows`` of every model in ``models`` (name -> adapters), in several blocks so every
    actor gets work -> prediction DataFrames, streamed as the job produces them (not after it ends). Injected
    ``eval`` faults (``medvqa.faults``) are recorded in ``out_dir``."""
    import ray

    from medvqa.faults import faults_from_env, parse_faults
    from medvqa.infer import predict_dataset
    from medvqa.ray_init import init_ray

    faults = faults_from_env()
    parse_faults(faults["faults"])  # a malformed spec fails here, not in an actor
    init_ray(cfg)
    e = cfg.eval
    # BATCHES_PER_BLOCK batches per block (and at least 4 blocks per actor): an output block reaches the driver, and
    # disk, only once all of it is done, so a killed job loses at most ~concurrency blocks.
    n_blocks = max(4 * e.concurrency, -(-len(rows) // max(1, e.batch_size * BATCHES_PER_BLOCK)))
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), n_blocks)))
    out = predict_dataset(ds, cfg, models=models, max_new_tokens=e.max_new_tokens, concurrency=e.concurrency,
                          cpus_per_actor=e.cpus_per_actor, num_gpus=e.gpus_per_actor, batch_size=e.batch_size,
                          feature_cache_mb=e.feature_cache_mb, faults={**faults, "record_dir": str(out_dir)})
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
               progress: Callable[[str, int], None] | None = None, *,
               medhalt_questions: Sequence[Mapping] | None = None, few_shot_pool: Sequence[Mapping] | None = None,
               skipped_cells: Sequence[Mapping] = (), settings: Mapping | None = None) -> dict:
    """Predict every missing (model, condition) cell under ``out_dir`` -- ONE Ray Data job for all models over the
    missing questions of every cell, ordered by model then image -- then score all cells into
    ``out_dir/metrics.json``. ``progress(model, n_rows)`` is called after each streamed batch is on disk.

    ``models``: name -> run directory (``base`` needs none; another model with None is skipped). ``test_records``:
    validated records; ``ood_records``, ``medhalt_questions`` (else read from ``eval.medhalt_path``) and
    ``few_shot_pool`` (training-side records with images) feed their conditions. ``skipped_cells``: cells the caller
    could not build ({"model", "condition", "reason"}, '*' for all), listed in metrics.json's ``skipped_cells`` with
    every condition and model skipped here; ``settings``: more entries for metrics.json's ``settings``. Returns
    ``{"metrics", "predicted": [[model, condition], ...] (cells finished by this call), "skipped": [...] (finished
    before), "rows_predicted": {"model/condition": n}, "rows_reused": {"model/condition": n} (kept from an
    interrupted run's parts), "metrics_path"}``.
    """
    import time

    e = cfg.eval
    seed = cfg.run.seed if e.seed is None else e.seed
    out_dir = StoragePath(out_dir)
    instruction = cfg.stage2.prompt  # the same for every model (the study's baseline used another; GUIDE §3)
    not_built = list(skipped_cells)
    given = {r["condition"] for r in not_built if r["model"] == "*"}
    cells = build_cells(test_records, [c for c in e.conditions if c not in given], instruction, seed,
                        e.medhalt_path or None if medhalt_questions is None else None, e.medhalt_limit, ood_records,
                        medhalt_questions=medhalt_questions, few_shot_pool=few_shot_pool, few_shot_k=e.few_shot_k,
                        few_shot_seed=e.few_shot_seed)
    not_built += [{"model": "*", "condition": c, "reason": "no source for this condition"}
                  for c in e.conditions if c not in cells and c not in given]
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
            not_built.append({"model": name, "condition": "*", "reason": "no run directory given"})
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
        for df in eval_stream(cfg, rows, _predict_rows(rows, cfg, todo, out_dir)):
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
    for s in not_built:
        log.info("cells %s/%s skipped: %s", s["model"], s["condition"], s["reason"])
    metrics["skipped_cells"] = not_built
    metrics["settings"] = {
        "models": {m: (str(models[m]) if models[m] is not None else None) for m in models},
        "evaluated": evaluated, "conditions": list(cells), "seed": seed, "n_questions": len(test_records),
        "instructions": {c: sorted({r["instruction"] for r in rows}) for c, rows in cells.items()},
        "producers": producers, "eval": to_dict(cfg)["eval"],
        "cells": {m: {c: paths[m, c].relative_to(out_dir).as_posix() for c in cells} for m in evaluated},
        **(settings or {}),
    }
    metrics = json_ready(metrics)
    path = out_dir / "metrics.json"
    write_json(path, metrics)
    return {"metrics": metrics, "predicted": predicted, "skipped": skipped, "rows_predicted": rows_predicted,
            "rows_reused": rows_reused, "metrics_path": str(path)}


# ------------------------------------------------------------------------------------------------ a run's evaluation


def heldout_records(data: DataConfig, limit: int | None = None) -> list[dict]:
    """Validated records of the ``test`` side of a data source under its ``data.protocol`` (phantoms: the same kind
    with split='test', ``limit`` or ``num_records`` of them). Rejected records are dropped with a log line
    (``evaluate_run`` writes them to eval/rejects/)."""
    from medvqa.data.protocol import protocol_records

    data = dataclasses.replace(data, split="test", limit=limit)
    rows, rejected = protocol_records(data)
    if rejected:
        log.warning("test split of %s: %d of %d records rejected", data.kind, len(rejected), len(rejected) + len(rows))
    return rows


def source_summary(rd: RunDir, name: str, valid: Sequence[Mapping], rejected: Sequence[Mapping],
                   max_fraction: float) -> dict:
    """Write a source's rejected records (with their reasons, no image bytes) to ``eval/rejects/<name>.jsonl`` --
    empty when there are none, so a stale file never outlives its evaluation -- and count them, like training's
    rejects (``pipeline.prepare_records``). ``too_many`` says why the source cannot be used: no valid record, or
    more rejects than ``run.max_reject_fraction``."""
    from medvqa.data.records import reject_summary

    path = rd.eval_rejects(name)
    path.write_text(  # atomic, locally and in object storage
        "".join(json.dumps(r, default=str) + "\n" for r in sorted(rejected, key=lambda r: str(r["id"]))))
    total = len(valid) + len(rejected)
    reasons = reject_summary(list(rejected))
    out = {"total": total, "valid": len(valid), "rejected": len(rejected), "reject_reasons": reasons,
           "rejects_file": path.relative_to(rd.eval).as_posix(), "too_many": ""}
    if not valid:
        out["too_many"] = f"no valid records ({len(rejected)} rejected: {reasons})"
    elif len(rejected) > max_fraction * total:
        out["too_many"] = (f"{len(rejected)} of {total} records rejected ({len(rejected) / total:.1%}), more than "
                           f"run.max_reject_fraction={max_fraction:.1%}: {reasons}")
    if out["too_many"]:
        out["too_many"] += f"; each rejected record and its reason is in {path}"
    return out


def _checked(rd: RunDir, name: str, valid: list, rejected: list, cfg: Config, sources: dict, skipped: list,
             condition: str) -> list | None:
    """``valid`` when the source is usable, else None with the condition listed as skipped (its reason)."""
    sources[name] = source_summary(rd, name, valid, rejected, cfg.run.max_reject_fraction)
    if sources[name]["too_many"]:
        skipped.append({"model": "*", "condition": condition, "reason": f"{name}: {sources[name]['too_many']}"})
        return None
    return valid


def training_pool(data: DataConfig) -> list[dict]:
    """Valid records of the training side of ``data`` (its protocol, no limit), their image bytes shared per image
    (a question set holds each image once, not once per question): the few-shot examples' pool."""
    from medvqa.data.protocol import iter_protocol_records
    from medvqa.data.records import validate_record

    images: dict[str, bytes] = {}
    pool = []
    for r in map(validate_record, iter_protocol_records(dataclasses.replace(data, split="train", limit=None))):
        if not r["reject_reason"]:
            r["image"] = images.setdefault(r["image_id"], r["image"])
            pool.append(r)
    return pool


def single_stage_config(cfg: Config) -> Config:
    """The single-stage baseline of a two-stage config: stage 1 off, everything else -- stage-2 data, budget, seed,
    model -- the same, named ``<run.name>-single-stage`` (for the paper preset exactly `paper_single_stage`)."""
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=f"{cfg.run.name}-single-stage"),
                               stage1=dataclasses.replace(cfg.stage1, enabled=False))


def single_stage_dir(run_dir: str | os.PathLike, cfg: Config) -> StoragePath:
    """Where the single-stage sibling of a two-stage run lives: beside it, under its own run id."""
    from medvqa.runs import run_id

    return StoragePath(run_dir).parent / run_id(single_stage_config(cfg))


def trained_images(run_dir: str | os.PathLike) -> set[str] | None:
    """Content hashes of every image a run trained on (its prepared records of every stage, not the carved
    validation images); None when the run's prepared data is gone."""
    import pyarrow.parquet as pq

    rd = RunDir(run_dir)
    cfg = rd.read_config()
    images: set[str] = set()
    for stage, _ in cfg.stages():
        files = sorted(rd.data(stage).glob("*.parquet"))
        if not files:
            return None
        for f in files:
            images.update(pq.read_table(f.path, filesystem=f.fs, columns=["image_id"]).column("image_id").to_pylist())
    return images - {""}


def leakage(models: Mapping[str, Any], test: Sequence[Mapping], trained_protocol: str, test_protocol: str) -> dict:
    """Measured overlap of every fine-tuned model's training images with the evaluated test set, and whether the
    evaluation is meaningful: it is not when a model trained on any test image (its answer may be memorised)."""
    test_images = {r["image_id"] for r in test if r.get("image_id")}
    per_model = {}
    for name, run_dir in models.items():
        if run_dir is None:
            continue
        seen = trained_images(run_dir)
        if seen is None:
            per_model[name] = {"shared_images": None, "questions": None, "test_images": len(test_images)}
            continue
        per_model[name] = {"shared_images": len(test_images & seen), "test_images": len(test_images),
                           "questions": sum(r.get("image_id") in seen for r in test), "n_questions": len(test)}
    leaky = [m for m, v in per_model.items() if v["shared_images"]]
    unknown = [m for m, v in per_model.items() if v["shared_images"] is None]
    why = ""
    if leaky:
        why = (f"{', '.join(leaky)} trained on images of this test set ({test_protocol} protocol; trained on the "
               f"{trained_protocol} one): their scores include memorised images and do not measure generalisation")
        if trained_protocol != test_protocol:
            why += (". Training on one protocol's training side sees most of the other protocol's test images; "
                    "compare models on the protocol they were trained with")
    elif unknown:
        why = f"not measured for {', '.join(unknown)} (the run's prepared training records are gone)"
    return {"protocol_trained": trained_protocol, "protocol_test": test_protocol, "per_model": per_model,
            "meaningful": not leaky, "why": why}


def condition_sources(rd: RunDir, cfg: Config, test_data: DataConfig, sources: dict, skipped: list) -> tuple:
    """(few-shot pool, Med-HALT questions, ood records) for the conditions that need them (None where a condition is
    not asked for or cannot be built: then it is appended to ``skipped`` with the reason). Med-HALT and ood records
    are validated, their rejects written and counted in ``sources`` (``source_summary``). ``test_data``: the test
    set's data config (the training side of its protocol gives the few-shot examples)."""
    from medvqa.data.phantoms import ood_anatomy
    from medvqa.data.protocol import protocol_records
    from medvqa.data.records import validate_record

    e = cfg.eval
    seed = cfg.run.seed if e.seed is None else e.seed
    skip = lambda condition, reason: skipped.append({"model": "*", "condition": condition, "reason": reason})
    few_shot_pool = medhalt_questions = ood_records = None
    if "few_shot" in e.conditions:
        few_shot_pool = training_pool(test_data) or None
        if few_shot_pool is None:
            skip("few_shot", "no valid training-side records")
    if "medhalt" in e.conditions:
        if not e.medhalt_path:
            skip("medhalt", "no Med-HALT CSV: eval.medhalt_path is empty")
        elif not Path(e.medhalt_path).expanduser().is_file():
            skip("medhalt", f"Med-HALT CSV not found: {e.medhalt_path} (eval.medhalt_path)")
        else:
            from medvqa.data.adapters import medhalt_fake

            rows = [validate_record(r) for r in medhalt_fake(e.medhalt_path, "test", limit=e.medhalt_limit, seed=seed)]
            medhalt_questions = _checked(rd, "medhalt", [r for r in rows if not r["reject_reason"]],
                                         [{k: v for k, v in r.items() if k != "image"} for r in rows
                                          if r["reject_reason"]], cfg, sources, skipped, "medhalt")
            sources["medhalt"]["what"] = f"Med-HALT at {e.medhalt_path}"
    if "ood" in e.conditions:
        ood = None
        if e.ood_path:
            ood = DataConfig(kind="pathvqa_hf", path=e.ood_path, split="test", limit=e.test_limit, seed=seed)
        elif test_data.kind == "phantom":
            ood = dataclasses.replace(test_data, phantom_anatomy=ood_anatomy(test_data.phantom_anatomy))
        else:
            skip("ood", f"no out-of-distribution set for a {test_data.kind} run: eval.ood_path is empty")
        if ood is not None:
            try:
                valid, bad = protocol_records(ood)
            except (ValueError, FileNotFoundError) as err:  # a missing folder, an unknown or offline HF id
                skip("ood", f"{e.ood_path}: {err}")
            else:
                ood_records = _checked(rd, "ood", valid, bad, cfg, sources, skipped, "ood")
                sources["ood"]["what"] = (f"phantoms of anatomy {ood.phantom_anatomy} (never trained on)"
                                          if ood.kind == "phantom" else f"PathVQA test at {ood.path}")
    return few_shot_pool, medhalt_questions, ood_records


def evaluate_run(run_dir: str | os.PathLike, overrides: Sequence[str] = (),
                 single_stage: str | os.PathLike | None = None, base_only: bool = False,
                 seed_runs: Sequence[str | os.PathLike] = ()) -> dict:
    """The matrix for a run directory on its stage-2 source's test set (``eval.protocol``, by default the run's own
    ``stage2.data.protocol``), with the settings of the run's ``eval`` section (``overrides``: dotted ``key=value``,
    e.g. eval.max_new_tokens=8), written to ``run_dir/eval/``. The ``eval`` section used is recorded in the run's
    config.yaml (it is not part of the run id).

    Models (``eval.models``): ``base``; the run; ``single_stage`` -- ``single_stage`` if given, else the run's
    single-stage sibling (``single_stage_dir``) when it has finished. ``seed_runs``: more run directories of the
    same model trained with other seeds (``run.seed``): every run of the model is then evaluated as
    ``<model>@<seed>`` and summarised across seeds. Every source is validated with its rejects written to
    ``eval/rejects/<source>.jsonl`` and counted in metrics.json (``settings.sources``); too many rejects in the test
    set stop the evaluation (``TooManyRejects``), in an optional source (Med-HALT, ood) skip its condition. Every
    skipped cell is listed with its reason (metrics.json ``skipped_cells``)."""
    from medvqa.data.pipeline import TooManyRejects
    from medvqa.data.protocol import describe, protocol_records

    rd = RunDir(run_dir)
    cfg = rd.read_config(overrides)
    stored = rd.read_config()
    if stored.eval != cfg.eval:
        rd.write_config(dataclasses.replace(stored, eval=cfg.eval))
    e = cfg.eval
    data = cfg.stage2.data
    test_data = dataclasses.replace(data, split="test", limit=e.test_limit, protocol=e.protocol or data.protocol,
                                    validation_fraction=0.0)
    sources: dict[str, dict] = {}
    skipped: list[dict] = []
    test, rejected = protocol_records(test_data)
    sources["test"] = source_summary(rd, "test", test, rejected, cfg.run.max_reject_fraction)
    sources["test"]["what"] = f"{test_data.kind} test ({test_data.protocol})"
    if sources["test"]["too_many"]:
        raise TooManyRejects(f"test set of {data.kind}: {sources['test']['too_many']}")
    few_shot_pool, medhalt_questions, ood_records = condition_sources(rd, cfg, test_data, sources, skipped)
    models: dict[str, Any] = {"base": None} if "base" in e.models else {}
    if not base_only:
        name = "two_stage" if cfg.stage1.enabled else "single_stage"  # a run without stage 1 is the baseline
        if cfg.stage1.enabled and "single_stage" in e.models:
            sibling = StoragePath(single_stage) if single_stage else single_stage_dir(rd.path, cfg)
            if (sibling / "config.yaml").exists():
                models["single_stage"] = sibling
            else:
                skipped.append({"model": "single_stage", "condition": "*", "reason": (
                    f"not trained: no run at {sibling} (`medvqa train run.evaluate=true` trains it; or pass "
                    f"--single-stage RUN_DIR)")})
        if name in e.models and seed_runs:
            for other in [run_dir, *seed_runs]:
                rc = RunDir(other).read_config()
                if rc.stage1.enabled != cfg.stage1.enabled:
                    raise ValueError(f"{other}: not the same kind of run as {run_dir} (stage1.enabled differs)")
                key = f"{name}{SEED_SEP}{rc.run.seed}"
                if key in models:
                    raise ValueError(f"two runs of {name} with seed {rc.run.seed}: {models[key]} and {other}")
                models[key] = other
        elif name in e.models:
            models[name] = run_dir
    settings = {"protocol": describe(test_data), "sources": sources,
                "leakage": leakage(models, test, data.protocol, test_data.protocol)}
    out = run_matrix(cfg, models, test, rd.eval, ood_records=ood_records, medhalt_questions=medhalt_questions,
                     few_shot_pool=few_shot_pool, skipped_cells=skipped, settings=settings)
    from medvqa.tracking import log_evaluation  # per-cell metrics to the run's MLflow run (run.tracking=mlflow)

    log_evaluation(cfg, run_dir, out.get("metrics", {}))
    return out
