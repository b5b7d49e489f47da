"""Evaluation protocols: which records of a source are training and which are test (``data.protocol``).

- ``official``: the source's splits as released. In VQA-RAD 446 of the 451 test questions have their image (by
  content hash) in training (GUIDE §3).
- ``image_disjoint``: the source's splits are pooled and re-split by image (``image_disjoint_split``): every image,
  with all its questions, lies on one side only, so no test image is ever trained on. Seeded by ``data.seed``,
  stratified by organ where the records name one (VQA-RAD ``image_organ``, SLAKE ``location``), about
  ``data.test_fraction`` of the questions on the test side.

One function of the data config decides both sides, so training (``pipeline.prepare_records``, whose validation carve
is then taken from the training side), the evaluation's test set and the report's leakage statement agree by
construction. Phantoms have one protocol: every phantom image is drawn anew, so their official split already shares no
image (the leakage statement measures it).

Pure functions over records: no Ray, no torch.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

from medvqa.config import DataConfig
from medvqa.data.records import parse_meta, validate_record

#: the splits of a source that the image-disjoint protocol pools (a 'validation' split is optional)
POOLED_SPLITS = {"vqa_rad": ("train", "test"), "vqa_rad_hf": ("train", "test", "validation"),
                 "slake": ("train", "validation", "test"), "pathvqa": ("train", "validation", "test"),
                 "pathvqa_hf": ("train", "validation", "test")}
#: the meta key the split is stratified by when the records carry it
STRATIFY_KEY = "organ"
SIDES = ("train", "test")


# ------------------------------------------------------------------------------------------------ the split


def _meta_value(row: dict, key: str) -> Any:
    if key in row and key != "meta":
        return row[key]
    return parse_meta(row.get("meta")).get(key)


def _group_key(row: dict) -> str:
    img = row.get("image_id")
    return f"image:{img}" if img else f"id:{row.get('id')}"  # no image: a group of its own


def image_disjoint_split(rows: Sequence[dict], test_fraction: float = 0.2, seed: int = 0,
                         stratify_by: str | None = None, names: tuple[str, str] = ("train", "test"),
                         ) -> tuple[list[dict], list[dict]]:
    """Split ``rows`` so that every image (by ``image_id``) lies on one side only.

    Images are visited in the order of sha1(seed, image_id), so the result depends on the seed and the set of
    images, not on the input order; an image goes to the test side when that brings the test side's question count
    closer to ``round(test_fraction * n)`` (per stratum when ``stratify_by`` names a row field or a meta key, e.g.
    ``'organ'``; an image's stratum is its questions' most common value). Rows are returned as copies, in input
    order, with ``split`` set to ``names``. Rows without an image_id are each their own group."""
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        groups[_group_key(r)].append(i)
    strata: dict[str, list[str]] = defaultdict(list)
    for g, members in groups.items():
        if stratify_by:
            values = Counter(str(_meta_value(rows[i], stratify_by)) for i in members)
            stratum = min(values.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        else:
            stratum = ""
        strata[stratum].append(g)
    test_groups: set[str] = set()
    for stratum in sorted(strata):
        order = sorted(strata[stratum], key=lambda g: hashlib.sha1(f"{seed}\0{g}".encode()).digest())
        target = round(test_fraction * sum(len(groups[g]) for g in order))
        count = 0
        for g in order:
            size = len(groups[g])
            if abs(count + size - target) < abs(count - target):
                test_groups.add(g)
                count += size
    train, test = [], []
    for r in rows:
        is_test = _group_key(r) in test_groups
        (test if is_test else train).append({**r, "split": names[1] if is_test else names[0]})
    return train, test


# ------------------------------------------------------------------------------------------------ protocols


def _source_splits(data: DataConfig) -> Iterator[tuple[str, Iterator[dict]]]:
    """(split, raw records) of every split the image-disjoint protocol pools, whole (no limit); a missing optional
    'validation' split is left out."""
    from medvqa.data.adapters import iter_raw_records

    if data.kind not in POOLED_SPLITS:
        raise ValueError(f"data.protocol=image_disjoint: no pooled splits for data.kind={data.kind!r} (VQA sources: "
                         f"{', '.join(POOLED_SPLITS)})")
    for split in POOLED_SPLITS[data.kind]:
        try:
            raw = iter_raw_records(dataclasses.replace(data, split=split, limit=None))
        except ValueError:
            if split == "validation":
                continue
            raise
        yield split, raw


@functools.lru_cache(maxsize=8)
def _disjoint_sides(kind: str, path: str, seed: int, test_fraction: float) -> dict:
    """{'train': ids, 'test': ids, 'stratify_by', 'splits': pooled split sizes} of the image-disjoint protocol. Every
    record of the pooled splits is validated once (its image read and hashed, the bytes dropped); a record that fails
    validation is assigned to a side too, with the other questions naming the same image file (or alone), so the
    pipeline rejects and counts it there."""
    data = DataConfig(kind=kind, path=path, seed=seed, test_fraction=test_fraction)
    rows, sizes = [], {}
    for split, raw in _source_splits(data):
        n = len(rows)
        for r in raw:
            v = validate_record(r)
            group = v["image_id"] if not v["reject_reason"] else f"name:{v['image_name']}" if v["image_name"] else ""
            rows.append({"id": v["id"], "image_id": group, "meta": v["meta"]})
        sizes[split] = len(rows) - n
    ids = Counter(r["id"] for r in rows)
    dup = [i for i, n in ids.items() if n > 1]
    if dup:
        raise ValueError(f"{kind} at {path}: record ids repeat across splits ({dup[:5]}), so the pooled records "
                         "cannot be re-split by id")
    stratify = STRATIFY_KEY if any(_meta_value(r, STRATIFY_KEY) not in (None, "") for r in rows) else None
    train, test = image_disjoint_split(rows, test_fraction=test_fraction, seed=seed, stratify_by=stratify)
    return {"train": frozenset(r["id"] for r in train), "test": frozenset(r["id"] for r in test),
            "stratify_by": stratify, "splits": sizes}


def side_ids(data: DataConfig) -> frozenset[str] | None:
    """The record ids of ``data.split`` ('train' or 'test') under the image-disjoint protocol, before any
    ``data.limit``; None under the official protocol and for phantoms (the split as released)."""
    if data.protocol == "official" or data.kind == "phantom":
        return None
    if data.split not in SIDES:
        raise ValueError(f"data.protocol=image_disjoint has the sides {SIDES}, not split {data.split!r} (carve a "
                         "validation set from the training side with data.validation_fraction)")
    return _disjoint_sides(data.kind, data.path, data.seed, data.test_fraction)[data.split]


def iter_protocol_records(data: DataConfig) -> Iterator[dict]:
    """Raw records of ``data.split`` under ``data.protocol``: ``adapters.iter_raw_records`` for the official split;
    for the image-disjoint one the pooled splits filtered to the side's ids (by id, before any image is read), then
    the seeded ``data.limit`` subset of the side (``adapters.subset_positions``: a larger limit is a superset)."""
    from medvqa.data.adapters import iter_raw_records, subset_positions

    ids = side_ids(data)
    if ids is None:
        yield from iter_raw_records(data)
        return
    if data.limit is not None:
        ordered = sorted(ids)
        ids = frozenset(ordered[i] for i in subset_positions(ordered, data.limit, data.seed))
    for split, raw in _source_splits(data):
        for r in raw:
            if str(r.get("id")) in ids:
                yield {**r, "split": data.split, "meta": _with_official_split(r.get("meta"), split)}


def _with_official_split(meta: Any, split: str) -> Any:
    """The record's meta with the split it has as released (``official_split``), so a re-split record says where it
    came from."""
    from medvqa.data.records import dump_meta

    return dump_meta({**parse_meta(meta), "official_split": split})


def protocol_records(data: DataConfig, keep_images: bool = True) -> tuple[list[dict], list[dict]]:
    """(valid, rejected) validated records of ``data.split`` under ``data.protocol`` (``records.valid_records``)."""
    from medvqa.data.records import valid_records

    return valid_records(iter_protocol_records(data), keep_images)


def describe(data: DataConfig) -> str:
    """One line naming the protocol of a data config, for logs and reports."""
    if data.kind == "phantom":
        return (f"phantoms (seed {data.seed}): train and test drawn from separate seeded streams; every image is "
                "drawn anew, so the split is image-disjoint as generated")
    if data.protocol == "official":
        return f"official split of {data.kind} at {data.path!r}"
    sides = _disjoint_sides(data.kind, data.path, data.seed, data.test_fraction)
    strat = f", stratified by {sides['stratify_by']}" if sides["stratify_by"] else ""
    pooled = " + ".join(f"{s} {n}" for s, n in sides["splits"].items())
    return (f"image-disjoint protocol on {data.kind} at {data.path!r}: the released splits ({pooled} records) pooled "
            f"and re-split by image (seed {data.seed}, test fraction {data.test_fraction}{strat}): "
            f"{len(sides['train'])} train / {len(sides['test'])} test records")
