"""Unified record schema and validation: every source becomes rows of ``SCHEMA``; bad rows carry a reason.

A *raw* record is a dict with SCHEMA's keys, except that it may hold ``image_path`` (with ``image_root``, see *Path
confinement* below) instead of ``image`` bytes and its values may be messy (ints, None, NaN, numpy scalars, trailing
spaces, 'CLOSED '). ``validate_record`` turns one raw record into one SCHEMA row and never raises: a row that cannot
be used has a non-empty ``reject_reason`` of the form ``"<prefix>: <detail>"``, with a stable prefix from
``REASONS`` (grep/count by prefix); several problems are joined with ``"; "`` and ``reject_summary`` counts each.

Rules (decided here, relied on downstream):
- Text fields are stripped and internal whitespace is collapsed (VQA-RAD has tabs where commas were). Integers and
  finite floats are normalised to strings ('5', '2.5'); bools, lists, arrays, dicts are rejected ('non-string ...').
- A *caption* record is one whose prompt is '' and answer_type is '' (the stage instruction is added later).
  Every other record is a VQA record and needs a non-empty prompt.
- ``answer_type`` is lower-cased and stripped ('CLOSED ' -> 'closed'). On a VQA record a missing/empty answer type
  is inferred (closed when the target is yes/no, else open; the HF sources carry none); any other value is rejected
  ('bad answer_type'), rather than guessed.
- ``question_type`` is upper-cased (VQA-RAD has both 'OTHER' and 'Other').
- The image comes from ``image`` bytes, else from ``image_path``, and must decode with PIL. A record without either
  is rejected ('missing image') unless its meta says ``"needs_image": false`` (Med-HALT fake questions: the
  evaluation attaches an image later); such rows have ``image=b''`` and ``image_id=''``.
- **Path confinement.** A raw record whose ``image_path`` was built from a name in a dataset file carries
  ``image_root``, the dataset folder (the adapters set it). Such a path must resolve, symlinks followed, to a regular
  file inside the resolved folder; otherwise the record is rejected ('image path outside the dataset folder') and
  the file is never opened: a ``../../etc/passwd`` name, an absolute name, or a symlink inside the folder that
  points out of it. The folder itself may be reached through a symlink (it is resolved first). Symlinks that escape
  are refused because a downloaded archive can carry them as easily as a ``..`` name; keep a dataset's files under
  one folder (or link the whole folder). ``image_root=''`` admits no path. Any path that is not a regular file (a
  directory, a FIFO, a device) is 'unreadable image', unopened.
- ``image_id`` is the sha1 hex of the encoded bytes: identical files get the same id across splits and sources.
- ``meta`` is stored as a JSON object string with sorted keys; raw meta may be a dict, a JSON string or None.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import stat
from collections import Counter
from typing import Any, Iterable

import numpy as np
import pyarrow as pa

SCHEMA = pa.schema([
    pa.field("id", pa.string()),             # unique per source
    pa.field("image", pa.binary()),          # encoded image bytes; b'' when there is none
    pa.field("image_id", pa.string()),       # sha1 hex of ``image``; '' when there is none
    pa.field("image_name", pa.string()),     # original file name or ''
    pa.field("prompt", pa.string()),         # the question (VQA); '' for captions
    pa.field("target", pa.string()),         # the answer or caption
    pa.field("answer_type", pa.string()),    # 'closed' | 'open' for VQA; '' for captions
    pa.field("question_type", pa.string()),  # e.g. PRES, POS, MODALITY; '' when unknown
    pa.field("split", pa.string()),
    pa.field("source", pa.string()),         # vqa_rad, roco, pathvqa, medhalt, phantom, ...
    pa.field("meta", pa.string()),           # JSON object: organ, modality, lesion side, ...
    pa.field("reject_reason", pa.string()),  # '' when valid
])
COLUMNS = SCHEMA.names

# Stable reason prefixes (the part before ':').
REASONS = (
    "missing id", "missing split", "missing source",
    "missing image", "unreadable image", "empty image", "corrupt image", "image path outside the dataset folder",
    "empty prompt", "non-string prompt", "empty target", "non-string target",
    "bad answer_type", "non-string answer_type", "bad meta", "invalid record",
)
ANSWER_TYPES = ("closed", "open")
YES_NO = ("yes", "no")

_DECODE_CACHE: dict[str, str] = {}  # image sha1 -> '' or a reason; VQA-RAD has 2,248 questions over 315 images
_DECODE_CACHE_MAX = 200_000


def _missing(value: Any) -> bool:
    """None, NaN, pandas' NA/NaT (pandas batches) -- checked by type name: this module does not import pandas."""
    if value is None or type(value).__name__ in ("NAType", "NaTType"):
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return False


def _scalar(value: Any) -> Any:
    """numpy scalars -> Python scalars (np.str_/np.bytes_ are already str/bytes subclasses)."""
    if isinstance(value, np.generic) and not isinstance(value, (np.str_, np.bytes_)):
        return value.item()
    return value


def clean_text(value: Any) -> tuple[str, str]:
    """(normalised text, '' ) or ('', error kind) where kind is 'empty' or 'non-string: <type>'."""
    value = _scalar(value)
    if _missing(value):
        return "", "empty: None"
    if isinstance(value, bytes):
        return "", "non-string: bytes"
    if isinstance(value, bool):
        return "", "non-string: bool"
    if isinstance(value, int):
        return str(value), ""
    if isinstance(value, float):
        if not math.isfinite(value):
            return "", f"non-string: float {value}"
        return (str(int(value)) if value.is_integer() else repr(value)), ""
    if not isinstance(value, str):
        return "", f"non-string: {type(value).__name__}"
    text = " ".join(str(value).split())
    return text, ("" if text else "empty")


def _optional_text(value: Any) -> str:
    """Lenient text for descriptive fields (image_name, question_type): missing or odd values become ''/str()."""
    value = _scalar(value)
    if _missing(value):
        return ""
    return " ".join(str(value).split())


def _meta(value: Any) -> tuple[dict, str]:
    value = _scalar(value)
    if _missing(value) or (isinstance(value, str) and not value.strip()):
        return {}, ""
    if isinstance(value, dict):
        return dict(value), ""
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError as e:
            return {}, f"bad meta: not JSON ({e.msg})"
        if not isinstance(parsed, dict):
            return {}, f"bad meta: JSON {type(parsed).__name__}, not an object"
        return parsed, ""
    return {}, f"bad meta: {type(value).__name__}"


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, bytes):
        return f"<{len(o)} bytes>"
    return str(o)


def dump_meta(meta: dict) -> str:
    return json.dumps(meta, sort_keys=True, ensure_ascii=False, default=_json_default)


def image_hash(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def check_image_bytes(data: bytes) -> str:
    """'' when ``data`` decodes as an image, else a reason. Cached by content hash."""
    key = image_hash(data)
    if key in _DECODE_CACHE:
        return _DECODE_CACHE[key]
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (64, 64))  # JPEG: DCT-scaled decode, still reads every entropy-coded byte (~10x faster)
            im.load()
            reason = "" if im.width > 0 and im.height > 0 else "corrupt image: zero size"
    except Exception as e:  # noqa: BLE001 - PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        detail = "unknown image format" if type(e).__name__ == "UnidentifiedImageError" else str(e)[:120]
        reason = f"corrupt image: {type(e).__name__}: {detail}"  # no object addresses: reasons stay stable
    if len(_DECODE_CACHE) >= _DECODE_CACHE_MAX:
        _DECODE_CACHE.clear()
    _DECODE_CACHE[key] = reason
    return reason


def encode_pil(image: Any) -> bytes:
    """Encoded bytes of a PIL image, in its original format when PIL knows it (keeps JPEGs small), else PNG."""
    buf = io.BytesIO()
    fmt = image.format if image.format in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF") else "PNG"
    image.save(buf, format=fmt)
    return buf.getvalue()


def _confinement_error(path: str, root: str) -> str:
    """'' when ``path`` resolves (symlinks followed) inside the resolved folder ``root``, else the reject reason.
    Resolves names only: nothing is opened or read."""
    real_root = os.path.realpath(root) if root else ""
    real = os.path.realpath(path)
    if real_root and os.path.commonpath([real_root, real]) == real_root:
        return ""
    return f"image path outside the dataset folder: {path}"


def _load_image(raw: dict, needs_image: bool) -> tuple[bytes, str]:
    """(bytes, reason). Prefers ``image`` bytes over ``image_path``; a path with ``image_root`` is confined to it."""
    data, path = _scalar(raw.get("image")), _scalar(raw.get("image_path"))
    if isinstance(data, dict):  # HF Image feature with decode=False: {'bytes', 'path'}
        if _missing(path) or not str(path).strip():
            path = data.get("path")
        data = data.get("bytes")
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if hasattr(data, "save") and hasattr(data, "mode"):  # a PIL image (a decoded HF Image column)
        data = encode_pil(data)
    if isinstance(data, bytes) and data:
        return bytes(data), ""
    if not _missing(data) and not isinstance(data, bytes):
        return b"", f"corrupt image: image is {type(data).__name__}, not bytes"
    if _missing(path) or (isinstance(path, str) and not path.strip()):
        if isinstance(data, bytes):  # b'' given explicitly
            return b"", ("empty image: 0 bytes" if needs_image else "")
        return b"", ("missing image: no image or image_path" if needs_image else "")
    path = os.fspath(path)
    root = _scalar(raw.get("image_root"))
    if not _missing(root):
        err = _confinement_error(path, os.fspath(root))
        if err:
            return b"", err
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block open(), a device never end read()
            return b"", f"unreadable image: {path} (not a regular file)"
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return b"", f"missing image: {path}"
    except OSError as e:  # no permission, I/O error, a name too long
        return b"", f"unreadable image: {path} ({type(e).__name__})"
    if not data:
        return b"", f"empty image: 0 bytes at {path}"
    return data, ""


def validate_record(raw: dict) -> dict:
    """One raw record -> one SCHEMA row (a dict with exactly ``COLUMNS``). Never raises on bad input."""
    try:
        return _validate(raw)
    except Exception as e:  # noqa: BLE001 - a bug or an input nobody imagined must not kill a Ray task
        row = {c: "" for c in COLUMNS}
        row["image"] = b""
        row["id"] = _optional_text(raw.get("id")) if isinstance(raw, dict) else ""
        row["reject_reason"] = f"invalid record: {type(e).__name__}: {str(e)[:160]}"
        return row


def _validate(raw: dict) -> dict:
    reasons: list[str] = []
    meta, err = _meta(raw.get("meta"))
    if err:
        reasons.append(err)
    needs_image = meta.get("needs_image", True) is not False

    row: dict[str, Any] = {}
    for key in ("id", "split", "source"):
        text, err = clean_text(raw.get(key))
        row[key] = text
        if err:
            reasons.append(f"missing {key}" if err.startswith("empty") else f"missing {key}: {err}")

    image, err = _load_image(raw, needs_image)
    if not err and image:
        err = check_image_bytes(image)
    if err:
        reasons.append(err)
    row["image"] = image
    row["image_id"] = image_hash(image) if image else ""
    row["image_name"] = _optional_text(raw.get("image_name"))
    if not row["image_name"] and not _missing(_scalar(raw.get("image_path"))):
        row["image_name"] = os.path.basename(str(raw.get("image_path")))

    # Caption records: prompt '' and answer_type ''. None is never a valid prompt.
    prompt_raw, at_raw = _scalar(raw.get("prompt")), _scalar(raw.get("answer_type"))
    at_text, at_err = clean_text(at_raw)
    if at_err.startswith("non-string"):
        reasons.append(f"non-string answer_type: {at_err.split(': ', 1)[1]}")
    answer_type = at_text.lower()
    is_caption = isinstance(prompt_raw, str) and not prompt_raw.strip() and not answer_type

    prompt, err = clean_text(prompt_raw)
    if err and not is_caption:
        reasons.append(f"{err.split(':')[0]} prompt" + (f": {err.split(': ', 1)[1]}" if ": " in err else ""))
    target, err = clean_text(raw.get("target"))
    if err:
        reasons.append(f"{err.split(':')[0]} target" + (f": {err.split(': ', 1)[1]}" if ": " in err else ""))

    if not is_caption:
        if not answer_type:
            answer_type = "closed" if target.lower() in YES_NO else "open"
        elif answer_type not in ANSWER_TYPES:
            reasons.append(f"bad answer_type: {answer_type!r}")
    row.update(prompt=prompt, target=target, answer_type=answer_type,
               question_type=_optional_text(raw.get("question_type")).upper())
    row["meta"] = dump_meta(meta)
    row["reject_reason"] = "; ".join(reasons)
    return {c: row[c] for c in COLUMNS}


def _column(batch: Any, name: str, n: int) -> list:
    if name not in batch:
        return [None] * n
    col = batch[name]
    if hasattr(col, "tolist") and not isinstance(col, np.ndarray):  # pandas Series
        col = col.tolist()
    return list(col)


def validate_batch(batch: Any) -> dict[str, list]:
    """Columnar validation for Ray Data ``map_batches`` (numpy, pandas or dict-of-lists batches): returns a dict of
    lists with exactly SCHEMA's columns, in order, one output row per input row (rejects included)."""
    keys = list(batch.keys()) if hasattr(batch, "keys") else list(batch.columns)
    n = len(batch[keys[0]]) if keys else 0
    cols = {k: _column(batch, k, n) for k in keys}
    out: dict[str, list] = {c: [] for c in COLUMNS}
    for i in range(n):
        row = validate_record({k: v[i] for k, v in cols.items()})
        for c in COLUMNS:
            out[c].append(row[c])
    return out


def reason_prefix(reason: str) -> str:
    """'missing image: /x.jpg; empty target' -> 'missing image' (the first reason's prefix)."""
    return reason.split(";")[0].split(":")[0].strip()


def reject_summary(rows: Any) -> dict[str, int]:
    """Count rejected rows by reason prefix (every reason of a row counts), most frequent first. ``rows``: an
    iterable of dicts, a dict of columns, a pyarrow Table or a pandas DataFrame."""
    if isinstance(rows, pa.Table):
        reasons = rows.column("reject_reason").to_pylist()
    elif hasattr(rows, "columns") and hasattr(rows, "__getitem__") and not isinstance(rows, dict):
        reasons = list(rows["reject_reason"])
    elif isinstance(rows, dict):
        reasons = list(rows["reject_reason"])
    else:
        reasons = [r.get("reject_reason", "") for r in rows]
    counts: Counter = Counter()
    for reason in reasons:
        if reason:
            for part in str(reason).split("; "):
                counts[part.split(":")[0].strip()] += 1
    return dict(counts.most_common())


def valid_records(raw: Iterable[dict], keep_images: bool = True) -> tuple[list[dict], list[dict]]:
    """(valid, rejected) validated records of ``raw``. ``keep_images=False`` drops the image bytes of valid records as
    it goes (``image_id``, their hash, stays: enough for a split audit, and light); rejected records never carry
    them."""
    valid, rejected = [], []
    for r in map(validate_record, raw):
        if r["reject_reason"]:
            rejected.append({k: v for k, v in r.items() if k != "image"})
            continue
        if not keep_images:
            r["image"] = b""
        valid.append(r)
    return valid, rejected


def parse_meta(value: Any) -> dict:
    """A record's ``meta`` (JSON text or a dict) as a dict; {} when missing or malformed."""
    return _meta(value)[0]
