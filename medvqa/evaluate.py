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
the evaluation config is refused. Every cell of every model goes through ONE Ray Data batch-inference job: each
actor loads the base model once with every model's adapters and switches them per row (``infer.Predictor`` with
``models``); each row carries its own ``model`` and ``instruction`` (the ``expert`` cell needs a different one).
Within a model, rows are ordered by image content hash, so the questions of every condition that show one image reach
the same actor together and its vision features are computed once (``infer.FeatureCache``; ``feature_cache_mb=0``
turns it off).

Layout under ``out_dir``: ``predictions/<model>/<condition>.parquet`` (one row per question, written atomically with
pyarrow -- Ray's ``write_parquet`` would append to a folder) and ``metrics.json``. Predictions are streamed to the
driver as the job produces them and land at once in ``predictions/<model>/<condition>.parts/<uuid>.parquet`` (each
part atomic); a cell's parquet is written when its last question arrives and its parts are then removed. Resume: a
cell whose parquet exists is done; a cell with parts only is never taken as done -- its finished questions are kept
and only the missing ones are predicted, so a killed job loses only its in-flight batches. The metrics are always
recomputed from the cell parquet files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import zlib
from collections.abc import Callable, Mapping, Sequence
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
#: batches per Ray Data block: 1 streams finest but halved the tiny CPU model's throughput (per-block actor call,
#: object store, one parquet part per block; bench/eval_matrix.py: 1 -> 160, 4 -> 300, 8 -> 360 questions/s); on a
#: GPU model a batch takes ~1 s and that overhead is noise, so a finer block costs nothing there
BATCHES_PER_BLOCK = 8
#: ``<model>@<seed>`` names one seed's run of a model; several seeds of a model are summarised across seeds
SEED_SEP = "@"
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


def _predict_rows(rows: list[dict], cfg: Config, models: Mapping[str, Mapping[str, str]], max_new_tokens: int,
                  concurrency: int, cpus_per_actor: float, batch_size: int, feature_cache_mb: float = 512.0):
    """One Ray Data job over ``rows`` of every model in ``models`` (name -> adapters; each actor loads the base once
    and switches adapters per row, ``infer.Predictor``), in several blocks so every actor gets work -> an iterator of
    prediction DataFrames, streamed as the job produces them (not after it ends)."""
    import ray

    if not ray.is_initialized():
        from medvqa.train import init_ray

        init_ray(cfg)
    from medvqa.infer import predict_dataset

    # BATCHES_PER_BLOCK batches per block (and at least 4 blocks per actor): an output block reaches the driver, and
    # disk, only once all of it is done, so a killed job loses at most ~concurrency blocks.
    n_blocks = max(4 * concurrency, -(-len(rows) // max(1, batch_size * BATCHES_PER_BLOCK)))
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), n_blocks)))
    out = predict_dataset(ds, cfg, models=models, max_new_tokens=max_new_tokens, concurrency=concurrency,
                          cpus_per_actor=cpus_per_actor, batch_size=batch_size, feature_cache_mb=feature_cache_mb)
    yield from out.iter_batches(batch_size=None, batch_format="pandas")  # None: blocks as they are produced


def group_by_image(rows: list[dict]) -> list[dict]:
    """Rows ordered by their image's content hash (stable: a condition's order is kept within an image), so the
    consecutive rows that make up a block and a batch share images, whatever their condition."""
    from medvqa.infer import image_key

    keys = {id(r): image_key(r["image"]) for r in rows}
    return sorted(rows, key=lambda r: keys[id(r)])


def cell_path(out_dir: str | os.PathLike, model: str, condition: str) -> Path:
    return Path(out_dir) / "predictions" / model / f"{condition}.parquet"


def parts_dir(out_dir: str | os.PathLike, model: str, condition: str) -> Path:
    """Where a cell's predictions accumulate (one atomic parquet per streamed batch) until the cell is complete."""
    return Path(out_dir) / "predictions" / model / f"{condition}.parts"


def _write_cell(df: pd.DataFrame, path: Path) -> None:
    """Atomic: a crash never leaves a half-written cell that a resume would take as done."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    pq.write_table(pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False), tmp)
    os.replace(tmp, path)


class CellWriter:
    """The cells of one model under ``out_dir``: which questions are done, streamed parts in, finished cells out.

    ``cells``: condition -> its question rows (``build_cells``). On construction, finished cells are checked (same
    questions as this matrix, else an error: delete the file to redo), leftover parts of finished cells are removed,
    and the questions already in parts are collected (files that are not whole parts, e.g. ``*.tmp`` of a killed
    write, are ignored); a cell complete in parts is finalized at once. ``pending()``: rows still to predict.
    ``add(df)``: prediction rows of any cells -> parts; every cell that becomes complete is written.
    """

    def __init__(self, out_dir: str | os.PathLike, model: str, cells: Mapping[str, Sequence[Mapping]]):
        self.out_dir, self.model, self.cells = Path(out_dir), model, cells
        self.done: dict[str, set[str]] = {}  # condition -> question ids in parts (unfinished cells only)
        self.finished: list[str] = []  # cells finished before this run
        self.written: list[str] = []  # cells finished by this writer
        self.reused_rows: dict[str, int] = {}  # condition -> rows kept from parts of an earlier run
        for c, rows in cells.items():
            qids = {r["question_id"] for r in rows}
            path, parts = cell_path(out_dir, model, c), parts_dir(out_dir, model, c)
            if path.exists():
                have = set(pd.read_parquet(path, columns=["question_id"])["question_id"])
                if have != qids:
                    raise ValueError(f"{path} holds other questions than this matrix's {c} cell: delete it to redo")
                self.finished.append(c)
                shutil.rmtree(parts, ignore_errors=True)  # a crash between finishing the cell and the clean-up
                continue
            have = set()
            for f in sorted(parts.glob("*.parquet")):
                have |= set(pd.read_parquet(f, columns=["question_id"])["question_id"])
            if have - qids:
                raise ValueError(f"{parts} holds questions that are not in this matrix's {c} cell: delete it to redo")
            self.done[c] = have
            self.reused_rows[c] = len(have)
            if have == qids:
                self._finalize(c)

    def pending(self) -> list[dict]:
        return [r for c, seen in self.done.items() for r in self.cells[c] if r["question_id"] not in seen]

    def add(self, df: pd.DataFrame) -> None:
        import uuid

        for c, part in df.groupby("condition", sort=False):
            if c not in self.done:
                raise ValueError(f"predictions for cell {self.model}/{c}, which is not being predicted")
            folder = parts_dir(self.out_dir, self.model, c)
            folder.mkdir(parents=True, exist_ok=True)
            _write_cell(part[[*ROW_COLUMNS, "raw_prediction", "predicted_answer"]],
                        folder / f"{uuid.uuid4().hex}.parquet")
            self.done[c] |= set(part["question_id"])
            if len(self.done[c]) == len(self.cells[c]):
                self._finalize(c)

    def _finalize(self, c: str) -> None:
        folder = parts_dir(self.out_dir, self.model, c)
        df = pd.concat([pd.read_parquet(f) for f in sorted(folder.glob("*.parquet"))], ignore_index=True)
        order = [r["question_id"] for r in self.cells[c]]
        df = df.drop_duplicates("question_id").set_index("question_id").loc[order].reset_index()
        _write_cell(df[[*ROW_COLUMNS, "raw_prediction", "predicted_answer"]], cell_path(self.out_dir, self.model, c))
        shutil.rmtree(folder, ignore_errors=True)
        del self.done[c]
        self.written.append(c)


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


def seed_summary(cells: Mapping[str, Mapping[str, Mapping]], metrics: Sequence[str] = METRICS) -> dict:
    """Seeds as a dimension: models named ``<family>@<seed>`` (several runs of one model, e.g. ``two_stage@0``,
    ``two_stage@1``) -> ``{family: {condition: {"n_seeds", "seeds", metric: {"per_seed": {seed: value}, "mean",
    "sd" (sample SD across seeds, ddof 1), "min", "max"}}}}`` for every condition at least two seeds have. The
    bootstrap CIs of each cell measure question sampling; the spread across seeds measures training noise."""
    families: dict[str, dict[str, str]] = {}
    for name in cells:
        if SEED_SEP in name:
            family, label = name.split(SEED_SEP, 1)
            families.setdefault(family, {})[label] = name
    out: dict[str, dict] = {}
    for family, members in families.items():
        conditions = sorted({c for name in members.values() for c in cells[name]})
        for c in conditions:
            have = {label: cells[name][c] for label, name in sorted(members.items()) if c in cells[name]}
            if len(have) < 2:
                continue
            entry: dict[str, Any] = {"n_seeds": len(have), "seeds": list(have)}
            for m in metrics:
                vals = {label: a.get(m) for label, a in have.items()}
                finite = np.array([v for v in vals.values() if v is not None and np.isfinite(v)], dtype=float)
                entry[m] = {"per_seed": vals,
                            "mean": float(finite.mean()) if len(finite) else None,
                            "sd": float(finite.std(ddof=1)) if len(finite) > 1 else None,
                            "min": float(finite.min()) if len(finite) else None,
                            "max": float(finite.max()) if len(finite) else None}
            out.setdefault(family, {})[c] = entry
    return out


def score_matrix(out_dir: str | os.PathLike, models: Sequence[str], conditions: Sequence[str], n_boot: int = 1000,
                 seed: int = 0) -> dict:
    """Metrics of every existing cell: per cell ``aggregate`` (CIs) + abstention rate; per model the image-reliance
    score (needs true and swapped); Med-HALT abstention; paired tests between models on ``true``; and, for models
    run with several seeds (``<model>@<seed>``), per-seed values with mean and spread across seeds (``seeds``)."""
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
    res["seeds"] = seed_summary(res["cells"])
    return res


# ------------------------------------------------------------------------------------------------ the matrix


def run_matrix(cfg: Config | Mapping, models: Mapping[str, str | os.PathLike | None], test_records: Sequence[Mapping],
               out_dir: str | os.PathLike, conditions: Sequence[str] = ("true", "swapped", "expert"), seed: int = 0,
               max_new_tokens: int = 16, concurrency: int = 2, cpus_per_actor: float = 0.5, batch_size: int = 8,
               medhalt_path: str | None = None, medhalt_limit: int | None = 100,
               ood_records: Sequence[Mapping] | None = None, n_boot: int = 1000,
               feature_cache_mb: float = 512.0, progress: Callable[[str, int], None] | None = None) -> dict:
    """Predict every missing (model, condition) cell -- ONE Ray Data job for all models (each actor loads the base
    model once and switches adapters per row) over the missing questions of every cell, ordered by model then
    image -- streaming them into ``out_dir/predictions/<model>/<condition>.parquet`` (see the module docstring for
    parts and resume), then score all cells into ``out_dir/metrics.json``. ``progress(model, n_rows)`` is called
    after each streamed batch is on disk.

    ``models``: name -> run directory (``base`` needs none; another model with None is skipped). ``test_records``:
    validated records (``data.records.SCHEMA`` rows, rejects already dropped). ``feature_cache_mb``: each actor's
    image-feature cache (0: encode every row's image). Returns ``{"metrics": ..., "predicted": [[model, condition],
    ...] (cells finished by this call), "skipped": [[model, condition], ...] (finished before), "rows_predicted":
    {"model/condition": n}, "rows_reused": {"model/condition": n} (kept from an interrupted run's parts),
    "metrics_path": ...}``.
    """
    from medvqa.runs import write_json

    cfg = cfg if isinstance(cfg, Config) else from_dict(dict(cfg))
    out_dir = Path(out_dir)
    instruction = cfg.stage2.prompt  # the same for every model (the study's baseline used another; GUIDE §3)
    cells = build_cells(test_records, conditions, instruction, seed, medhalt_path, medhalt_limit, ood_records)
    predicted, skipped, evaluated = [], [], []
    rows_predicted: dict[str, int] = {}
    rows_reused: dict[str, int] = {}
    writers: dict[str, CellWriter] = {}
    todo: dict[str, dict[str, str]] = {}  # model -> adapters, for models with questions to predict
    rows: list[dict] = []
    for name, run_dir in models.items():
        adapters = model_adapters(cfg, name, run_dir)
        if adapters is None:
            log.info("model %s: no run directory given, skipped", name)
            continue
        evaluated.append(name)
        writers[name] = writer = CellWriter(out_dir, name, cells)
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
    if rows:
        from medvqa.observe import eval_stream  # a progress bar and Ray metrics over the streamed answers

        for df in eval_stream(cfg, rows, _predict_rows(rows, cfg, todo, max_new_tokens, concurrency, cpus_per_actor,
                                                       batch_size, feature_cache_mb)):
            for name, part in df.groupby("model", sort=False):
                writers[str(name)].add(part)
                if progress is not None:
                    progress(str(name), len(part))
    for name, writer in writers.items():
        if writer.done:  # the job ended without some rows: never happens unless Ray dropped rows
            raise RuntimeError(f"model {name}: cells {sorted(writer.done)} incomplete after the job")
        predicted += [[name, c] for c in writer.written]
    metrics = score_matrix(out_dir, evaluated, list(cells), n_boot=n_boot, seed=seed)
    metrics["settings"] = {
        "models": {m: (str(models[m]) if models[m] is not None else None) for m in models},
        "evaluated": evaluated, "conditions": list(cells), "seed": seed, "n_questions": len(test_records),
        "instructions": {c: sorted({r["instruction"] for r in rows}) for c, rows in cells.items()},
        "decoding": {"do_sample": False, "num_beams": 1, "max_new_tokens": max_new_tokens},
        "feature_cache_mb": feature_cache_mb,
        "model": to_dict(cfg)["model"], "medhalt_path": medhalt_path, "medhalt_limit": medhalt_limit,
    }
    metrics = json_ready(metrics)
    path = out_dir / "metrics.json"
    write_json(path, metrics)
    return {"metrics": metrics, "predicted": predicted, "skipped": skipped, "rows_predicted": rows_predicted,
            "rows_reused": rows_reused, "metrics_path": str(path)}


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
                 concurrency: int = 2, cpus_per_actor: float = 0.5, batch_size: int = 8,
                 feature_cache_mb: float = 512.0, seed_runs: Sequence[str | os.PathLike] = ()) -> dict:
    """The matrix for a two-stage run directory (and optionally a single-stage one) on its stage-2 source's test
    split, written to ``run_dir/eval/``. ``ood``: phantoms with another seed for a phantom run, or PathVQA at
    ``ood_path``. ``seed``: default the run's seed. ``feature_cache_mb``: per-actor image-feature cache (0: off).
    ``seed_runs``: more run directories of the same model trained with other seeds (``run.seed``): every run of the
    model is then evaluated as ``<model>@<seed>`` and summarised across seeds (``seed_summary``)."""
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
        name = "two_stage" if cfg.stage1.enabled else "single_stage"  # a run without stage 1 is the baseline
        if cfg.stage1.enabled:
            models["single_stage"] = single_stage
        if seed_runs:
            for rd in [run_dir, *seed_runs]:
                rc = load_run_config(rd)
                if rc.stage1.enabled != cfg.stage1.enabled:
                    raise ValueError(f"{rd}: not the same kind of run as {run_dir} (stage1.enabled differs)")
                key = f"{name}{SEED_SEP}{rc.run.seed}"
                if key in models:
                    raise ValueError(f"two runs of {name} with seed {rc.run.seed}: {models[key]} and {rd}")
                models[key] = rd
        else:
            models[name] = run_dir
    out = run_matrix(cfg, models, test, Path(run_dir) / "eval", conditions=conditions, seed=seed,
                     max_new_tokens=max_new_tokens, concurrency=concurrency, cpus_per_actor=cpus_per_actor,
                     batch_size=batch_size, medhalt_path=medhalt_path, medhalt_limit=medhalt_limit,
                     ood_records=ood_records, feature_cache_mb=feature_cache_mb)
    from medvqa.tracking import log_evaluation  # per-cell metrics to the run's MLflow run (run.tracking=mlflow)

    log_evaluation(cfg, run_dir, out.get("metrics", {}))
    return out
