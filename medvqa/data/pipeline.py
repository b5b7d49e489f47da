"""Ray Data: source records -> validated Arrow records in the run dir -> model inputs streamed into Train workers.

Two passes, both streaming (no step ever holds the whole data set):
1. ``prepare_records``: source adapter -> ``validate_batch`` (decode check, content hash, normalisation) in parallel
   tasks -> valid rows written as parquet under ``data/<stage>/``; rejected rows are written by the same tasks to
   ``rejects/<stage>/`` (no image bytes), then gathered into ``rejects/<stage>.jsonl`` with a manifest. The run stops
   when rejects exceed ``run.max_reject_fraction``. A finished stage is reused on restart. Both folders are in the run
   directory's storage (``medvqa.storage``: a bucket on a cluster), so tasks on any node write there and the driver
   collects every reject, never one left on a node's disk.
2. ``training_dataset``: one worker's part of one epoch, in a seeded order (``rank_plan``) -> read tasks that take
   just those records out of the prepared parquet -> ``preprocess_batch`` (image decode/resize and the processor's chat
   template, labels masked with -100 outside the answer) in parallel tasks; ``collate`` pads micro-batches on the
   worker.

Data order. An epoch's order is a pure function of (``run.seed``, epoch, the prepared records): the row groups of the
prepared parquet, in a canonical order (by their records' ids, not by Ray's random file names, so a re-prepared stage
orders the same), are permuted with a generator seeded by (seed, epoch); consecutive groups form windows of at least
``SHUFFLE_WINDOW`` records, and each window's records are permuted too. Worker ``rank`` of ``world`` takes the
positions ``i % world == rank`` (``num_records // world`` of them, the same number on every worker). A window is read
once and its records shuffled in memory, so the shuffle costs no random access into the parquet: records mix across
the whole data set at row-group granularity and fully within a window. A checkpoint's position (micro-batches done in
the epoch) then names exactly the records already trained on, and a resumed worker's dataset starts after them:
skipped records are never read or preprocessed.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
from collections.abc import Sequence
from io import BytesIO
from typing import Any

import numpy as np

from medvqa.config import DataConfig, ResourcesConfig, StageConfig, node_resources
from medvqa.prompts import prompt_text
from medvqa.storage import StoragePath

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # torch.nn.CrossEntropyLoss's ignore_index: positions that carry no loss
_RAW_CHUNK = 64  # raw records per Ray Data block when reading from a driver-side iterator
_DRIVER_CHUNK = 4096  # raw records the driver reads from an adapter before handing them to Ray Data
_ROWS_PER_FILE = 1024  # prepared records per parquet file
_ROWS_PER_BLOCK = 32  # records per preprocessing task: small enough to spread over the tasks, large enough to amortise
SHUFFLE_WINDOW = 1024  # records shuffled together in memory (raw bytes: ~100 MB of 100 KB images per window in flight)
_ORDER_SALT = 0x0D_A7A0  # keeps the data order's generator apart from others seeded with run.seed
_READ_COLUMNS = ["id", "image", "prompt", "target"]
_MANIFEST_COLUMNS = ["id", "image_id", "split", "source", "answer_type", "question_type"]


def configure_data_context(resources: ResourcesConfig) -> None:
    import ray

    ctx = ray.data.DataContext.get_current()
    if resources.data_buffer_mb:
        ctx.execution_options.resource_limits = ray.data.ExecutionResources.for_limits(
            object_store_memory=resources.data_buffer_mb * 2**20)
    ctx.execution_options.preserve_order = True  # batches arrive in the planned order: the data position is exact
    # Our log lines carry the progress (step/total, loss, throughput); Ray Data's per-operator bars would bury them
    # in the job log (the dashboard still shows every operator).
    ctx.enable_progress_bars = False


class TooManyRejects(RuntimeError):
    """More records failed validation than ``run.max_reject_fraction`` allows."""


# ------------------------------------------------------------------------------------------------- pass 1


def _phantom_batch(batch: dict, task: str, seed: int, split: str, anatomy: str) -> dict:
    from medvqa.data.phantoms import phantom_record

    rows = [phantom_record(int(i), task, seed, split, anatomy) for i in batch["id"]]
    return {k: [r.get(k) for r in rows] for k in rows[0]}


def raw_datasets(data: DataConfig, parallelism: int = 8, remote_args: dict | None = None):
    """Ray Datasets of raw (unvalidated) records of ``data.split`` under ``data.protocol``, one after another.
    Phantoms are generated inside tasks from their index (one dataset; the indices are made in the driver, so no read
    task needs placing), with ``remote_args`` (the validation tasks' CPUs and resources). Other sources are read by
    their adapter (``protocol.iter_protocol_records``) in the driver, ``_DRIVER_CHUNK`` records at a time: folder
    layouts yield cheap pointer records (paths, decoded by the tasks), HF sources yield image bytes, so the driver
    holds at most one chunk of them, never the whole set."""
    import itertools

    import ray

    if data.kind == "phantom":
        n = data.limit if data.limit is not None else data.num_records
        yield ray.data.from_items([{"id": i} for i in range(n)],
                                  override_num_blocks=max(1, min(parallelism, n // _RAW_CHUNK or 1))).map_batches(
            _phantom_batch, fn_kwargs={"task": data.task, "seed": data.seed, "split": data.split,
                                       "anatomy": data.phantom_anatomy},
            batch_format="numpy", batch_size=_RAW_CHUNK, **(remote_args or {}))
        return
    from medvqa.data.protocol import iter_protocol_records

    records = iter_protocol_records(data)  # the split under data.protocol (official: as released)
    empty = True
    while chunk := list(itertools.islice(records, _DRIVER_CHUNK)):
        empty = False
        keys = sorted({k for r in chunk for k in r})  # a column a record lacks becomes None (then validated)
        chunk = [{k: r.get(k) for k in keys} for r in chunk]
        blocks = max(1, min(parallelism * 4, len(chunk) // _RAW_CHUNK or 1))
        yield ray.data.from_items(chunk, override_num_blocks=blocks)
    if empty:
        raise ValueError(f"data source {data.kind}:{data.path} split={data.split!r} has no records")


def in_validation(image_id: str, fraction: float, seed: int) -> bool:
    """Whether an image belongs to the validation part carved out of a training split (``data.validation_fraction``).

    A pure function of the image's content hash, so every question about an image lands on the same side (the split
    is image-disjoint), streaming tasks need no shared state, and the carve is the same in every run with the same
    seed. The fraction is approximate: each image is in with probability ``fraction``."""
    if fraction <= 0 or not image_id:
        return False
    digest = hashlib.sha1(f"validation:{seed}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2.0**64


def _validate_and_split(batch: dict, rejects_dir: str | None, part: str = "all", fraction: float = 0.0,
                        seed: int = 0) -> dict:
    """Validate a batch; write its rejects (without image bytes) to a part file named by the batch's ids, so a
    retried task overwrites rather than duplicates; return only the valid rows of ``part``: 'all', or with a
    validation ``fraction`` the 'train' or the 'validation' side of the carve (rejects are written by the 'train'
    pass only, so each is counted once)."""
    from medvqa.data.records import validate_batch

    out = validate_batch(batch)
    reasons = out["reject_reason"]
    bad = [i for i, r in enumerate(reasons) if r]
    if bad and rejects_dir is not None:
        key = hashlib.sha1("\n".join(str(out["id"][i]) for i in bad).encode()).hexdigest()[:16]
        lines = [json.dumps({k: v[i] for k, v in out.items() if k != "image"}, default=str) + "\n" for i in bad]
        (StoragePath(rejects_dir) / f"part-{key}.jsonl").write_text("".join(lines))
    keep = [i for i, r in enumerate(reasons) if not r]
    if part != "all":
        wanted = part == "validation"
        keep = [i for i in keep if in_validation(out["image_id"][i], fraction, seed) == wanted]
    return {k: [v[i] for i in keep] for k, v in out.items()}


def prepare_records(data: DataConfig, out_dir: StoragePath, rejects_dir: StoragePath, resources: ResourcesConfig,
                    max_reject_fraction: float, part: str = "train") -> dict:
    """Validate ``data`` into parquet at ``out_dir``; return (and write) the manifest. Idempotent: reuses a finished
    ``out_dir`` (its manifest.json is written last). With ``data.validation_fraction`` > 0, ``part`` picks the
    training side ('train') or the carved validation side ('validation', which writes no rejects: the training pass
    counts them); without it every valid record is kept. The records are those of ``data.split`` under
    ``data.protocol`` (``medvqa.data.protocol``), so the validation carve always comes from the training side."""
    if part not in ("train", "validation"):
        raise ValueError(f"part must be 'train' or 'validation', got {part!r}")
    if part == "validation" and not data.validation_fraction:
        raise ValueError("part='validation' needs data.validation_fraction > 0")
    carve = "all" if not data.validation_fraction else part
    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray.data import TaskPoolStrategy

    from medvqa.data.records import SCHEMA, reject_summary

    out_dir, rejects_dir = StoragePath(out_dir), StoragePath(rejects_dir)
    manifest_path = out_dir / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        log.info("reusing prepared records %s (%d valid, %d rejected)", out_dir, manifest["valid"],
                 manifest["rejected"])
        _check_rejects(manifest, max_reject_fraction)
        return manifest
    configure_data_context(resources)
    for d in (out_dir, rejects_dir):
        d.rmtree()
        d.mkdir()
    remote_args = {"num_cpus": resources.data_cpus_per_task, "resources": node_resources(resources)}
    for raw in raw_datasets(data, remote_args=remote_args):  # write_parquet adds files, one chunk after another
        raw.map_batches(
            _validate_and_split, fn_kwargs={"rejects_dir": None if part == "validation" else str(rejects_dir),
                                            "part": carve, "fraction": data.validation_fraction, "seed": data.seed},
            batch_format="numpy", batch_size=_RAW_CHUNK, **remote_args,
            compute=TaskPoolStrategy(size=resources.data_concurrency),
        ).write_parquet(out_dir.path, filesystem=out_dir.fs, schema=SCHEMA, max_rows_per_file=_ROWS_PER_FILE,
                        ray_remote_args={"resources": remote_args["resources"]})

    # Counts from a column projection of the written files (no image bytes read back).
    files = out_dir.glob("*.parquet")
    table = (pa.concat_tables([pq.read_table(f.path, filesystem=f.fs, columns=_MANIFEST_COLUMNS) for f in files])
             if files else None)
    rejects = [json.loads(line) for p in rejects_dir.glob("part-*.jsonl") for line in p.read_text().splitlines()]
    rejects.sort(key=lambda r: str(r.get("id")))
    rejects_file = rejects_dir.with_suffix(".jsonl")
    rejects_file.write_text("".join(json.dumps(r) + "\n" for r in rejects))
    rejects_dir.rmtree()
    valid = table.num_rows if table is not None else 0
    reasons = reject_summary(rejects)  # by reason prefix ('missing image'), not per file path
    manifest = {
        "source": data.kind, "path": data.path, "split": data.split, "protocol": data.protocol,
        "limit": data.limit, "seed": data.seed,
        "part": carve, "validation_fraction": data.validation_fraction,
        "total": valid + len(rejects), "valid": valid, "rejected": len(rejects),
        "reject_reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
        "rejects_file": str(rejects_file),
        "unique_images": len(set(table.column("image_id").to_pylist())) if table is not None else 0,
        "answer_types": _counts(table, "answer_type"),
        "question_types": _counts(table, "question_type"),
        "sources": _counts(table, "source"),
    }
    manifest_path.write_text(json.dumps(manifest, indent=2))
    _check_rejects(manifest, max_reject_fraction)
    return manifest


def _counts(table, column: str) -> dict:
    if table is None:
        return {}
    values = table.column(column).to_pylist()
    return {str(k): values.count(k) for k in sorted(set(values), key=str)}


def _check_rejects(manifest: dict, max_fraction: float) -> None:
    total, rejected = manifest["total"], manifest["rejected"]
    if total == 0 or manifest["valid"] == 0:
        raise TooManyRejects(f"no valid records in {manifest['source']}:{manifest['path']} "
                             f"({rejected} rejected; reasons {manifest['reject_reasons']}; see "
                             f"{manifest['rejects_file']})")
    if rejected / total > max_fraction:
        raise TooManyRejects(
            f"{rejected} of {total} records ({rejected / total:.1%}) were rejected, more than "
            f"run.max_reject_fraction={max_fraction:.1%}; reasons: {manifest['reject_reasons']}; each rejected record "
            f"and its reason is in {manifest['rejects_file']}. Fix the data or raise run.max_reject_fraction.")


# ------------------------------------------------------------------------------------------------- pass 2


@functools.lru_cache(maxsize=4)
def cached_processor(model_path: str, do_image_splitting: bool, longest_edge: int | None):
    """One processor per Ray worker process (tasks reuse their process), not one per batch. Image splitting and the
    longest edge are set on the image processor object: set per call, ``do_image_splitting`` splits images without
    expanding the <image> tokens and the forward pass fails (GUIDE §5)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_path)
    processor.image_processor.do_image_splitting = do_image_splitting
    if longest_edge:
        size = processor.image_processor.size  # a SizeDict dataclass in transformers 5, a dict before
        processor.image_processor.size = (dataclasses.replace(size, longest_edge=longest_edge)
                                          if dataclasses.is_dataclass(size) else {**size, "longest_edge": longest_edge})
    return processor


def decode_image(data: bytes):
    from PIL import Image

    image = Image.open(BytesIO(data))
    return image.convert("RGB")


def encode_example(processor, image, instruction: str, question: str, target: str | None, max_length: int,
                   examples: Sequence[tuple[Any, str, str]] = ()) -> dict:
    """Token ids, labels and pixels for one example.

    The prompt (user turn with the expanded image tokens, up to "Assistant:") and the answer are tokenised
    separately and concatenated, so the label boundary is exact (no BPE merge across it). Labels are -100 on the
    whole prompt (and therefore on every image token); only the answer and its <end_of_utterance> are trained.
    With ``target=None`` only the prompt is encoded (for generation). ``examples``: (image, question, answer)
    few-shot turns before the question (``prompts.prompt_text``); their images come first in ``pixel_values``.
    """
    prompt = prompt_text(processor, instruction, question, [(q, a) for _, q, a in examples])
    # Resize here, rescale/normalise in collate: uint8 pixels are a quarter of float32's bytes through Ray's object
    # store (a 980 px image is 2.9 MB instead of 11.5 MB), and the result is identical (PIL resizes in uint8).
    enc = processor(text=[prompt], images=[[*(im for im, _, _ in examples), image]], return_tensors="np",
                    do_rescale=False, do_normalize=False)
    prompt_ids = enc["input_ids"][0].astype(np.int64)
    out = {"pixel_values": np.clip(np.round(enc["pixel_values"][0]), 0, 255).astype(np.uint8),  # [n_img, 3, H, W]
           "pixel_attention_mask": enc["pixel_attention_mask"][0].astype(bool)}
    if target is None:
        out["input_ids"] = prompt_ids
        return out
    tok = processor.tokenizer
    eou = tok.convert_tokens_to_ids("<end_of_utterance>")
    answer_ids = np.asarray(tok(" " + target, add_special_tokens=False)["input_ids"] + [eou], dtype=np.int64)
    room = max(max_length - len(prompt_ids), 1)  # truncate the answer, never the prompt (it holds the image)
    answer_ids = answer_ids[:room]
    out["input_ids"] = np.concatenate([prompt_ids, answer_ids])
    out["labels"] = np.concatenate([np.full(len(prompt_ids), IGNORE_INDEX, dtype=np.int64), answer_ids])
    return out


def preprocess_batch(batch: dict, model_path: str, instruction: str, max_length: int, do_image_splitting: bool,
                     longest_edge: int | None) -> dict:
    """Ray Data UDF: prepared records -> unpadded model inputs (one row per example; padding happens in collate)."""
    processor = cached_processor(model_path, do_image_splitting, longest_edge)
    rows = [encode_example(processor, decode_image(img), instruction, str(q or ""), str(t), max_length)
            for img, q, t in zip(batch["image"], batch["prompt"], batch["target"])]
    return to_arrow(rows, ids=list(batch["id"]))


def to_arrow(rows: list[dict], ids: list):
    """Encoded examples as an Arrow table of plain columns: token ids as list<int32>, pixels and masks as raw bytes
    with their shape. Ray's tensor extension types for ragged arrays cost milliseconds per row to build and read
    back; bytes move through the object store and come back with ``np.frombuffer`` without a copy."""
    import pyarrow as pa

    table = {"id": pa.array([str(i) for i in ids])}
    for key in ("input_ids", "labels"):
        if key in rows[0]:
            table[key] = pa.array([r[key].astype(np.int32) for r in rows], type=pa.list_(pa.int32()))
    for key in ("pixel_values", "pixel_attention_mask"):
        table[key] = pa.array([np.ascontiguousarray(r[key]).tobytes() for r in rows], type=pa.binary())
        table[key + "_shape"] = pa.array([list(r[key].shape) for r in rows], type=pa.list_(pa.int32()))
    return pa.table(table)


def _unpack(batch: dict, key: str, dtype) -> list:
    """Pixel arrays from ``to_arrow``'s bytes + shape columns (or arrays as they are, e.g. built in a test)."""
    if key + "_shape" not in batch:
        return [np.asarray(x, dtype=dtype) for x in batch[key]]
    return [np.frombuffer(b, dtype=dtype).reshape(tuple(shape)) for b, shape in zip(batch[key], batch[key + "_shape"])]


@dataclasses.dataclass(frozen=True)
class RowGroup:
    """One row group of the prepared parquet: where it is (a path or URI), how many records, and its canonical sort
    key."""

    file: str
    index: int
    rows: int
    key: tuple


def _parquet_file(location: str | StoragePath):
    import pyarrow.parquet as pq

    sp = StoragePath(location)
    return pq.ParquetFile(sp.fs.open_input_file(sp.path))


def record_index(records_dir: StoragePath) -> list[RowGroup]:
    """The prepared records' row groups in canonical order: by first record id, then a hash of all their ids. Only
    the id column is read."""
    groups = []
    for f in StoragePath(records_dir).glob("*.parquet"):
        pf = _parquet_file(f)
        for g in range(pf.num_row_groups):
            ids = [str(i) for i in pf.read_row_group(g, columns=["id"]).column("id").to_pylist()]
            if ids:
                key = (ids[0], hashlib.sha1("\n".join(ids).encode()).hexdigest())
                groups.append(RowGroup(str(f), g, len(ids), key))
    if not groups:
        raise FileNotFoundError(f"no prepared records under {records_dir}")
    return sorted(groups, key=lambda g: g.key)


def epoch_order(index: list[RowGroup], seed: int, epoch: int) -> list[tuple[list[int], np.ndarray]]:
    """The epoch's windows, in order: (row groups, as positions in ``index``; the order of the window's records, as
    positions in those groups' rows concatenated)."""
    rng = np.random.default_rng([_ORDER_SALT, seed, epoch])
    windows, current, rows = [], [], 0
    for g in rng.permutation(len(index)).tolist():
        current.append(g)
        rows += index[g].rows
        if rows >= SHUFFLE_WINDOW:
            windows.append(current)
            current, rows = [], 0
    if current:
        windows.append(current)
    return [(w, rng.permutation(sum(index[g].rows for g in w))) for w in windows]


def rank_plan(index: list[RowGroup], seed: int, epoch: int, rank: int = 0, world: int = 1,
              start: int = 0) -> list[dict]:
    """Read tasks for worker ``rank``'s records of ``epoch``, from its ``start``-th record on. Each task is one window:
    ``files`` and ``row_groups`` to read (only those holding wanted records) and ``rows``, positions in their
    concatenation, in training order."""
    per_rank = sum(g.rows for g in index) // world
    tasks, offset = [], 0  # offset: position of the window's first record in the epoch's order
    for groups, order in epoch_order(index, seed, epoch):
        mine = np.flatnonzero((offset + np.arange(len(order))) % world == rank)  # this worker's window positions
        numbers = (offset + world - 1 - rank) // world + np.arange(len(mine))  # their numbers in its order
        offset += len(order)
        keep = mine[(numbers >= start) & (numbers < per_rank)]
        if not len(keep):
            continue
        rows = order[keep]  # positions among the window's records (its groups concatenated)
        sizes = np.array([index[g].rows for g in groups])
        group_of = np.searchsorted(np.cumsum(sizes), rows, side="right")
        unread = np.ones(len(groups), dtype=bool)
        unread[group_of] = False  # groups without a wanted record (a resumed window) are not read ...
        rows = rows - np.cumsum(np.where(unread, sizes, 0))[group_of]  # ... so positions shift past them
        read = [groups[i] for i in np.flatnonzero(~unread)]
        tasks.append({"files": [index[g].file for g in read], "row_groups": [index[g].index for g in read],
                      "rows": rows.tolist()})
    return tasks


def _read_planned(batch):
    """Ray Data UDF: one ``rank_plan`` task -> its records (prepared columns), in the planned order."""
    import pyarrow as pa

    out = []
    for files, groups, rows in zip(batch["files"].to_pylist(), batch["row_groups"].to_pylist(),
                                   batch["rows"].to_pylist()):
        table = pa.concat_tables([_parquet_file(f).read_row_group(g, columns=_READ_COLUMNS)
                                  for f, g in zip(files, groups)])
        out.append(table.take(rows))
    return pa.concat_tables(out)


def training_dataset(records_dir: StoragePath, stage: StageConfig, model_path: str, resources: ResourcesConfig,
                     do_image_splitting: bool = False, longest_edge: int | None = None, seed: int = 0,
                     epoch: int = 0, rank: int = 0, world: int = 1, start: int = 0,
                     index: list[RowGroup] | None = None):
    """Streaming Ray Dataset of model inputs: worker ``rank``'s records of ``epoch`` in the seeded order, from its
    ``start``-th record on (a resumed epoch; the skipped records are not read). ``index``: ``record_index`` of
    ``records_dir``, when the caller keeps it across epochs."""
    import ray
    from ray.data import TaskPoolStrategy

    configure_data_context(resources)
    plan = rank_plan(index or record_index(records_dir), seed, epoch, rank, world, start)
    if not plan:
        raise ValueError(f"worker {rank} of {world}: nothing left of epoch {epoch} after record {start}")
    # Reading a window is quick next to preprocessing its ~1k records: two read tasks keep the preprocessing fed and
    # bound the raw bytes in flight.
    placement = node_resources(resources)
    ds = ray.data.from_items(plan, override_num_blocks=len(plan)).map_batches(
        _read_planned, batch_format="pyarrow", batch_size=1, num_cpus=resources.data_cpus_per_task,
        resources=placement, compute=TaskPoolStrategy(size=min(2, resources.data_concurrency)))
    # A window is one block; re-block (streaming, order kept) so the preprocessing tasks run in parallel.
    ds = ds.repartition(target_num_rows_per_block=_ROWS_PER_BLOCK)
    return ds.map_batches(
        preprocess_batch,
        fn_kwargs={"model_path": model_path, "instruction": stage.prompt, "max_length": stage.max_length,
                   "do_image_splitting": do_image_splitting, "longest_edge": longest_edge},
        batch_format="numpy", batch_size=16, num_cpus=resources.data_cpus_per_task, zero_copy_batch=True,
        resources=placement, compute=TaskPoolStrategy(size=resources.data_concurrency))


def collate_fn_for(processor):
    """``collate`` bound to a processor's pad token and pixel normalisation, for ``iter_torch_batches``."""
    ip = processor.image_processor
    return functools.partial(collate, pad_token_id=processor.tokenizer.pad_token_id, image_mean=ip.image_mean,
                             image_std=ip.image_std, rescale_factor=ip.rescale_factor)


def collate(batch: dict[str, Any], pad_token_id: int, image_mean=None, image_std=None,
            rescale_factor: float = 1 / 255) -> dict:
    """Pad a micro-batch on the worker: right padding (training), labels -100 and attention 0 on pad positions;
    uint8 pixels are rescaled and normalised (as the image processor would) when ``image_mean``/``image_std`` are
    given, then zero-padded to the largest image with pixel_attention_mask marking real pixels."""
    import torch

    ids = [np.asarray(x, dtype=np.int64) for x in batch["input_ids"]]
    n, length = len(ids), max(len(x) for x in ids)
    input_ids = torch.full((n, length), pad_token_id, dtype=torch.long)
    attention = torch.zeros((n, length), dtype=torch.long)
    labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.from_numpy(x)
        attention[i, : len(x)] = 1
        if "labels" in batch:
            labels[i, : len(x)] = torch.from_numpy(np.asarray(batch["labels"][i], dtype=np.int64))
    pixels = [p.astype(np.float32) for p in _unpack(batch, "pixel_values", np.uint8)]
    masks = _unpack(batch, "pixel_attention_mask", bool)
    n_img = max(p.shape[0] for p in pixels)
    h, w = max(p.shape[-2] for p in pixels), max(p.shape[-1] for p in pixels)
    pixel_values = torch.zeros((n, n_img, 3, h, w), dtype=torch.float32)
    pixel_mask = torch.zeros((n, n_img, h, w), dtype=torch.bool)
    if image_mean is not None:
        mean = np.asarray(image_mean, np.float32).reshape(1, 3, 1, 1)
        std = np.asarray(image_std, np.float32).reshape(1, 3, 1, 1)
        pixels = [(p * np.float32(rescale_factor) - mean) / std for p in pixels]
    for i, (p, m) in enumerate(zip(pixels, masks)):
        pixel_values[i, : p.shape[0], :, : p.shape[-2], : p.shape[-1]] = torch.from_numpy(p)
        pixel_mask[i, : m.shape[0], : m.shape[-2], : m.shape[-1]] = torch.from_numpy(m)
    out = {"input_ids": input_ids, "attention_mask": attention, "pixel_values": pixel_values,
           "pixel_attention_mask": pixel_mask}
    if "labels" in batch:
        out["labels"] = labels
    return out
