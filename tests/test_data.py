"""Data layer: unified schema, validation reasons, source adapters on real and tiny data, phantoms, subsets.

Fast and offline. Tests on the real data in ../shared/data skip (with the path in the reason) where it is absent.
"""

from __future__ import annotations

import builtins
import dataclasses
import hashlib
import io
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_fixtures import (DATA, hf_caption_dataset, hf_vqa_dataset, image_bytes, slake_release, vqa_rad_item,
                           vqa_rad_release, write_image)
from PIL import Image

from medvqa.config import ConfigError, DataConfig, load_config
from medvqa.data import adapters, phantoms
from medvqa.data.records import COLUMNS, SCHEMA, reason_prefix, reject_summary, validate_batch, validate_record

needs_shared = pytest.mark.skipif(not DATA.is_dir(), reason=f"real data not found at {DATA}")


def raw(**kw) -> dict:
    """A valid VQA raw record, overridden by ``kw``."""
    base = {"id": "q1", "image": image_bytes(), "prompt": "Is there a lesion?", "target": "yes",
            "answer_type": "closed", "question_type": "PRES", "split": "train", "source": "test", "meta": None}
    base.update(kw)
    return base


# ------------------------------------------------------------------------------------------------ validation


def test_valid_record_has_exactly_the_schema_columns():
    row = validate_record(raw(image_name="a.jpg", meta={"organ": "CHEST"}))
    assert list(row) == COLUMNS == SCHEMA.names
    assert row["reject_reason"] == ""
    assert row["image_id"] == hashlib.sha1(row["image"]).hexdigest()
    assert json.loads(row["meta"]) == {"organ": "CHEST"}
    pa.Table.from_pylist([row], schema=SCHEMA)  # types fit the Arrow schema


@pytest.mark.parametrize("kw, prefix", [
    ({"image": None, "image_path": "/nonexistent/x.jpg"}, "missing image"),
    ({"image": None}, "missing image"),
    ({"image": b""}, "empty image"),
    ({"image": b"\xff\xd8\xff\xe0 definitely not a jpeg"}, "corrupt image"),
    ({"image": image_bytes()[:300]}, "corrupt image"),  # truncated JPEG
    ({"image": image_bytes("PNG")[:200]}, "corrupt image"),  # truncated PNG
    ({"image": ["not", "bytes"]}, "corrupt image"),
    ({"target": ""}, "empty target"),
    ({"target": "   \t "}, "empty target"),
    ({"target": None}, "empty target"),
    ({"target": float("nan")}, "empty target"),
    ({"target": ["a", "list"]}, "non-string target"),
    ({"target": True}, "non-string target"),
    ({"prompt": None}, "empty prompt"),
    ({"prompt": ""}, "empty prompt"),  # a VQA record (answer_type closed) needs a question
    ({"prompt": ["a"]}, "non-string prompt"),
    ({"prompt": {"q": 1}}, "non-string prompt"),
    ({"answer_type": "multiple choice"}, "bad answer_type"),
    ({"answer_type": 3}, "bad answer_type"),
    ({"id": None}, "missing id"),
    ({"split": ""}, "missing split"),
    ({"source": None}, "missing source"),
    ({"meta": "{not json"}, "bad meta"),
    ({"meta": "[1, 2]"}, "bad meta"),
])
def test_each_bad_input_gets_its_reason(kw, prefix):
    row = validate_record(raw(**kw))
    assert reason_prefix(row["reject_reason"]) == prefix, row["reject_reason"]
    assert list(row) == COLUMNS
    pa.Table.from_pylist([row], schema=SCHEMA)  # rejects are still schema rows


def test_file_problems_get_reasons(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"garbage" * 10)
    good = tmp_path / "good.png"
    good.write_bytes(image_bytes("PNG"))
    cases = {tmp_path / "absent.jpg": "missing image", empty: "empty image", corrupt: "corrupt image",
             tmp_path: "unreadable image",  # a directory: unreadable even as root (chmod 000 is not)
             good: ""}
    for path, prefix in cases.items():
        row = validate_record(raw(image=None, image_path=str(path)))
        assert reason_prefix(row["reject_reason"]) == prefix, (path, row["reject_reason"])
    row = validate_record(raw(image=None, image_path=str(good)))
    assert row["image"] == good.read_bytes() and row["image_name"] == "good.png"


def test_normalisation():
    row = validate_record(raw(prompt="  How many\tkidneys   are seen? ", target=5, answer_type="OPEN ",
                              question_type=" Other", id=7))
    assert row["reject_reason"] == ""
    assert (row["prompt"], row["target"], row["answer_type"], row["question_type"], row["id"]) == \
           ("How many kidneys are seen?", "5", "open", "OTHER", "7")
    assert validate_record(raw(answer_type="CLOSED "))["answer_type"] == "closed"
    assert validate_record(raw(target=np.int64(12)))["target"] == "12"
    assert validate_record(raw(target=2.0))["target"] == "2"
    assert validate_record(raw(target=np.str_(" Yes ")))["target"] == "Yes"


def test_answer_type_inferred_when_missing_and_captions_have_none():
    assert validate_record(raw(answer_type=None, target="No"))["answer_type"] == "closed"
    assert validate_record(raw(answer_type="", target="left lung"))["answer_type"] == "open"
    cap = validate_record(raw(prompt="", answer_type="", question_type=None, target=" A chest  radiograph. "))
    assert cap["reject_reason"] == "" and cap["answer_type"] == "" and cap["prompt"] == ""
    assert cap["target"] == "A chest radiograph."


def test_image_sources_bytes_dict_pil():
    data = image_bytes("PNG")
    by_dict = validate_record(raw(image={"bytes": data, "path": "x.png"}))
    by_pil = validate_record(raw(image=Image.open(io.BytesIO(data))))
    assert by_dict["reject_reason"] == by_pil["reject_reason"] == ""
    assert by_dict["image_id"] == hashlib.sha1(data).hexdigest()
    assert Image.open(io.BytesIO(by_pil["image"])).size == (48, 32)


def test_records_without_image_need_the_flag():
    no_image = raw(image=b"", prompt="A nonsense question?", target="I do not know", answer_type="open")
    assert reason_prefix(validate_record(no_image)["reject_reason"]) == "empty image"
    ok = validate_record({**no_image, "meta": json.dumps({"needs_image": False})})
    assert ok["reject_reason"] == "" and ok["image"] == b"" and ok["image_id"] == ""


def test_validate_never_raises_on_garbage():
    for junk in [{}, {"id": object()}, {"image": 5, "target": object(), "meta": 3.5}, {"image_path": 12}]:
        row = validate_record(junk)
        assert row["reject_reason"] and list(row) == COLUMNS


def test_validate_batch_numpy_pandas_and_arrow_batches():
    import pandas as pd

    good = raw(id="a")
    rows = [good, raw(id="b", target=None), raw(id="c", target=4, answer_type="CLOSED "),
            raw(id="d", image=None, image_path="/nonexistent.png")]
    keys = sorted({k for r in rows for k in r})
    cols = {k: [r.get(k) for r in rows] for k in keys}
    numpy_batch = {k: np.array(v, dtype=object) for k, v in cols.items()}  # what Ray's numpy format hands over
    df = pd.DataFrame(cols)
    df.loc[1, "target"] = np.nan  # pandas' missing value
    arrow_cols = {k: cols[k] for k in keys if k != "meta"}  # meta all None: Arrow's null type
    arrow_cols["target"] = [None if t is None else str(t) for t in cols["target"]]  # Arrow columns are typed
    arrow_batch = {k: c.to_numpy(zero_copy_only=False) for k, c in
                   zip(arrow_cols, pa.Table.from_pydict(arrow_cols).columns)}
    for batch in (numpy_batch, df, arrow_batch, cols):
        out = validate_batch(batch)
        assert list(out) == COLUMNS and all(len(v) == 4 for v in out.values())
        assert [reason_prefix(r) for r in out["reject_reason"]] == ["", "empty target", "", "missing image"]
        assert out["target"][2] == "4" and out["answer_type"][2] == "closed"
        assert pa.Table.from_pydict(out, schema=SCHEMA).num_rows == 4
    assert validate_batch({"id": np.array([], dtype=object)}) == {c: [] for c in COLUMNS}


def test_reject_summary_counts_by_prefix():
    rows = [validate_record(r) for r in
            [raw(), raw(target=None), raw(target=""), raw(image=None, image_path="/no/a.jpg"),
             raw(image=None, image_path="/no/b.jpg", prompt=None)]]
    expected = {"empty target": 2, "missing image": 2, "empty prompt": 1}
    assert reject_summary(rows) == expected
    assert reject_summary({"reject_reason": [r["reject_reason"] for r in rows]}) == expected
    assert reject_summary(pa.Table.from_pylist(rows, schema=SCHEMA)) == expected


# ------------------------------------------------------------------------------------------------ path confinement

OUTSIDE = "image path outside the dataset folder"


@pytest.fixture()
def opened(monkeypatch):
    """Paths passed to open() while the test runs."""
    seen: list[str] = []
    real_open = builtins.open

    def spy(file, *a, **k):
        seen.append(str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", spy)
    return seen


def test_paths_are_confined_to_the_dataset_folder(tmp_path, opened):
    root = tmp_path / "dataset"
    good = write_image(root / "imgs" / "a.jpg")
    outside = write_image(tmp_path / "secret.jpg", seed=1)  # a valid image: accepted if it were ever read
    (root / "imgs" / "escape.jpg").symlink_to(outside)
    (root / "imgs" / "inner.jpg").symlink_to(good)
    fifo = root / "imgs" / "fifo.jpg"
    os.mkfifo(fifo)  # open() would block forever on it
    linked_root = tmp_path / "link-to-dataset"
    linked_root.symlink_to(root, target_is_directory=True)

    def check(path, image_root=str(root)):
        return validate_record(raw(image=None, image_path=str(path), image_root=image_root))["reject_reason"]

    assert check(good) == "" and check(root / "imgs" / "inner.jpg") == ""  # a symlink that stays inside
    assert check(linked_root / "imgs" / "a.jpg", str(linked_root)) == ""  # the folder itself may be a link
    assert check(root / "imgs" / "a.jpg", str(linked_root)) == ""
    for escaping in (root / "imgs" / ".." / ".." / "secret.jpg", outside, root / "imgs" / "escape.jpg"):
        assert check(escaping) == f"{OUTSIDE}: {escaping}"
    assert check(good, image_root="").startswith(OUTSIDE)  # no folder: no path is admitted
    assert check(root / "imgs" / "absent.jpg").startswith("missing image")
    assert check(fifo) == f"unreadable image: {fifo} (not a regular file)"
    assert check(outside, image_root=None) == ""  # without image_root a path is trusted (the caller built it)
    assert str(outside) in opened and not any(str(p).endswith(("escape.jpg", "fifo.jpg")) for p in opened)
    opened.clear()
    check(root / "imgs" / ".." / ".." / "secret.jpg")
    assert opened == []  # refused before any open


def test_every_folder_adapter_confines_its_file_names(tmp_path, opened):
    """VQA-RAD image_name, ROCO's dlinks name, PathVQA img_id, SLAKE img_name: a name that leaves the folder is a
    reject with its own reason and the (valid) image it names is never opened."""
    slake = slake_release(tmp_path / "slake")  # its qid 9 names ../../outside.jpg, a valid image
    outside = tmp_path / "outside.jpg"

    def escape(images_dir: Path) -> str:
        images_dir.mkdir(parents=True, exist_ok=True)
        return os.path.relpath(outside, images_dir)

    vqa = tmp_path / "vqa_rad"
    vqa_rad_release(vqa, [vqa_rad_item(1, escape(vqa / "VQA_RAD Image Folder"), "Is it?", "yes", "freeform", "g1"),
                          vqa_rad_item(2, str(outside), "Is it?", "yes", "freeform", "g2")], {})
    roco = tmp_path / "roco" / "train" / "radiology"
    roco.mkdir(parents=True)
    (roco / "captions.txt").write_text("ROCO_00001\t A caption.\n")
    (roco / "dlinks.txt").write_text(f"ROCO_00001\t wget x\t {escape(roco / 'images')}\n")
    pvqa = tmp_path / "pathvqa"
    img_id = escape(pvqa / "images" / "test")[:-len(".jpg")]
    (pvqa / "pvqa_test.json").write_text(json.dumps([{"img_id": img_id, "sentf": {"pvqa": ["What?"]},
                                                      "labelf": {"pvqa": [{"cells": 1}]}}]))
    records = [*adapters.vqa_rad_original(vqa, "train"), *adapters.roco_original(tmp_path / "roco", "train"),
               *adapters.pathvqa_original(pvqa, "test"),
               *[r for r in adapters.slake(slake, "test") if r["id"] == "9"]]
    assert len(records) == 5
    for rec in records:
        assert os.path.samefile(rec["image_path"], outside) and rec["image_root"]  # the named file exists ...
        assert reason_prefix(validate_record(rec)["reject_reason"]) == OUTSIDE, rec  # ... and is refused
    assert not any(p.endswith("outside.jpg") for p in opened)


def test_hf_image_paths_are_confined(hf_cache, monkeypatch):
    """An HF-format row whose image cell has a path but no bytes: the path is taken from the dataset folder and
    confined to it (images embedded as bytes need no path)."""
    outside = write_image(hf_cache / "outside.jpg", seed=3)
    folder = hf_cache / "hf"
    write_image(folder / "inside.jpg", seed=4)
    image = pa.array([{"bytes": None, "path": "inside.jpg"}, {"bytes": None, "path": str(outside)},
                      {"bytes": image_bytes(), "path": str(outside)}],
                     pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"image": image, "question": ["a?", "b?", "c?"], "answer": ["yes", "no", "yes"]}),
                   folder / "train.parquet")
    rows = [validate_record(r) for r in adapters.vqa_rad_hf(folder, "train")]
    assert [reason_prefix(r["reject_reason"]) for r in rows] == ["", OUTSIDE, ""]  # bytes win over a path
    assert rows[0]["image"] == (folder / "inside.jpg").read_bytes()  # a relative path is taken from the folder
    # a hub id: the caches the datasets library downloads into; none when they share only "/"
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_cache / "hub"))
    assert adapters._hf_root("owner/some-dataset") == str(hf_cache)  # hf_cache holds the datasets cache too
    monkeypatch.setattr(constants, "HF_HUB_CACHE", "/elsewhere/hub")
    assert adapters._hf_root("owner/some-dataset") == ""


# ------------------------------------------------------------------------------------------------ VQA-RAD (real)


@pytest.fixture(scope="module")
def vqa_rad_rows():
    if not DATA.is_dir():
        pytest.skip(f"real data not found at {DATA}")
    return [validate_record(r) for r in adapters.vqa_rad_original(DATA / "vqa_rad", "all")]


@needs_shared
def test_vqa_rad_counts_and_split(vqa_rad_rows):
    rows = vqa_rad_rows
    assert len(rows) == 2248 and len({r["id"] for r in rows}) == 2248
    assert Counter(r["split"] for r in rows) == {"train": 1797, "test": 451}
    assert reject_summary(rows) == {}
    assert {r["answer_type"] for r in rows} == {"closed", "open"}  # 'CLOSED ' normalised
    assert all(isinstance(r["target"], str) and r["target"] for r in rows)
    by_id = {r["id"]: r for r in rows}
    assert (by_id["1511"]["target"], by_id["2234"]["target"]) == ("4", "12")  # integer answers in the JSON
    assert "0" in by_id  # the one string qid
    meta = json.loads(by_id["0"]["meta"])
    assert meta["organ"] == "HEAD" and meta["phrase_type"] == "freeform" and meta["question_type"] == "PRES"
    # the split adapters agree with 'all'
    assert len(list(adapters.vqa_rad_original(DATA / "vqa_rad", "test"))) == 451
    assert len(list(adapters.vqa_rad_original(DATA / "vqa_rad", "train"))) == 1797


@needs_shared
def test_vqa_rad_image_ids_and_test_overlap(vqa_rad_rows):
    rows = vqa_rad_rows
    by_name = {}
    for r in rows:
        by_name.setdefault(r["image_name"], set()).add(r["image_id"])
    assert all(len(ids) == 1 for ids in by_name.values()) and len(by_name) == 314
    first = next(r for r in rows if r["image_name"] == "synpic54610.jpg")
    assert first["image_id"] == "bef6cdbe36fffbbe7620867030256ef6203f408a"  # sha1 of the file: stable
    train_images = {r["image_id"] for r in rows if r["split"] == "train"}
    test = [r for r in rows if r["split"] == "test"]
    assert sum(r["image_id"] in train_images for r in test) == 446  # GUIDE §3: the official split leaks images


# ------------------------------------------------------------------------------------------------ ROCO


def _roco_folder(tmp_path: Path) -> Path:
    root = tmp_path / "roco" / "validation" / "radiology"
    (root / "images").mkdir(parents=True)
    (root / "captions.txt").write_text(
        "ROCO_00001\t Axial CT of the chest.\n"
        "ROCO_00002\t Chest radiograph   with no focal lesion.\n"
        "\n"
        "ROCO_00003\t MRI of the head.\n"
        "ROCO_00004\t Corrupt one.\n"
        "ROCO_00005\t\n")
    (root / "keywords.txt").write_text("ROCO_00001\t\taxial\tct\tchest\n")
    (root / "images" / "ROCO_00001.jpg").write_bytes(image_bytes(seed=1))
    (root / "images" / "ROCO_00002.jpg").write_bytes(image_bytes(seed=2))
    (root / "images" / "ROCO_00004.jpg").write_bytes(b"not an image")
    (root / "images" / "ROCO_00005.jpg").write_bytes(image_bytes(seed=5))
    return tmp_path / "roco"


def test_roco_original_layout_rejects_missing_and_corrupt(tmp_path):
    folder = _roco_folder(tmp_path)
    records = list(adapters.roco_original(folder, "validation"))
    assert [r["id"] for r in records] == ["ROCO_00001", "ROCO_00002", "ROCO_00003", "ROCO_00004", "ROCO_00005"]
    assert all(isinstance(r["image_path"], str) and "image" not in r for r in records)  # paths, not pixels
    rows = {r["id"]: validate_record(r) for r in records}
    assert rows["ROCO_00001"]["reject_reason"] == "" and rows["ROCO_00001"]["prompt"] == ""
    assert rows["ROCO_00002"]["target"] == "Chest radiograph with no focal lesion."
    assert json.loads(rows["ROCO_00001"]["meta"])["keywords"] == ["axial", "ct", "chest"]
    assert rows["ROCO_00003"]["reject_reason"].startswith("missing image: ")
    assert rows["ROCO_00003"]["reject_reason"].endswith("ROCO_00003.jpg")
    assert reason_prefix(rows["ROCO_00004"]["reject_reason"]) == "corrupt image"
    assert reason_prefix(rows["ROCO_00005"]["reject_reason"]) == "empty target"
    with pytest.raises(ValueError, match="ROCO split folder not found"):
        adapters.roco_original(folder, "train")
    with pytest.raises(ValueError, match=str(tmp_path / "nowhere")):
        adapters.roco_original(tmp_path / "nowhere", "validation")


def test_roco_dlinks_file_names(tmp_path):
    folder = _roco_folder(tmp_path)
    root = folder / "validation" / "radiology"
    (root / "dlinks.txt").write_text("ROCO_00003\t wget ftp://x/y.tar.gz\t PMC123_fig1.jpg\n")
    (root / "images" / "PMC123_fig1.jpg").write_bytes(image_bytes(seed=3))
    rec = {r["id"]: r for r in adapters.roco_original(folder, "validation")}["ROCO_00003"]
    assert rec["image_name"] == "PMC123_fig1.jpg" and validate_record(rec)["reject_reason"] == ""


@needs_shared
def test_roco_real_captions_parse_and_are_rejected_without_images():
    rows = [validate_record(r) for r in adapters.roco_original(DATA / "roco", "validation")]
    assert len(rows) == 8180 and len({r["id"] for r in rows}) == 8180
    assert reject_summary(rows) == {"missing image": 8180}  # no images shipped: each one counted, none skipped
    assert rows[0]["id"] == "ROCO_00020" and rows[0]["target"].startswith("Axial computed tomography")
    assert len(list(adapters.roco_original(DATA / "roco", "test"))) == 8179


# ------------------------------------------------------------------------------------------------ HF adapters


@pytest.fixture()
def hf_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")  # keep ~/.cache clean
    return tmp_path


def test_vqa_rad_hf_parquet_file_and_folder(hf_cache):
    ds = hf_vqa_dataset(6)
    data = hf_cache / "vqa" / "data"
    data.mkdir(parents=True)
    ds.to_parquet(str(data / "train-00000-of-00001.parquet"))
    hf_vqa_dataset(2).to_parquet(str(data / "test-00000-of-00001.parquet"))
    one_file = list(adapters.vqa_rad_hf(data / "train-00000-of-00001.parquet", "train"))
    from_folder = list(adapters.vqa_rad_hf(hf_cache / "vqa", "train"))
    assert len(one_file) == len(from_folder) == 6
    assert len(list(adapters.vqa_rad_hf(hf_cache / "vqa", "test"))) == 2
    for rec, i in zip(from_folder, range(6)):
        assert rec["image"] == image_bytes(seed=i)  # stored bytes, no decode/re-encode
        assert rec["answer_type"] == ("closed" if rec["target"] in ("yes", "no") else "open")
        assert rec["split"] == "train" and rec["source"] == "vqa_rad"
    rows = [validate_record(r) for r in from_folder]
    assert reject_summary(rows) == {} and rows[1]["answer_type"] == "closed" and rows[2]["answer_type"] == "open"
    with pytest.raises(ValueError, match="validation"):
        adapters.vqa_rad_hf(hf_cache / "vqa", "validation")


def test_hf_save_to_disk_pil_images_and_pathvqa(hf_cache):
    import datasets

    dd = datasets.DatasetDict({"train": hf_vqa_dataset(4, decode=True), "validation": hf_vqa_dataset(3)})
    dd.save_to_disk(str(hf_cache / "saved"))
    recs = list(adapters.pathvqa_hf(hf_cache / "saved", "validation"))
    assert len(recs) == 3 and all(r["source"] == "pathvqa" for r in recs)
    assert reject_summary([validate_record(r) for r in recs]) == {}
    single = hf_cache / "single"
    hf_vqa_dataset(5).save_to_disk(str(single))  # a lone Dataset: it is the split asked for
    assert len(list(adapters.vqa_rad_hf(single, "test"))) == 5


def test_roco_hf_ids_captions_and_limit(hf_cache):
    hf_caption_dataset(5).to_parquet(str(hf_cache / "roco.parquet"))
    recs = list(adapters.roco_hf(hf_cache / "roco.parquet", "train"))
    assert [r["id"] for r in recs] == [f"ROCO_{i:05d}" for i in range(5)]
    rows = [validate_record(r) for r in recs]
    assert reject_summary(rows) == {}
    assert rows[0]["target"] == "Axial CT of case 0." and rows[0]["prompt"] == "" and rows[0]["answer_type"] == ""
    small = [r["id"] for r in adapters.roco_hf(hf_cache / "roco.parquet", "train", limit=2, seed=3)]
    large = [r["id"] for r in adapters.roco_hf(hf_cache / "roco.parquet", "train", limit=4, seed=3)]
    assert len(small) == 2 and set(small) <= set(large)


def test_hf_missing_paths_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "absent.parquet"))):
        adapters.vqa_rad_hf(tmp_path / "absent.parquet", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no parquet files"):
        adapters.roco_hf(tmp_path / "empty", "train")


# ------------------------------------------------------------------------------------------------ PathVQA / Med-HALT


def test_pathvqa_original_layout(tmp_path):
    items = [{"img_id": "val_0001", "sentf": {"pvqa": ["What is shown?", "Is this carcinoma?"]},
              "labelf": {"pvqa": [{"carcinoma": 1}, {"yes": 1}]}},
             {"img_id": "val_0002", "sentf": {"pvqa": ["Is it benign?"]}, "labelf": {"pvqa": [{"no": 1}]}},
             {"img_id": "val_0003", "sentf": {"pvqa": []}, "labelf": {"pvqa": []}}]
    (tmp_path / "pvqa_val.json").write_text(json.dumps(items))
    (tmp_path / "images" / "val").mkdir(parents=True)
    (tmp_path / "images" / "val" / "val_0001.jpg").write_bytes(image_bytes())
    rows = [validate_record(r) for r in adapters.pathvqa_original(tmp_path, "validation")]
    assert [(r["id"], r["target"], r["answer_type"]) for r in rows] == [
        ("val_0001-0", "carcinoma", "open"), ("val_0001-1", "yes", "closed"), ("val_0002-0", "no", "closed")]
    assert [reason_prefix(r["reject_reason"]) for r in rows] == ["", "", "missing image"]


def test_pathvqa_released_layout_through_config_and_the_hf_reader(tmp_path):
    items = [{"img_id": "test_0001", "sentf": {"pvqa": ["Is this carcinoma?"]}, "labelf": {"pvqa": [{"yes": 1}]}}]
    (tmp_path / "pvqa_test.json").write_text(json.dumps(items))
    write_image(tmp_path / "images" / "test" / "test_0001.jpg")
    cfg = load_config("tiny", ["stage2.data.kind=pathvqa", f"stage2.data.path={tmp_path}"]).stage2.data
    via_config = [validate_record(r) for r in adapters.iter_raw_records(dataclasses.replace(cfg, split="test"))]
    via_hf_reader = [validate_record(r) for r in adapters.pathvqa_hf(tmp_path, "test")]  # the ood option's reader
    assert via_config == via_hf_reader and len(via_config) == 1
    assert (via_config[0]["reject_reason"], via_config[0]["target"], via_config[0]["source"]) == ("", "yes", "pathvqa")


def test_slake_release_layout(tmp_path):
    root = slake_release(tmp_path / "Slake1.0")
    train = [validate_record(r) for r in adapters.slake(root, "train")]
    assert [r["id"] for r in train] == ["0", "1", "3", "4"]  # the Chinese question (qid 2) is not yielded
    assert reject_summary(train) == {}
    by_id = {r["id"]: r for r in train}
    assert (by_id["3"]["target"], by_id["3"]["answer_type"]) == ("2", "open")  # an integer answer in the JSON
    assert by_id["1"]["answer_type"] == "closed" and by_id["1"]["question_type"] == "ORGAN"
    assert json.loads(by_id["4"]["meta"]) == {"modality": "X-Ray", "organ": "Lung", "content_type": "KG",
                                              "base_type": "kvqa", "img_id": 1, "qid": 4, "format": "original"}
    assert by_id["0"]["image_id"] == by_id["1"]["image_id"] != by_id["3"]["image_id"]
    assert by_id["0"]["image_name"] == "xmlab0/source.jpg" and by_id["0"]["source"] == "slake"
    val = list(adapters.slake(root, "validation"))  # validate.json
    assert [r["id"] for r in val] == ["5"] and val[0]["split"] == "validation"
    test = {r["id"]: validate_record(r) for r in adapters.iter_raw_records(DataConfig(kind="slake", path=str(root),
                                                                                      split="test"))}
    assert [reason_prefix(test[q]["reject_reason"]) for q in "6789"] == [
        "", "", "missing image", "image path outside the dataset folder"]
    cfg = load_config("tiny", ["stage2.data.kind=slake", f"stage2.data.path={root}"])
    assert [r["id"] for r in adapters.iter_raw_records(cfg.stage2.data)] == ["0", "1", "3", "4"]
    with pytest.raises(ValueError, match="SLAKE file not found"):
        adapters.slake(tmp_path, "train")


@needs_shared
def test_pathvqa_real_json_parses():
    recs = list(adapters.pathvqa_original(DATA / "pathvqa", "test"))
    assert len(recs) == 6761 and len({r["id"] for r in recs}) == 6761
    assert Counter(r["answer_type"] for r in recs) == {"closed": 3391, "open": 3370}


@needs_shared
def test_medhalt_fake_parses_without_eval(monkeypatch):
    def no_eval(*a, **k):
        raise AssertionError("eval must never be called on downloaded data")

    monkeypatch.setattr(builtins, "eval", no_eval)
    rows = [validate_record(r) for r in adapters.medhalt_fake(DATA / "medhalt" / "reasoning_fake.csv")]
    assert len(rows) == 1858 and len({r["id"] for r in rows}) == 1858
    assert reject_summary(rows) == {}  # no image, but meta.needs_image=false
    metas = [json.loads(r["meta"]) for r in rows]
    assert all(m["options_parsed"] and isinstance(m["options"], dict) for m in metas)
    assert sum(m["idk_option"] is not None for m in metas) == 1847
    assert {r["target"] for r in rows} == {"I do not know"} and {r["answer_type"] for r in rows} == {"open"}


def test_parse_options_is_literal_only():
    assert adapters.parse_options("{'0': 'a', '1': 'I do not know'}") == {"0": "a", "1": "I do not know"}
    assert adapters.parse_options("__import__('os').system('echo hacked')") is None
    assert adapters.parse_options("[1, 2]") is None and adapters.parse_options("{'a': ") is None


# ------------------------------------------------------------------------------------------------ subsets / dispatch


def test_subset_deterministic_and_nested():
    ids = [f"r{i}" for i in range(500)]
    a = adapters.subset_positions(ids, 50, seed=1)
    assert a == adapters.subset_positions(ids, 50, seed=1) == sorted(a) and len(a) == 50
    assert set(a) <= set(adapters.subset_positions(ids, 200, seed=1))
    assert a != adapters.subset_positions(ids, 50, seed=2)
    assert adapters.subset_positions(ids, None) == adapters.subset_positions(ids, 10_000) == list(range(500))
    shuffled = ids[::-1]  # selection depends on ids, not on file order
    assert {shuffled[i] for i in adapters.subset_positions(shuffled, 50, 1)} == {ids[i] for i in a}


@needs_shared
def test_iter_raw_records_dispatch_and_limit():
    cfg = DataConfig(kind="roco", path=str(DATA / "roco"), split="validation", limit=100, seed=7)
    small = [r["id"] for r in adapters.iter_raw_records(cfg)]
    again = [r["id"] for r in adapters.iter_raw_records(cfg)]
    cfg.limit = 1000
    large = [r["id"] for r in adapters.iter_raw_records(cfg)]
    assert small == again and len(small) == 100 and len(large) == 1000 and set(small) <= set(large)
    vqa = DataConfig(kind="vqa_rad", path=str(DATA / "vqa_rad"), split="test")
    assert sum(1 for _ in adapters.iter_raw_records(vqa)) == 451


def test_iter_raw_records_errors_name_the_path(tmp_path):
    for kind in ("vqa_rad", "roco", "vqa_rad_hf", "roco_hf", "pathvqa", "pathvqa_hf", "slake"):
        with pytest.raises(ValueError, match=re.escape(str(tmp_path / "missing"))):
            adapters.iter_raw_records(DataConfig(kind=kind, path=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="unknown data kind"):
        adapters.iter_raw_records(DataConfig(kind="nope", path="x"))  # type: ignore[arg-type]


def test_iter_raw_records_phantoms_match_the_pipeline_indices():
    recs = list(adapters.iter_raw_records(DataConfig(kind="phantom", task="caption", num_records=7, seed=3)))
    assert [r["id"] for r in recs] == [f"phantom-caption-train-{i}" for i in range(7)]
    assert len(list(adapters.iter_raw_records(DataConfig(kind="phantom", num_records=7, limit=3)))) == 3


# ------------------------------------------------------------------------------------------------ phantoms


def _expected_answer(q: str, m: dict) -> str:
    """The answer a reader of ``meta`` would give: an independent restatement of the generator's rules."""
    lesion = m["lesion"] == "present"
    yn = lambda b: "yes" if b else "no"  # noqa: E731
    if q in ("Is there a lesion?", "Is a lesion present?"):
        return yn(lesion)
    if g := re.fullmatch(r"Is the lesion on the (left|right) side\?", q):
        return yn(lesion and m["side"] == g[1])
    if g := re.fullmatch(r"Is the lesion (small|large)\?", q):
        return yn(lesion and m["size"] == g[1])
    if g := re.fullmatch(r"Does this image show the (\w+)\?", q):
        return yn(m["organ"] == g[1])
    if q in ("Is this a CT scan?", "Is this an X-ray?", "Is this an MRI?"):
        return yn({"Is this a CT scan?": "ct", "Is this an X-ray?": "x-ray", "Is this an MRI?": "mri"}[q]
                  == m["modality"])
    if q == "Which side is the lesion on?":
        return m["side"]
    if q == "What is the size of the lesion?":
        return m["size"]
    if q in ("What organ is shown?", "Which organ is this?"):
        return m["organ"]
    if q in ("What is the imaging modality?", "What modality is this?"):
        return m["modality"]
    raise AssertionError(f"unexpected question {q!r}")


@pytest.fixture(scope="module")
def phantom_vqa():
    return phantoms.phantom_records("vqa", 600, seed=0, split="train")


def test_phantoms_deterministic(phantom_vqa):
    again = phantoms.phantom_records("vqa", 20, seed=0, split="train")
    assert again == phantom_vqa[:20]  # same bytes, text and meta; a prefix of a longer list
    other_seed = phantoms.phantom_record(0, "vqa", seed=1, split="train")
    other_split = phantoms.phantom_record(0, "vqa", seed=0, split="test")
    ids = {phantom_vqa[0]["image_id"], other_seed["image_id"], other_split["image_id"]}
    assert len(ids) == 3
    assert len({r["image_id"] for r in phantom_vqa}) == len(phantom_vqa)


def test_phantom_answers_consistent_with_meta(phantom_vqa):
    for r in phantom_vqa:
        m = json.loads(r["meta"])
        assert r["target"] == _expected_answer(r["prompt"], m), (r["prompt"], r["target"], m)
        assert r["target"] in phantoms.ANSWER_VOCAB
        assert r["answer_type"] == ("closed" if r["target"] in ("yes", "no") else "open")
        assert r["question_type"] in phantoms.QUESTION_TYPES
        if m["lesion"] == "absent":
            assert m["side"] == m["size"] == "none"
    closed = Counter(r["target"] for r in phantom_vqa if r["answer_type"] == "closed")
    assert 0.42 < closed["yes"] / (closed["yes"] + closed["no"]) < 0.58  # balanced yes/no
    assert set(Counter(r["question_type"] for r in phantom_vqa)) == set(phantoms.QUESTION_TYPES)
    assert {r["target"] for r in phantom_vqa} == set(phantoms.ANSWER_VOCAB)


def test_phantoms_of_one_anatomy_ask_only_about_the_lesion():
    recs = phantoms.phantom_records("vqa", 300, seed=0, split="train", anatomy="ct/chest")
    metas = [json.loads(r["meta"]) for r in recs]
    assert {(m["modality"], m["organ"]) for m in metas} == {("ct", "chest")}
    assert {r["question_type"] for r in recs} == set(phantoms.LESION_QUESTION_TYPES)
    for r, m in zip(recs, metas):
        assert r["target"] == _expected_answer(r["prompt"], m)
    assert {m["lesion"] for m in metas} == {"present", "absent"} and {m["side"] for m in metas} >= {"left", "right"}
    via_config = list(adapters.iter_raw_records(DataConfig(kind="phantom", num_records=5, phantom_anatomy="ct/chest")))
    assert via_config == recs[:5]
    with pytest.raises(ConfigError, match="stage2.data.phantom_anatomy"):
        load_config("tiny", ["stage2.data.phantom_anatomy=ct/knee"])


def test_phantom_records_validate(phantom_vqa):
    rows = [validate_record(r) for r in phantom_vqa[:50]]
    assert reject_summary(rows) == {}
    assert [r["image_id"] for r in rows] == [r["image_id"] for r in phantom_vqa[:50]]
    im = Image.open(io.BytesIO(rows[0]["image"]))
    assert (im.format, im.mode, im.size) == ("PNG", "RGB", (64, 64))


def test_phantom_captions_mention_organ_modality_and_lesion():
    recs = phantoms.phantom_records("caption", 200, seed=0, split="train")
    assert reject_summary([validate_record(r) for r in recs[:20]]) == {}
    for r in recs:
        m = json.loads(r["meta"])
        assert r["prompt"] == "" and r["answer_type"] == ""
        assert m["organ"] in r["target"] and phantoms.MODALITY_WORD[m["modality"]] in r["target"]
        if m["lesion"] == "present":
            assert f"{m['size']} lesion" in r["target"] and m["side"] in r["target"]
        else:
            assert "no" in r["target"].split() and "left" not in r["target"] and "right" not in r["target"]
    assert len({r["target"] for r in recs}) > 30


def test_phantom_images_change_with_attributes():
    def img(**kw):
        truth = {"modality": "ct", "organ": "chest", "lesion": False, "side": "left", "size": "small", **kw}
        return phantoms.render_phantom(**truth, rng=5)[:, :, 0].astype(np.int16)

    base = img()
    for side in ("left", "right"):
        diff = np.abs(img(lesion=True, side=side, size="large") - base) > 80
        patient_left = diff[:, 32:].sum()  # radiological convention: the patient's left is on the image's right
        patient_right = diff[:, :32].sum()
        near, far = (patient_left, patient_right) if side == "left" else (patient_right, patient_left)
        assert near > 150 and far < 20, (side, near, far)
    small = (np.abs(img(lesion=True, size="small") - base) > 80).sum()
    large = (np.abs(img(lesion=True, size="large") - base) > 80).sum()
    assert 20 < small < large / 3
    for kw in ({"modality": "x-ray"}, {"modality": "mri"}, {"organ": "head"}, {"organ": "abdomen"}):
        assert np.abs(img(**kw) - base).mean() > 10, kw


# ------------------------------------------------------------------------------------------------ hygiene


def test_data_modules_import_no_model_or_ray():
    code = ("import sys, medvqa.data.records, medvqa.data.adapters, medvqa.data.phantoms; "
            "print([m for m in ('torch', 'transformers', 'ray', 'datasets') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
