"""Evaluation conditions: functions from test records to question rows, seeded and deterministic.

``true`` the test split as is; ``swapped`` each question on a *different* test image (same modality and organ when
the meta says so; GUIDE §3); ``blank`` each question on a uniform mid-gray image of its own image's size (the
image-blind baseline: what the model answers from the text alone); ``expert`` the expert-radiologist instruction;
``few_shot`` k solved examples from the training side (seeded per question, never from the test side, never on the
question's own image) as earlier chat turns; ``medhalt`` Med-HALT nonsense questions on random test images
(declining is right); ``ood`` another source's records as they are.

A row says everything that produced its answer: the image shown by content hash (``image_id_shown``), the
instruction and, for few-shot rows, the examples (``shots``: their ids, image hashes, questions and answers), so the
prediction cells keyed by their rows (``medvqa.predictions``) change whenever any of them does. The example images
travel beside it in ``shot_images`` (``pack_images``), which is not stored with the predictions.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import typing
import zlib
from collections.abc import Mapping, Sequence

import numpy as np

from medvqa import prompts
from medvqa.config import Condition
from medvqa.data.records import parse_meta

log = logging.getLogger(__name__)

CONDITIONS: tuple[str, ...] = typing.get_args(Condition)
#: meta keys a swapped image should share with the true one, most specific first
SWAP_KEYS = ("modality", "organ")


#: the uniform gray of the blank condition: mid-gray, which Idefics2's image normalisation (mean 0.5) maps to ~0
BLANK_GRAY = 128
_FRAME = 8  # bytes of the big-endian length before each packed image


def _row(record: Mapping, condition: str, instruction: str, image: bytes | None = None,
         image_id_shown: str | None = None, swap_match: str = "", shots: Sequence[Mapping] = ()) -> dict:
    """A question row: the record's question and answer, the image shown, the instruction to use and the few-shot
    examples before it (``shots``: records with an image)."""
    return {
        "condition": condition, "question_id": str(record["id"]),
        "image": bytes(record["image"] if image is None else image),
        "image_id_shown": str(record.get("image_id", "") if image_id_shown is None else image_id_shown),
        "true_image_id": str(record.get("image_id", "") or ""),
        "prompt": str(record.get("prompt") or ""), "true_answer": str(record.get("target") or ""),
        "answer_type": str(record.get("answer_type") or ""), "question_type": str(record.get("question_type") or ""),
        "source": str(record.get("source") or ""), "instruction": instruction, "swap_match": swap_match,
        "shots": json.dumps([{"id": str(x["id"]), "image_id": str(x["image_id"]), "question": str(x["prompt"]),
                              "answer": str(x["target"])} for x in shots]) if shots else "",
        "shot_images": pack_images([bytes(x["image"]) for x in shots]),
    }


def pack_images(images: Sequence[bytes]) -> bytes:
    """Several encoded images as one bytes value (each preceded by its length, 8 bytes big-endian): one binary
    column of one type for every row, with or without examples (b'' for none)."""
    return b"".join(len(b).to_bytes(_FRAME, "big") + b for b in images)


def unpack_images(data: bytes) -> list[bytes]:
    """The images of ``pack_images``."""
    data, out, pos = bytes(data or b""), [], 0
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + _FRAME], "big")
        out.append(data[pos + _FRAME:pos + _FRAME + n])
        pos += _FRAME + n
    return out


def examples_of(row: Mapping) -> list[tuple[bytes, str, str]]:
    """A row's few-shot examples as (image bytes, question, answer), in the order they are shown."""
    shots = json.loads(row.get("shots") or "[]")
    return [(img, s["question"], s["answer"]) for img, s in zip(unpack_images(row.get("shot_images")), shots)]


def _seeded_rng(seed: int, *keys: str) -> np.random.Generator:
    """A generator per (seed, keys): a question's draw depends on nothing else (order, other questions)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *(zlib.crc32(k.encode()) for k in keys)])


def _image_pool(records: Sequence[Mapping]) -> dict[str, tuple[bytes, dict]]:
    """image_id -> (bytes, meta) over records with an image, in sorted id order."""
    pool: dict[str, tuple[bytes, dict]] = {}
    for r in records:
        if r.get("image_id") and r["image_id"] not in pool:
            pool[r["image_id"]] = (bytes(r["image"]), parse_meta(r.get("meta")))
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
        candidates, level = swap_candidates(r["image_id"], parse_meta(r.get("meta")), pool)
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


@functools.lru_cache(maxsize=64)
def blank_image(width: int, height: int, gray: int = BLANK_GRAY) -> bytes:
    """A uniform gray RGB PNG of the given size."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (gray, gray, gray)).save(buf, format="PNG")
    return buf.getvalue()


def blank_condition(records: Sequence[Mapping], instruction: str, seed: int = 0) -> list[dict]:
    """Each question on a uniform mid-gray image of its own image's size (so the resize and the number of image
    tokens are those of the true condition; only the content is gone). ``image_id_shown``: the gray image's hash."""
    from PIL import Image

    rows = []
    for r in records:
        with Image.open(io.BytesIO(bytes(r["image"]))) as im:  # reads the header, not the pixels
            gray = blank_image(*im.size)
        rows.append(_row(r, "blank", instruction, image=gray, image_id_shown=hashlib.sha1(gray).hexdigest()))
    return rows


def few_shot_condition(records: Sequence[Mapping], instruction: str, seed: int = 0,
                       pool: Sequence[Mapping] = (), k: int = 1) -> list[dict]:
    """Each question after ``k`` solved examples drawn from ``pool`` (records of the training side, with images),
    seeded per question id, never on the question's own image (in the official VQA-RAD split most test images are
    also training images, and an example on the same image would hand over a linked answer)."""
    pool = sorted(pool, key=lambda x: str(x["id"]))  # the draw depends on the pool's content, not its order
    rows = []
    for r in records:
        candidates = [x for x in pool if x["image_id"] != r.get("image_id")]
        if len(candidates) < k:
            raise ValueError(f"few_shot: {len(candidates)} training examples on other images, fewer than k={k}")
        picks = _seeded_rng(seed, "few_shot", str(r["id"])).choice(len(candidates), size=k, replace=False)
        rows.append(_row(r, "few_shot", instruction, shots=[candidates[int(i)] for i in picks]))
    return rows


def build_cells(test_records: Sequence[Mapping], conditions: Sequence[str], instruction: str, seed: int = 0,
                medhalt_path: str | None = None, medhalt_limit: int | None = 100,
                ood_records: Sequence[Mapping] | None = None, medhalt_questions: Sequence[Mapping] | None = None,
                few_shot_pool: Sequence[Mapping] | None = None, few_shot_k: int = 1,
                few_shot_seed: int | None = None) -> dict[str, list[dict]]:
    """condition -> question rows (model-independent). A condition without its source (``ood`` without
    ``ood_records``, ``medhalt`` without ``medhalt_questions`` or a CSV, ``few_shot`` without a pool) is skipped
    with a log line; the caller lists it with its reason."""
    unknown = [c for c in conditions if c not in CONDITIONS]
    if unknown:
        raise ValueError(f"unknown condition(s) {unknown} (known: {', '.join(CONDITIONS)})")
    cells: dict[str, list[dict]] = {}
    for c in conditions:
        if c == "true":
            cells[c] = true_condition(test_records, instruction, seed)
        elif c == "swapped":
            cells[c] = swapped_condition(test_records, instruction, seed)
        elif c == "blank":
            cells[c] = blank_condition(test_records, instruction, seed)
        elif c == "expert":
            cells[c] = expert_condition(test_records, prompts.EXPERT_INSTRUCTION, seed)
        elif c == "few_shot":
            if not few_shot_pool:
                log.info("condition few_shot: no training examples, skipped")
                continue
            cells[c] = few_shot_condition(test_records, instruction, seed if few_shot_seed is None else few_shot_seed,
                                          few_shot_pool, few_shot_k)
        elif c == "medhalt":
            if not medhalt_path and not medhalt_questions:
                log.info("condition medhalt: no Med-HALT CSV (eval.medhalt_path), skipped")
                continue
            cells[c] = medhalt_condition(test_records, instruction, seed, medhalt_path, medhalt_limit,
                                         questions=medhalt_questions)
        elif c == "ood":
            if not ood_records:
                log.info("condition ood: no out-of-distribution records, skipped")
                continue
            cells[c] = ood_condition(ood_records, instruction, seed)
    for c, rows in cells.items():
        qids = [r["question_id"] for r in rows]
        if len(set(qids)) != len(qids):
            raise ValueError(f"condition {c}: question ids are not unique")
    return cells
