"""Source adapters: each yields *raw* records (see ``records.py``) for one split of one source.

Folder sources yield file paths, not pixels (``image_path``); the validation tasks read and check them. Missing
image files are yielded as records whose path does not exist, so they are rejected with a reason and counted,
never silently skipped (the study skipped them). Every path built from a name in a dataset file comes with
``image_root``, the dataset folder: validation refuses, unopened, a path that resolves outside it (``records.py``,
*Path confinement*). ``meta`` is yielded as a JSON string: Arrow infers no struct
type from it, so records of any source go through ``ray.data.from_items`` unchanged.

Subsets (``limit``, ``seed``): records are ordered by sha1(seed, id) and the first ``limit`` kept, yielded in source
order. Same limit and seed give the same records; a larger limit is a superset of a smaller one (ROCO subset-size
sweep); selection depends on the ids only, not on file order.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from medvqa.data.records import YES_NO

VQA_RAD_JSON = "VQA_RAD Dataset Public.json"
VQA_RAD_IMAGES = "VQA_RAD Image Folder"
_SPLIT_ALIASES = {"validation": ("validation", "val", "valid", "validate", "dev"),
                  "val": ("val", "validation", "valid", "validate", "dev"),
                  "test": ("test",), "train": ("train",)}


def _aliases(split: str) -> tuple[str, ...]:
    return _SPLIT_ALIASES.get(split, (split,))


def _meta(**kw) -> str:
    return json.dumps(kw, sort_keys=True, ensure_ascii=False, default=str)


def _closed_if_yes_no(answer: Any) -> str:
    return "closed" if isinstance(answer, str) and answer.strip().lower() in YES_NO else "open"


def _str_if_number(value: Any) -> Any:
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise ValueError(f"{what} not found: {path}")
    return path


# ------------------------------------------------------------------------------------------------ subsets


def _subset_key(seed: int, record_id: str) -> bytes:
    return hashlib.sha1(f"{seed}\0{record_id}".encode()).digest()


def subset_positions(ids: Sequence[str], limit: int | None, seed: int = 0) -> list[int]:
    """Positions (ascending) of the ``limit`` records with the smallest sha1(seed, id); all when limit is None."""
    if limit is None:
        return list(range(len(ids)))
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if limit >= len(ids):
        return list(range(len(ids)))
    order = sorted(range(len(ids)), key=lambda i: _subset_key(seed, str(ids[i])))
    return sorted(order[:limit])


def subset(records: Iterable[dict], limit: int | None, seed: int = 0) -> list[dict]:
    records = list(records)
    return [records[i] for i in subset_positions([r["id"] for r in records], limit, seed)]


# ------------------------------------------------------------------------------------------------ VQA-RAD


def _linkage_text(value: Any) -> str | None:
    """VQA-RAD writes a missing rephrasing/frame as the string 'NULL' (two records lack the key)."""
    text = str(value).strip() if value is not None else ""
    return None if text in ("", "NULL") else text


def vqa_rad_original(folder: str | os.PathLike, split: str = "train", limit: int | None = None,
                     seed: int = 0) -> Iterator[dict]:
    """VQA-RAD as released (JSON + image folder), official split: phrase_type test_freeform/test_para -> 'test'
    (451), everything else -> 'train' (1,797). ``split='all'`` yields both, each labelled with its own split.

    ``meta`` keeps the release's linkage for the leakage audit: ``qid_linked_id`` (shared by a free-form question and
    its paraphrases, always on one image and, in the official split, on one side), ``question_rephrase`` and
    ``question_frame`` (a templated rewrite that keeps the answer; text only, not a record of its own), None when
    the release says 'NULL'."""
    folder = _require(Path(folder).expanduser(), "VQA-RAD folder")
    path = _require(folder / VQA_RAD_JSON, "VQA-RAD JSON")
    if split not in ("train", "test", "all"):
        raise ValueError(f"VQA-RAD original has splits 'train', 'test' (or 'all'), not {split!r}")
    images = folder / VQA_RAD_IMAGES
    with open(path, encoding="utf-8") as f:
        items = json.load(f)
    out = []
    for item in items:
        phrase_type = str(item.get("phrase_type", "")).strip()
        item_split = "test" if phrase_type.startswith("test") else "train"
        if split != "all" and item_split != split:
            continue
        name = str(item.get("image_name") or "").strip()
        qid = str(item.get("qid")).strip()  # one qid is a string, the rest ints
        out.append({
            "id": qid,
            "image_path": str(images / name) if name else None,
            "image_root": str(folder),
            "image_name": name,
            "prompt": item.get("question"),
            # Five answers are ints: str() here, as a column of mixed str/int becomes pickled objects in Ray
            # Data (Arrow cannot type it); validation would normalise them too.
            "target": _str_if_number(item.get("answer")),
            "answer_type": item.get("answer_type"),  # two are 'CLOSED ': normalised by validation
            "question_type": item.get("question_type"),
            "split": item_split,
            "source": "vqa_rad",
            "meta": _meta(organ=item.get("image_organ"), question_type=item.get("question_type"),
                          phrase_type=phrase_type, qid=qid, qid_linked_id=item.get("qid_linked_id"),
                          question_rephrase=_linkage_text(item.get("question_rephrase")),
                          question_frame=_linkage_text(item.get("question_frame")),
                          question_relation=_linkage_text(item.get("question_relation")),
                          evaluation=item.get("evaluation"), format="original"),
        })
    return iter(subset(out, limit, seed))  # eager: a bad path raises here, not at first next()


# ------------------------------------------------------------------------------------------------ Hugging Face


def _split_of_file(path: Path, root: Path) -> str | None:
    """HF layouts: data/<split>-00000-of-00001.parquet, <split>.parquet, <split>/xxx.parquet."""
    parts = [p.lower() for p in path.relative_to(root).parts]
    stem = path.name.lower().split(".")[0]
    candidates = [stem, stem.split("-")[0], stem.split("_")[0], *parts[:-1]]
    for split, names in _SPLIT_ALIASES.items():
        if any(c in names for c in candidates):
            return split
    return None


def load_hf(path_or_id: str | os.PathLike, split: str):
    """A ``datasets.Dataset`` for one split from a parquet file, a folder of parquet files, a ``save_to_disk``
    folder, or an HF hub id. A single parquet file is taken to be the requested split."""
    import datasets

    text = os.fspath(path_or_id)
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix != ".parquet":
            raise ValueError(f"unsupported data file {path} (expected .parquet, a folder or an HF dataset id)")
        return datasets.load_dataset("parquet", data_files={split: str(path)}, split=split)
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            obj = datasets.load_from_disk(str(path))
            if isinstance(obj, datasets.DatasetDict):
                for name in _aliases(split):
                    if name in obj:
                        return obj[name]
                raise ValueError(f"split {split!r} not in {path} (splits: {list(obj)})")
            return obj  # a single saved Dataset: it is the split asked for
        files = sorted(path.rglob("*.parquet"))
        if not files:
            raise ValueError(f"{path}: no parquet files and not a save_to_disk folder")
        wanted = {s for s in _SPLIT_ALIASES if split in _aliases(s)} | {split}
        match = [f for f in files if _split_of_file(f, path) in wanted]
        if not match:
            found = sorted({_split_of_file(f, path) or "?" for f in files})
            raise ValueError(f"no parquet files for split {split!r} under {path} (found splits: {found})")
        return datasets.load_dataset("parquet", data_files={split: [str(f) for f in match]}, split=split)
    if text.startswith(("/", ".", "~")) or text.endswith(".parquet"):
        raise ValueError(f"data path not found: {path}")
    try:
        return datasets.load_dataset(text, split=split)
    except Exception as e:  # noqa: BLE001 - offline, unknown id, missing split: one clear message
        raise ValueError(f"could not load {text!r} (split {split!r}) as a local path or HF hub dataset id: "
                         f"{type(e).__name__}: {e}") from e


def _column(ds, names: Sequence[str], what: str, required: bool = True) -> str | None:
    for n in names:
        if n in ds.column_names:
            return n
    if required:
        raise ValueError(f"no {what} column (tried {list(names)}) in dataset with columns {ds.column_names}")
    return None


def _image_value(value: Any) -> tuple[bytes | None, str | None]:
    """(bytes, path) from an HF image cell: {'bytes','path'} dict, raw bytes, a PIL image or a path string."""
    if value is None:
        return None, None
    if isinstance(value, dict):
        return value.get("bytes") or None, value.get("path") or None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), None
    if isinstance(value, str):
        return None, value
    if hasattr(value, "save"):
        from medvqa.data.records import encode_pil

        return encode_pil(value), None
    return None, None


def _iter_hf(path_or_id, split: str, limit: int | None, seed: int, fields: dict[str, tuple[str, ...]],
             id_names: tuple[str, ...], make) -> Iterator[dict]:
    """Shared HF reader: picks columns, undecodes the image column (bytes as stored, no PIL round trip), selects the
    subset by id before touching any image, and calls ``make(row, id, index)`` per row."""
    import datasets

    ds = load_hf(path_or_id, split)
    cols = {k: _column(ds, names, k) for k, names in fields.items()}
    id_col = _column(ds, id_names, "id", required=False)
    img = cols["image"]
    if isinstance(ds.features.get(img), datasets.Image) and ds.features[img].decode:
        ds = ds.cast_column(img, datasets.Image(decode=False))
    ids = [str(v) for v in ds[id_col]] if id_col else [f"{split}-{i}" for i in range(len(ds))]
    if len(set(ids)) != len(ids):  # e.g. an image_id column shared by several questions
        ids = [f"{split}-{i}" for i in range(len(ds))]
    positions = subset_positions(ids, limit, seed)
    if len(positions) < len(ds):
        ds = ds.select(positions)
    ds = ds.select_columns(sorted(set(cols.values())))
    return _hf_rows(ds, cols, positions, ids, split, make, _hf_root(path_or_id))


def _hf_root(path_or_id) -> str:
    """The folder an image cell's path (used only when the cell has no bytes) must stay in: a local dataset's
    folder; for a hub id, the Hugging Face caches the datasets library downloads image files into (their common
    folder, '' when they share none but '/', which admits no path)."""
    local = Path(os.fspath(path_or_id)).expanduser()
    if local.exists():
        return str(local if local.is_dir() else local.parent)
    from datasets import config
    from huggingface_hub import constants

    common = os.path.commonpath([os.path.realpath(config.HF_DATASETS_CACHE),
                                 os.path.realpath(constants.HF_HUB_CACHE)])
    return "" if common == os.sep else common


def _hf_rows(ds, cols, positions, ids, split, make, root: str) -> Iterator[dict]:
    """``root`` (``_hf_root``): relative image paths are taken from it and every path is confined to it."""
    img = cols["image"]
    for j, row in enumerate(ds):
        i = positions[j]
        data, path = _image_value(row[img])
        rec = make({k: row[c] for k, c in cols.items()}, ids[i], i)
        rec.update(image=data, image_path=os.path.join(root, path) if path and root else path, image_root=root,
                   image_name=os.path.basename(path) if path else "", split=split)
        yield rec


def _hf_vqa(path_or_id, split, limit, seed, source) -> Iterator[dict]:
    def make(row, rid, i):
        return {"id": rid, "prompt": row["question"], "target": row["answer"],
                "answer_type": _closed_if_yes_no(row["answer"]), "question_type": "", "source": source,
                "meta": _meta(format="hf", index=i)}

    return _iter_hf(path_or_id, split, limit, seed,
                    {"image": ("image", "img"), "question": ("question",), "answer": ("answer", "answers")},
                    ("id", "qid", "question_id"), make)


def vqa_rad_hf(path_or_id, split: str = "train", limit: int | None = None, seed: int = 0) -> Iterator[dict]:
    """VQA-RAD as on the HF hub (``flaviagiammarino/vqa-rad``: image, question, answer; train 1,793 / test 451).
    answer_type is inferred: closed when the answer is yes/no."""
    return _hf_vqa(path_or_id, split, limit, seed, "vqa_rad")


def pathvqa_hf(path_or_id, split: str = "train", limit: int | None = None, seed: int = 0) -> Iterator[dict]:
    """PathVQA as on the HF hub (``flaviagiammarino/path-vqa``: image, question, answer), or, when the path is a
    folder in the released layout (``pvqa_<split>.json``), read by ``pathvqa_original``: a PathVQA path given to the
    evaluation's out-of-distribution option works in either layout."""
    folder = Path(os.fspath(path_or_id)).expanduser()
    if folder.is_dir() and any(folder.glob("pvqa_*.json")):
        return pathvqa_original(folder, split, limit=limit, seed=seed)
    return _hf_vqa(path_or_id, split, limit, seed, "pathvqa")


def roco_hf(path_or_id, split: str = "train", limit: int | None = None, seed: int = 0) -> Iterator[dict]:
    """ROCO mirrors on the HF hub (image, caption, optional id / image_id): caption records (prompt '')."""
    def make(row, rid, i):
        return {"id": rid, "prompt": "", "target": row["caption"], "answer_type": "", "question_type": "",
                "source": "roco", "meta": _meta(format="hf", index=i)}

    return _iter_hf(path_or_id, split, limit, seed, {"image": ("image", "img"), "caption": ("caption", "text")},
                    ("id", "image_id", "roco_id"), make)


# ------------------------------------------------------------------------------------------------ ROCO


def _roco_split_dir(folder: Path, split: str) -> Path:
    for name in _aliases(split):
        if (folder / name / "radiology").is_dir():
            return folder / name / "radiology"
    raise ValueError(f"ROCO split folder not found: {folder / split / 'radiology'}")


def _tab_file(path: Path) -> dict[str, list[str]]:
    """``ROCO_xxxxx<TAB>field<TAB>...`` -> {id: fields}; absent file -> {}."""
    if not path.exists():
        return {}
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if parts[0].strip():
                out[parts[0].strip()] = [p.strip() for p in parts[1:] if p.strip()]
    return out


def roco_original(folder: str | os.PathLike, split: str = "train", limit: int | None = None,
                  seed: int = 0) -> Iterator[dict]:
    """ROCO as released: ``<folder>/<split>/radiology/captions.txt`` (``ROCO_xxxxx<TAB> caption``) and images at
    ``images/ROCO_xxxxx.jpg`` (or the file name in a ``dlinks.txt`` third column, as ROCO's download script saves
    them). Records whose image is absent are yielded and rejected by validation with 'missing image'."""
    folder = _require(Path(folder).expanduser(), "ROCO folder")
    root = _roco_split_dir(folder, split)
    captions = _require(root / "captions.txt", "ROCO captions")
    links = _tab_file(root / "dlinks.txt")
    keywords = _tab_file(root / "keywords.txt")
    out = []
    with open(captions, encoding="utf-8") as f:
        for n, line in enumerate(f):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            rid, _, text = line.partition("\t")
            rid = rid.strip()
            name = links[rid][-1] if links.get(rid) and links[rid][-1].lower().endswith(
                (".jpg", ".jpeg", ".png")) else f"{rid}.jpg"
            out.append({
                "id": rid or f"line-{n}", "image_path": str(root / "images" / name), "image_root": str(folder),
                "image_name": name,
                "prompt": "", "target": text, "answer_type": "", "question_type": "", "split": split,
                "source": "roco", "meta": _meta(keywords=keywords.get(rid, []), format="original", line=n),
            })
    return iter(subset(out, limit, seed))  # eager: a bad path raises here, not at first next()


# ------------------------------------------------------------------------------------------------ PathVQA


def pathvqa_original(folder: str | os.PathLike, split: str = "train", limit: int | None = None,
                     seed: int = 0) -> Iterator[dict]:
    """PathVQA in the LXMERT layout: ``pvqa_<split>.json`` with per image ``img_id``, ``sentf.pvqa`` (questions)
    and ``labelf.pvqa`` ([{answer: score}], the best-scored answer is the target); images at
    ``<folder>/images/<split>/<img_id>.jpg`` (absent ones are rejected by validation). ``validation`` reads
    ``pvqa_val.json``. The release's pickles are never read."""
    folder = _require(Path(folder).expanduser(), "PathVQA folder")
    for name in _aliases(split):
        path = folder / f"pvqa_{name}.json"
        if path.exists():
            break
    else:
        raise ValueError(f"PathVQA file not found: {folder / f'pvqa_{split}.json'}")
    with open(path, encoding="utf-8") as f:
        items = json.load(f)
    out = []
    for item in items:
        img_id = str(item.get("img_id", "")).strip()
        questions = (item.get("sentf") or {}).get("pvqa") or []
        labels = (item.get("labelf") or {}).get("pvqa") or []
        for k, question in enumerate(questions):
            label = labels[k] if k < len(labels) else None
            answer = max(label.items(), key=lambda kv: kv[1])[0] if isinstance(label, dict) and label else None
            out.append({
                "id": f"{img_id}-{k}", "image_path": str(folder / "images" / name / f"{img_id}.jpg"),
                "image_root": str(folder), "image_name": f"{img_id}.jpg", "prompt": question, "target": answer,
                "answer_type": _closed_if_yes_no(answer), "question_type": "", "split": split,
                "source": "pathvqa", "meta": _meta(img_id=img_id, question_index=k, format="original"),
            })
    return iter(subset(out, limit, seed))  # eager: a bad path raises here, not at first next()


# ------------------------------------------------------------------------------------------------ SLAKE


def slake(folder: str | os.PathLike, split: str = "train", limit: int | None = None, seed: int = 0) -> Iterator[dict]:
    """SLAKE 1.0 as released: ``train.json``, ``validate.json`` (split 'validation'), ``test.json`` and
    ``imgs/<img_name>`` (e.g. ``imgs/xmlab102/source.jpg``). Only the English subset (``q_lang == 'en'``); the
    Chinese questions are not yielded. ``meta`` carries what the report breaks metrics down by: ``modality``,
    ``organ`` (SLAKE's ``location``, under the key VQA-RAD and the phantoms use, so stratified splits and same-organ
    swaps work alike), ``content_type`` and ``base_type`` (``vqa`` or knowledge-based ``kvqa``)."""
    folder = _require(Path(folder).expanduser(), "SLAKE folder")
    for name in _aliases(split):
        path = folder / f"{name}.json"
        if path.exists():
            break
    else:
        raise ValueError(f"SLAKE file not found: {folder / f'{split}.json'} (train.json, validate.json, test.json)")
    with open(path, encoding="utf-8") as f:
        items = json.load(f)
    out = []
    for n, item in enumerate(items):
        if str(item.get("q_lang", "")).strip().lower() != "en":
            continue
        name = str(item.get("img_name") or "").strip()
        qid = item.get("qid")
        out.append({
            "id": str(qid).strip() if qid is not None else f"{split}-{n}",
            "image_path": str(folder / "imgs" / name) if name else None, "image_root": str(folder),
            "image_name": name, "prompt": item.get("question"), "target": _str_if_number(item.get("answer")),
            "answer_type": item.get("answer_type"), "question_type": item.get("content_type"), "split": split,
            "source": "slake",
            "meta": _meta(modality=item.get("modality"), organ=item.get("location"),
                          content_type=item.get("content_type"), base_type=item.get("base_type"),
                          img_id=item.get("img_id"), qid=qid, format="original"),
        })
    return iter(subset(out, limit, seed))  # eager: a bad path raises here, not at first next()


# ------------------------------------------------------------------------------------------------ Med-HALT


def parse_options(text: str) -> dict | None:
    """A dict literal such as ``{'0': 'a', '1': 'I do not know'}`` parsed with ``ast.literal_eval`` (never eval);
    None when it is not a literal dict."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    return {str(k): v for k, v in value.items()} if isinstance(value, dict) else None


def medhalt_fake(csv_path: str | os.PathLike, split: str = "test", limit: int | None = None,
                 seed: int = 0) -> Iterator[dict]:
    """Med-HALT ``reasoning_fake.csv`` (1,858 nonsense questions): target 'I do not know' (declining is right),
    open answer type, the options and the 'I do not know' option key in meta. No image: meta ``needs_image=false``
    tells validation not to reject it (the evaluation attaches random images later)."""
    path = _require(Path(csv_path).expanduser(), "Med-HALT CSV")
    out = []
    with open(path, encoding="utf-8", newline="") as f:
        for n, row in enumerate(csv.DictReader(f)):
            options = parse_options(row.get("options") or "")
            idk = next((k for k, v in (options or {}).items()
                        if isinstance(v, str) and v.strip().rstrip(".").lower() == "i do not know"), None)
            out.append({
                "id": (row.get("id") or "").strip() or f"row-{n}", "image": b"", "image_name": "",
                "prompt": row.get("question"), "target": "I do not know", "answer_type": "open",
                "question_type": "FAKE", "split": split, "source": "medhalt",
                "meta": _meta(needs_image=False, options=options, options_parsed=options is not None,
                              idk_option=idk, subject=row.get("subject_name") or "",
                              topic=row.get("topic_name") or "", dataset=row.get("dataset") or "",
                              split_type=row.get("split_type") or "", row=n),
            })
    return iter(subset(out, limit, seed))  # eager: a bad path raises here, not at first next()


# ------------------------------------------------------------------------------------------------ dispatch


def iter_raw_records(data_cfg) -> Iterator[dict]:
    """Raw records for a ``DataConfig``. Phantoms: indices 0..N-1 with N = limit or num_records (indices are
    independent seeded draws, so a prefix is already a seeded random subset, and the Ray pipeline generates the
    same indices inside its tasks); other sources: the sha1(seed, id) subset described in the module doc."""
    kind, path, split = data_cfg.kind, data_cfg.path, data_cfg.split
    limit, seed = data_cfg.limit, data_cfg.seed
    if kind == "phantom":
        from medvqa.data.phantoms import phantom_record

        n = limit if limit is not None else data_cfg.num_records
        return (phantom_record(i, data_cfg.task, seed, split, data_cfg.phantom_anatomy) for i in range(n))
    readers = {"vqa_rad": vqa_rad_original, "vqa_rad_hf": vqa_rad_hf, "roco": roco_original, "roco_hf": roco_hf,
               "pathvqa": pathvqa_original, "pathvqa_hf": pathvqa_hf, "slake": slake, "medhalt": medhalt_fake}
    if kind not in readers:
        raise ValueError(f"unknown data kind {kind!r} (known: phantom, {', '.join(readers)})")
    if not path:
        raise ValueError(f"data.path is required for data.kind={kind!r}")
    return readers[kind](path, split, limit=limit, seed=seed)
