"""The evaluation matrix: models × conditions → one parquet of predictions per cell → ``metrics.json``.

Conditions (functions from test records to question rows, all seeded and deterministic):

* ``true``    -- the test split as is;
* ``swapped`` -- each question shown a DIFFERENT image (never one with the same ``image_id``), drawn with a seed
  per question from the test images of the same modality and organ when the meta says so (phantoms carry both,
  VQA-RAD carries the organ), falling back to fewer matching keys and finally to any other image (GUIDE §3);
* ``expert``  -- ``true`` with ``prompts.EXPERT_INSTRUCTION`` instead of the stage-2 instruction;
* ``medhalt`` -- Med-HALT nonsense questions (``data.adapters.medhalt_fake``), each on a seeded random test image;
  declining is right, so its headline number is the abstention rate;
* ``ood``     -- another source's records as they are (PathVQA, or phantoms drawn with another seed).

Models: ``base`` (no adapters) and ``single_stage`` / ``two_stage`` (the adapters of a run directory, via
``model.run_adapters``); a model without a run directory is skipped with a log line.

Ablation hygiene: every model gets the same precision (``load_inference_model`` with the same ``cfg.model``), the
same instruction per condition and the same greedy decoding; a run directory whose base-model config differs from
the evaluation config is refused. All of one model's cells go through ONE Ray Data batch-inference job (actors load
the model once); each row carries its own ``instruction`` because the ``expert`` cell needs a different one.

Layout under ``out_dir``: ``predictions/<model>/<condition>.parquet`` (one row per question, written atomically with
pyarrow -- Ray's ``write_parquet`` would append to a folder) and ``metrics.json``. A cell whose parquet exists is not
predicted again (resume); the metrics are always recomputed from the parquet files.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from collections.abc import Mapping, Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medvqa import prompts
from medvqa.config import Config, from_dict, to_dict
from medvqa.metrics import (
    BINARY_METRICS,
    METRICS,
    abstention_rate,
    aggregate,
    mcnemar,
    paired_bootstrap,
    score_rows,
)
from medvqa.score import json_ready

log = logging.getLogger(__name__)

CONDITIONS = ("true", "swapped", "expert", "medhalt", "ood")
MODELS = ("base", "single_stage", "two_stage")
#: meta keys a swapped image should share with the true one, most specific first
SWAP_KEYS = ("modality", "organ")
#: per-question metrics whose true → swapped drop is the image-reliance score
RELIANCE_METRICS = ("normalized_em", "normalized_f1", "closed_accuracy", "open_recall", "paper_contains_em")
MEDHALT_CSV = "/work/shared/data/medhalt/reasoning_fake.csv"
#: prediction columns every cell parquet has (plus ``raw_prediction`` and ``predicted_answer``)
ROW_COLUMNS = ("model", "condition", "question_id", "image_id_shown", "true_image_id", "prompt", "true_answer",
               "answer_type", "question_type", "source", "instruction", "swap_match")


# ------------------------------------------------------------------------------------------------ conditions


def _meta(record: Mapping) -> dict:
    meta = record.get("meta") or {}
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except ValueError:
            meta = {}
    return meta if isinstance(meta, dict) else {}


def _row(record: Mapping, condition: str, instruction: str, image: bytes | None = None,
         image_id_shown: str | None = None, swap_match: str = "") -> dict:
    """A question row: the record's question and answer, the image shown, the instruction to use."""
    return {
        "condition": condition, "question_id": str(record["id"]),
        "image": bytes(record["image"] if image is None else image),
        "image_id_shown": str(record.get("image_id", "") if image_id_shown is None else image_id_shown),
        "true_image_id": str(record.get("image_id", "") or ""),
        "prompt": str(record.get("prompt") or ""), "true_answer": str(record.get("target") or ""),
        "answer_type": str(record.get("answer_type") or ""), "question_type": str(record.get("question_type") or ""),
        "source": str(record.get("source") or ""), "instruction": instruction, "swap_match": swap_match,
    }


def _seeded_rng(seed: int, *keys: str) -> np.random.Generator:
    """A generator per (seed, keys): a question's draw depends on nothing else (order, other questions)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *(zlib.crc32(k.encode()) for k in keys)])


def _image_pool(records: Sequence[Mapping]) -> dict[str, tuple[bytes, dict]]:
    """image_id -> (bytes, meta) over records with an image, in sorted id order."""
    pool: dict[str, tuple[bytes, dict]] = {}
    for r in records:
        if r.get("image_id") and r["image_id"] not in pool:
            pool[r["image_id"]] = (bytes(r["image"]), _meta(r))
    return dict(sorted(pool.items()))


def swap_candidates(image_id: str, meta: Mapping, pool: Mapping[str, tuple[bytes, dict]]) -> tuple[list[str], str]:
    """Candidate image ids for a swap (never ``image_id``) and the match level used: all of ``SWAP_KEYS`` the
    meta has (e.g. 'modality+organ'), then each key alone, then 'any'. Empty list when no other image exists."""
    others = [i for i in pool if i != image_id]
    keys = [k for k in SWAP_KEYS if meta.get(k) not in (None, "")]
    levels = ([tuple(keys)] if keys else []) + ([(k,) for k in keys] if len(keys) > 1 else [])
    for level in levels:
        same = [i for i in others if all(pool[i][1].get(k) == meta.get(k) for k in level)]
        if same:
            return same, "+".join(level)
    return others, "any"


def true_condition(records: Sequence[Mapping], instruction: str, seed: int = 0) -> list[dict]:
    return [_row(r, "true", instruction) for r in records]


def expert_condition(records: Sequence[Mapping], instruction: str = prompts.EXPERT_INSTRUCTION,
                     seed: int = 0) -> list[dict]:
    return [_row(r, "expert", instruction) for r in records]


def swapped_condition(records: Sequence[Mapping], instruction: str, seed: int = 0) -> list[dict]:
    """Each question with another test image (seeded per question id; see ``swap_candidates``)."""
    pool = _image_pool(records)
    rows = []
    for r in records:
        candidates, level = swap_candidates(r["image_id"], _meta(r), pool)
        if not candidates:
            raise ValueError("the swapped condition needs at least two distinct test images")
        shown = candidates[int(_seeded_rng(seed, "swap", str(r["id"])).integers(len(candidates)))]
        rows.append(_row(r, "swapped", instruction, image=pool[shown][0], image_id_shown=shown, swap_match=level))
    return rows


def medhalt_condition(records: Sequence[Mapping], instruction: str, seed: int = 0, csv_path: str | None = None,
                      limit: int | None = 100, questions: Sequence[Mapping] | None = None) -> list[dict]:
    """Med-HALT fake questions (``questions``, or read from ``csv_path`` with a seeded ``limit``), each on a seeded
    random test image; ``true_image_id`` is '' (there is no true image)."""
    if questions is None:
        if not csv_path:
            raise ValueError("the medhalt condition needs csv_path (Med-HALT reasoning_fake.csv) or questions")
        from medvqa.data.adapters import medhalt_fake

        questions = list(medhalt_fake(csv_path, "test", limit=limit, seed=seed))
    pool = _image_pool(records)
    if not pool:
        raise ValueError("the medhalt condition needs test images")
    ids = list(pool)
    rows = []
    for q in questions:
        shown = ids[int(_seeded_rng(seed, "medhalt", str(q["id"])).integers(len(ids)))]
        row = _row({**q, "image_id": ""}, "medhalt", instruction, image=pool[shown][0], image_id_shown=shown)
        row["answer_type"] = row["answer_type"] or "open"
        rows.append(row)
    return rows


def ood_condition(ood_records: Sequence[Mapping], instruction: str, seed: int = 0) -> list[dict]:
    return [_row(r, "ood", instruction) for r in ood_records]


def build_cells(test_records: Sequence[Mapping], conditions: Sequence[str], instruction: str, seed: int = 0,
                medhalt_path: str | None = None, medhalt_limit: int | None = 100,
                ood_records: Sequence[Mapping] | None = None) -> dict[str, list[dict]]:
    """condition -> question rows (model-independent). ``ood`` without ``ood_records`` and ``medhalt`` without a CSV
    are skipped with a log line."""
    unknown = [c for c in conditions if c not in CONDITIONS]
    if unknown:
        raise ValueError(f"unknown condition(s) {unknown} (known: {', '.join(CONDITIONS)})")
    cells: dict[str, list[dict]] = {}
    for c in conditions:
        if c == "true":
            cells[c] = true_condition(test_records, instruction, seed)
        elif c == "swapped":
            cells[c] = swapped_condition(test_records, instruction, seed)
        elif c == "expert":
            cells[c] = expert_condition(test_records, prompts.EXPERT_INSTRUCTION, seed)
        elif c == "medhalt":
            if not medhalt_path:
                log.info("condition medhalt: no Med-HALT CSV given, skipped")
                continue
            cells[c] = medhalt_condition(test_records, instruction, seed, medhalt_path, medhalt_limit)
        elif c == "ood":
            if not ood_records:
                log.info("condition ood: no out-of-distribution records given, skipped")
                continue
            cells[c] = ood_condition(ood_records, instruction, seed)
    for c, rows in cells.items():
        qids = [r["question_id"] for r in rows]
        if len(set(qids)) != len(qids):
            raise ValueError(f"condition {c}: question ids are not unique")
    return cells


# ------------------------------------------------------------------------------------------------ prediction


def _predict_rows(rows: list[dict], cfg: Config, adapters: Mapping[str, str], max_new_tokens: int, concurrency: int,
                  cpus_per_actor: float, batch_size: int) -> pd.DataFrame:
    """One Ray Data job over ``rows`` (several blocks so every actor gets work) -> predictions as a DataFrame."""
    import ray

    if not ray.is_initialized():
        from medvqa.train import init_ray

        init_ray(cfg)
    from medvqa.infer import predict_dataset

    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 4 * concurrency)))
    out = predict_dataset(ds, cfg, adapters=dict(adapters), max_new_tokens=max_new_tokens, concurrency=concurrency,
                          cpus_per_actor=cpus_per_actor, batch_size=batch_size)
    return pd.DataFrame(out.take_all())


def cell_path(out_dir: str | os.PathLike, model: str, condition: str) -> Path:
    return Path(out_dir) / "predictions" / model / f"{condition}.parquet"


def _write_cell(df: pd.DataFrame, path: Path) -> None:
    """Atomic: a crash never leaves a half-written cell that a resume would take as done."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False), tmp)
    os.replace(tmp, path)


def _run_config(run_dir: Path) -> Config | None:
    import yaml

    path = run_dir / "config.yaml"
    return from_dict(yaml.safe_load(path.read_text())) if path.exists() else None


def model_adapters(cfg: Config, name: str, run_dir: str | os.PathLike | None) -> dict[str, str] | None:
    """Adapters of a model: {} for ``base``; the run's final adapters (``run_adapters`` with the run's own config)
    otherwise; None (skip) when no run directory is given. Refuses a run trained on another base model config."""
    if name == "base":
        return {}
    if run_dir is None:
        return None
    run_dir = Path(run_dir)
    run_cfg = _run_config(run_dir) or cfg
    if to_dict(run_cfg)["model"] != to_dict(cfg)["model"]:
        raise ValueError(f"model {name}: {run_dir} was trained with model config {to_dict(run_cfg)['model']}, the "
                         f"evaluation uses {to_dict(cfg)['model']}; every model must run at the same precision")
    from medvqa.model import run_adapters

    adapters = run_adapters(run_cfg, run_dir / "adapters")
    missing = [p for p in adapters.values() if not (Path(p) / "adapter_config.json").exists()]
    if missing:
        raise FileNotFoundError(f"model {name}: adapter(s) missing: {missing}")
    return adapters


# ------------------------------------------------------------------------------------------------ metrics


def image_reliance(true_scored: pd.DataFrame, swapped_scored: pd.DataFrame, n_boot: int = 1000,
                   seed: int = 0) -> dict:
    """Per-question drop true → swapped (score with the true image minus score with another image), per metric:
    mean drop with a paired-bootstrap CI and p-value (``paired_bootstrap(swapped, true)``: diff = mean(true -
    swapped)). Positive: the model uses the image."""
    t = true_scored.set_index("question_id")
    s = swapped_scored.set_index("question_id").reindex(t.index)
    out = {}
    for m in RELIANCE_METRICS:
        if m in t.columns and m in s.columns:
            res = paired_bootstrap(s[m].to_numpy(float), t[m].to_numpy(float), n_boot=n_boot, seed=seed)
            out[m] = {"drop": res["diff"], "ci": res["ci"], "p_value": res["p_value"], "n": res["n"],
                      "true": res["mean_b"], "swapped": res["mean_a"]}
    return out


def paired_tests(a: pd.DataFrame, b: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> dict:
    """Model b vs model a on the same questions: paired bootstrap of every metric, McNemar on binary ones."""
    a = a.set_index("question_id")
    b = b.set_index("question_id").reindex(a.index)
    out: dict[str, Any] = {"bootstrap": {}, "mcnemar": {}}
    for m in METRICS:
        out["bootstrap"][m] = paired_bootstrap(a[m].to_numpy(float), b[m].to_numpy(float), n_boot=n_boot, seed=seed)
        if m in BINARY_METRICS:
            out["mcnemar"][m] = mcnemar(a[m].to_numpy(float), b[m].to_numpy(float))
    return out


def score_matrix(out_dir: str | os.PathLike, models: Sequence[str], conditions: Sequence[str], n_boot: int = 1000,
                 seed: int = 0) -> dict:
    """Metrics of every existing cell: per cell ``aggregate`` (CIs) + abstention rate; per model the image-reliance
    score (needs true and swapped); Med-HALT abstention; paired tests between models on ``true``."""
    scored: dict[tuple[str, str], pd.DataFrame] = {}
    for m in models:
        for c in conditions:
            path = cell_path(out_dir, m, c)
            if path.exists():
                scored[m, c] = score_rows(pd.read_parquet(path))
    res: dict[str, Any] = {"cells": {}, "image_reliance": {}, "medhalt_abstention": {}, "paired_true": {}}
    for (m, c), df in scored.items():
        cell = aggregate(df, n_boot=n_boot, seed=seed)
        cell["abstention_rate"] = abstention_rate(df["predicted_answer"], n_boot=n_boot, seed=seed)
        res["cells"].setdefault(m, {})[c] = cell
        if c == "medhalt":
            res["medhalt_abstention"][m] = cell["abstention_rate"]
        if c == "swapped":
            res["cells"][m][c]["swap_match"] = {str(k): int(v) for k, v in df["swap_match"].value_counts().items()}
    for m in models:
        if (m, "true") in scored and (m, "swapped") in scored:
            res["image_reliance"][m] = image_reliance(scored[m, "true"], scored[m, "swapped"], n_boot, seed)
    with_true = [m for m in models if (m, "true") in scored]
    for a, b in combinations(with_true, 2):
        res["paired_true"][f"{b}_vs_{a}"] = paired_tests(scored[a, "true"], scored[b, "true"], n_boot, seed)
    return res


# ------------------------------------------------------------------------------------------------ the matrix


def run_matrix(cfg: Config | Mapping, models: Mapping[str, str | os.PathLike | None], test_records: Sequence[Mapping],
               out_dir: str | os.PathLike, conditions: Sequence[str] = ("true", "swapped", "expert"), seed: int = 0,
               max_new_tokens: int = 16, concurrency: int = 2, cpus_per_actor: float = 0.5, batch_size: int = 8,
               medhalt_path: str | None = None, medhalt_limit: int | None = 100,
               ood_records: Sequence[Mapping] | None = None, n_boot: int = 1000) -> dict:
    """Predict every missing (model, condition) cell -- one Ray Data job per model over the union of its missing
    cells -- write ``out_dir/predictions/<model>/<condition>.parquet``, then score all cells into
    ``out_dir/metrics.json``.

    ``models``: name -> run directory (``base`` needs none; another model with None is skipped). ``test_records``:
    validated records (``data.records.SCHEMA`` rows, rejects already dropped). Returns ``{"metrics": ...,
    "predicted": [[model, condition], ...], "skipped": [[model, condition], ...], "metrics_path": ...}``.
    """
    from medvqa.runs import write_json

    cfg = cfg if isinstance(cfg, Config) else from_dict(dict(cfg))
    out_dir = Path(out_dir)
    instruction = cfg.stage2.prompt  # the same for every model (the study's baseline used another; GUIDE §3)
    cells = build_cells(test_records, conditions, instruction, seed, medhalt_path, medhalt_limit, ood_records)
    predicted, skipped, evaluated = [], [], []
    for name, run_dir in models.items():
        adapters = model_adapters(cfg, name, run_dir)
        if adapters is None:
            log.info("model %s: no run directory given, skipped", name)
            continue
        evaluated.append(name)
        todo = []
        for c, rows in cells.items():
            path = cell_path(out_dir, name, c)
            if path.exists():
                have = set(pd.read_parquet(path, columns=["question_id"])["question_id"])
                if have != {r["question_id"] for r in rows}:
                    raise ValueError(f"{path} holds other questions than this matrix's {c} cell: delete it to redo")
                log.info("cell %s/%s exists: skipped", name, c)
                skipped.append([name, c])
            else:
                todo.append(c)
        if not todo:
            continue
        rows = [{**r, "model": name} for c in todo for r in cells[c]]
        log.info("model %s: predicting %d rows for cells %s (adapters: %s)", name, len(rows), todo, adapters or "none")
        preds = _predict_rows(rows, cfg, adapters, max_new_tokens, concurrency, cpus_per_actor, batch_size)
        for c in todo:
            order = [r["question_id"] for r in cells[c]]
            df = preds[preds["condition"] == c].set_index("question_id").loc[order].reset_index()
            df = df[[*ROW_COLUMNS, "raw_prediction", "predicted_answer"]]
            _write_cell(df, cell_path(out_dir, name, c))
            predicted.append([name, c])
    metrics = score_matrix(out_dir, evaluated, list(cells), n_boot=n_boot, seed=seed)
    metrics["settings"] = {
        "models": {m: (str(models[m]) if models[m] is not None else None) for m in models},
        "evaluated": evaluated, "conditions": list(cells), "seed": seed, "n_questions": len(test_records),
        "instructions": {c: sorted({r["instruction"] for r in rows}) for c, rows in cells.items()},
        "decoding": {"do_sample": False, "num_beams": 1, "max_new_tokens": max_new_tokens},
        "model": to_dict(cfg)["model"], "medhalt_path": medhalt_path, "medhalt_limit": medhalt_limit,
    }
    metrics = json_ready(metrics)
    path = out_dir / "metrics.json"
    write_json(path, metrics)
    return {"metrics": metrics, "predicted": predicted, "skipped": skipped, "metrics_path": str(path)}


# ------------------------------------------------------------------------------------------------ a run's evaluation


def load_run_config(run_dir: str | os.PathLike, overrides: Sequence[str] = ()) -> Config:
    """A run's resolved ``config.yaml`` with dotted ``key=value`` overrides merged in (e.g. resources.*)."""
    import yaml

    from medvqa.config import parse_overrides

    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{path}: not a run directory (no config.yaml)")
    data = yaml.safe_load(path.read_text()) or {}

    def merge(a: dict, b: dict) -> dict:
        return {**a, **{k: merge(a.get(k) or {}, v) if isinstance(v, dict) else v for k, v in b.items()}}

    return from_dict(merge(data, parse_overrides(list(overrides))))


def heldout_records(data, limit: int | None = None, seed: int | None = None) -> list[dict]:
    """Validated records of the ``test`` split of a stage's data source (phantoms: the same kind with
    split='test', ``limit`` or ``num_records`` of them; another ``seed`` gives an out-of-distribution phantom set).
    Rejected records are dropped with a log line."""
    import dataclasses

    from medvqa.data.adapters import iter_raw_records
    from medvqa.data.records import validate_record

    data = dataclasses.replace(data, split="test", limit=limit, seed=data.seed if seed is None else seed)
    rows = [validate_record(r) for r in iter_raw_records(data)]
    good = [r for r in rows if not r["reject_reason"]]
    if len(good) < len(rows):
        log.warning("test split of %s: %d of %d records rejected", data.kind, len(rows) - len(good), len(rows))
    return good


def pathvqa_records(path: str, limit: int | None = None, seed: int = 0) -> list[dict]:
    """PathVQA test records (HF id / parquet / save_to_disk folder) for the ``ood`` condition."""
    from medvqa.data.adapters import pathvqa_hf
    from medvqa.data.records import validate_record

    return [r for r in (validate_record(x) for x in pathvqa_hf(path, "test", limit=limit, seed=seed))
            if not r["reject_reason"]]


def evaluate_run(run_dir: str | os.PathLike, single_stage: str | os.PathLike | None = None, base_only: bool = False,
                 overrides: Sequence[str] = (), conditions: Sequence[str] = ("true", "swapped", "expert", "medhalt"),
                 test_limit: int | None = None, medhalt_path: str | None = None, medhalt_limit: int | None = 100,
                 ood: bool = False, ood_path: str | None = None, seed: int | None = None, max_new_tokens: int = 16,
                 concurrency: int = 2, cpus_per_actor: float = 0.5, batch_size: int = 8) -> dict:
    """The matrix for a two-stage run directory (and optionally a single-stage one) on its stage-2 source's test
    split, written to ``run_dir/eval/``. ``ood``: phantoms with another seed for a phantom run, or PathVQA at
    ``ood_path``. ``seed``: default the run's seed."""
    cfg = load_run_config(run_dir, overrides)
    seed = cfg.run.seed if seed is None else seed
    data = cfg.stage2.data
    test = heldout_records(data, limit=test_limit)
    ood_records = None
    conditions = list(conditions)
    if ood or ood_path:
        if ood_path:
            ood_records = pathvqa_records(ood_path, limit=test_limit, seed=seed)
        elif data.kind == "phantom":
            ood_records = heldout_records(data, limit=test_limit, seed=data.seed + 1000)
        else:
            log.info("condition ood: needs --ood-path (PathVQA) for a %s run, skipped", data.kind)
        if "ood" not in conditions:
            conditions.append("ood")
    models: dict[str, Any] = {"base": None}
    if not base_only:
        if cfg.stage1.enabled:
            models["single_stage"] = single_stage
            models["two_stage"] = run_dir
        else:  # the run itself is a single-stage baseline
            models["single_stage"] = run_dir
    return run_matrix(cfg, models, test, Path(run_dir) / "eval", conditions=conditions, seed=seed,
                      max_new_tokens=max_new_tokens, concurrency=concurrency, cpus_per_actor=cpus_per_actor,
                      batch_size=batch_size, medhalt_path=medhalt_path, medhalt_limit=medhalt_limit,
                      ood_records=ood_records)
