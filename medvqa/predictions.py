"""Prediction storage of the evaluation matrix: one parquet per (model, condition) cell, streamed in parts and keyed
by what produced the answers.

Layout under an evaluation folder (a run's ``eval/``)::

    predictions/<model>/<condition>/<key>.parquet   a finished cell: one row per question, in the cell's order
    predictions/<model>/<condition>/<key>.parts/    its streamed batches (one atomic parquet each) until complete
    predictions/<model>/<condition>/<key>.json      what produced it (``producer``) and its number of questions

``key`` hashes the producer (base model config, adapter contents, device, decoding) and the cell's question rows
(ids, questions, images shown by content hash, instruction, few-shot examples with their images' hashes, answers):
changing any of them predicts the cell anew under a new key, so old and new answers never mix, and the old cell
stays where it was.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
from collections.abc import Mapping, Sequence

import pandas as pd

from medvqa.runs import write_json
from medvqa.storage import StoragePath

#: the question columns of a prediction row (plus ``model``); with the answers, every column of a cell parquet
QUESTION_COLUMNS = ("condition", "question_id", "image_id_shown", "true_image_id", "prompt", "true_answer",
                    "answer_type", "question_type", "source", "instruction", "swap_match", "shots")
ROW_COLUMNS = ("model", *QUESTION_COLUMNS)
CELL_COLUMNS = (*ROW_COLUMNS, "raw_prediction", "predicted_answer")
_KEY_CHARS = 16


def _sha256(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def adapter_hash(folder: str | os.PathLike) -> str:
    """sha256 of an adapter folder's files (relative names and bytes): its content, wherever it lives (a folder or
    a URI)."""
    h = hashlib.sha256()
    root = StoragePath(folder)
    for f in sorted(root.rglob_files(), key=lambda f: f.relative_to(root).parts):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def producer(model: Mapping, adapters: Mapping[str, str], use_gpu: bool, max_new_tokens: int) -> dict:
    """What produces a model's answers: the base model config (``cfg.model`` as a dict; ``cache_dir`` left out, it
    only says where the tiny model is cached), the adapters by content, the device (bf16 compute on a GPU, fp32 on a
    CPU) and greedy decoding with ``max_new_tokens``. Batch size and the feature cache are left out: answers do not
    depend on them (left-padded greedy decoding; tests/test_infer.py)."""
    return {"model": {k: v for k, v in model.items() if k != "cache_dir"},
            "adapters": {name: adapter_hash(path) for name, path in adapters.items()},
            "device": "cuda" if use_gpu else "cpu",
            "decoding": {"do_sample": False, "num_beams": 1, "max_new_tokens": max_new_tokens}}


def cell_key(produced_by: Mapping, rows: Sequence[Mapping]) -> str:
    """The key of a cell: its producer and its question rows, in order. A row's few-shot examples (``shots``) join
    its key only when it has some, so the cells of every other condition keep the keys they had before few-shot
    conditions existed (their stored predictions stay valid)."""
    questions = [[str(r.get(c, "")) for c in QUESTION_COLUMNS if c != "shots"]
                 + ([r["shots"]] if r.get("shots") else []) for r in rows]
    return _sha256({"producer": produced_by, "questions": questions})[:_KEY_CHARS]


def _write_parquet(df: pd.DataFrame, path: StoragePath) -> None:
    """Atomic (``StoragePath.write_bytes``): a crash never leaves a half-written file that a resume would take as
    done."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False), buf)
    path.write_bytes(buf.getvalue())


def read_frame(path: str | os.PathLike, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """A parquet file (a cell, a part) from a folder or a URI, as a DataFrame."""
    sp = StoragePath(path)
    return pd.read_parquet(sp.path, filesystem=sp.fs, columns=list(columns) if columns else None)


class CellWriter:
    """The cells of one model under ``out_dir``: which questions are done, streamed parts in, finished cells out.

    ``cells``: condition -> its question rows (``conditions.build_cells``); ``produced_by``: ``producer(...)`` of the
    model. A finished cell is done; a cell with parts keeps their questions (files that are not whole parts, e.g. a
    killed write's ``*.tmp``, are ignored) and is finalized at once when they are complete. ``pending()``: rows still
    to predict; ``add(df)``: prediction rows of any cells -> parts, and every cell that becomes complete is written.
    """

    def __init__(self, out_dir: str | os.PathLike, model: str, cells: Mapping[str, Sequence[Mapping]],
                 produced_by: Mapping):
        self.out_dir, self.model, self.cells = StoragePath(out_dir), model, cells
        self.keys = {c: cell_key(produced_by, rows) for c, rows in cells.items()}
        self.done: dict[str, set[str]] = {}  # condition -> question ids in parts (unfinished cells only)
        self.finished: list[str] = []  # cells finished before this run
        self.written: list[str] = []  # cells finished by this writer
        self.reused_rows: dict[str, int] = {}  # condition -> rows kept from parts of an earlier run
        for c, rows in cells.items():
            if self.path(c).exists():
                self.finished.append(c)
                self.parts(c).rmtree()  # a crash between finishing and the clean-up
                continue
            if not self.path(c).with_suffix(".json").exists():
                write_json(self.path(c).with_suffix(".json"), {"model": model, "condition": c, "key": self.keys[c],
                                                               "n_questions": len(rows), "producer": produced_by})
            have = {q for f in self.parts(c).glob("*.parquet")
                    for q in read_frame(f, columns=["question_id"])["question_id"]}
            self.done[c] = have
            self.reused_rows[c] = len(have)
            if len(have) == len(rows):
                self._finalize(c)

    def path(self, condition: str) -> StoragePath:
        """The finished cell's parquet."""
        return self.out_dir / "predictions" / self.model / condition / f"{self.keys[condition]}.parquet"

    def parts(self, condition: str) -> StoragePath:
        """Where the cell's streamed batches accumulate until it is complete."""
        return self.path(condition).with_suffix(".parts")

    def pending(self) -> list[dict]:
        return [r for c, seen in self.done.items() for r in self.cells[c] if r["question_id"] not in seen]

    def add(self, df: pd.DataFrame) -> None:
        for c, part in df.groupby("condition", sort=False):
            if c not in self.done:
                raise ValueError(f"predictions for cell {self.model}/{c}, which is not being predicted")
            _write_parquet(part[list(CELL_COLUMNS)], self.parts(c) / f"{uuid.uuid4().hex}.parquet")
            self.done[c] |= set(part["question_id"])
            if len(self.done[c]) == len(self.cells[c]):
                self._finalize(c)

    def _finalize(self, c: str) -> None:
        df = pd.concat([read_frame(f) for f in self.parts(c).glob("*.parquet")], ignore_index=True)
        order = [r["question_id"] for r in self.cells[c]]
        df = df.drop_duplicates("question_id").set_index("question_id").loc[order].reset_index()
        _write_parquet(df[list(CELL_COLUMNS)], self.path(c))
        self.parts(c).rmtree()
        del self.done[c]
        self.written.append(c)
