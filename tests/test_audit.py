"""Split leakage audit (image overlap, near-duplicate questions) and the image-disjoint split (GUIDE §3 "Splits").

Hand-made records first (pure functions, no images needed: ``image_id`` is just a string here), then the real
VQA-RAD in ../shared/data (skipped, with the path in the reason, where it is absent): its official split and a derived
split built from it the way the literature's are (the frames of test questions added to training), then the CLI on
fixtures in the release layouts.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from data_fixtures import slake_release, vqa_rad_item, vqa_rad_release

from medvqa.audit import (
    KINDS,
    audit_splits,
    format_audit,
    image_disjoint_split,
    image_overlap,
    linkage_groups,
    match_kind,
    near_duplicate_questions,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"
VQA_RAD = SHARED / "data" / "vqa_rad"
needs_vqa_rad = pytest.mark.skipif(not VQA_RAD.is_dir(), reason=f"real VQA-RAD not found at {VQA_RAD}")


def rec(rid, image_id, prompt, split="train", **meta) -> dict:
    return {"id": str(rid), "image_id": image_id, "prompt": prompt, "split": split, "meta": json.dumps(meta)}


# ------------------------------------------------------------------------------------------------ image overlap


def test_image_overlap_counts_questions_and_images():
    train = [rec(1, "A", "q"), rec(2, "A", "q2"), rec(3, "B", "q")]
    test = [rec(10, "A", "x", "test"), rec(11, "A", "y", "test"), rec(12, "B", "z", "test"),
            rec(13, "C", "w", "test"), rec(14, "", "no image", "test")]
    ov = image_overlap(train, test)
    assert ov["questions"] == 3 and ov["total_questions"] == 5 and ov["fraction"] == pytest.approx(0.6)
    assert ov["unique_images"] == 2 and ov["test_images"] == 3 and ov["train_images"] == 2
    assert ov["no_image"] == 1
    assert ov["example_ids"] == ["10", "11", "12"] and ov["clean_ids"] == ["13"]


def test_image_overlap_empty_sides():
    assert image_overlap([], [])["fraction"] == 0.0
    assert image_overlap([rec(1, "A", "q")], [rec(2, "B", "q", "test")])["questions"] == 0


# ------------------------------------------------------------------------------------------------ near duplicates


@pytest.mark.parametrize("q1, q2, kind", [
    ("Is there a fracture?", "is there fracture", "exact"),
    ("Is THE liver enlarged?!", "is the liver  enlarged", "exact"),
    ("Is the mass in the liver?", "In the liver, is the mass?", "reordered"),
    ("Is the left kidney enlarged?", "Is the right kidney enlarged?", "slot"),
    ("Is there evidence of fluid in the peritoneal cavity?", "Is there evidence of air in the pleural cavity?",
     "slot"),  # two slots in a long question
    ("Is there evidence of a pneumothorax?", "Is a pneumothorax present?", "content"),
    ("Are there pulmonary findings?", "Are there any pulmonary findings?", "content"),
])
def test_match_kind_detects_duplicates_and_templated_rewrites(q1, q2, kind):
    assert match_kind(q1, q2) == kind
    assert match_kind(q2, q1) == kind


@pytest.mark.parametrize("q1, q2", [
    ("Is this a CT?", "Is this an MRI?"),                    # short: the slot is the whole question
    ("Is this an axial image?", "Is this a CT image?"),      # only template words shared
    ("Where is the lesion?", "Is there a lesion?"),          # wh-words are content
    ("Is there a mass?", "Is there no mass?"),               # negation is content (too short for a slot)
    ("What organ is shown?", "Is the liver enlarged?"),
    ("Is the left kidney enlarged?", "Is the right lung collapsed?"),
    ("", ""),
    ("?", "Is there a fracture?"),
])
def test_match_kind_leaves_different_questions_alone(q1, q2):
    assert match_kind(q1, q2) is None


def test_near_duplicates_same_image_vs_cross_image():
    train = [rec(1, "A", "Is there a fracture?"), rec(2, "A", "Is the left kidney enlarged?"),
             rec(3, "B", "What organ is shown?"), rec(4, "C", "Is this a CT?")]
    test = [
        rec(10, "A", "is there FRACTURE", "test"),                 # exact, same image
        rec(11, "A", "Is the right kidney enlarged?", "test"),     # slot rewrite, same image
        rec(12, "D", "What organ is shown?", "test"),              # exact, other image
        rec(13, "A", "Is this an MRI?", "test"),                   # different question
        rec(14, "B", "Where is the lesion located?", "test"),      # different question
    ]
    nd = near_duplicate_questions(train, test)
    same, cross = nd["same_image"], nd["cross_image"]
    assert same["questions"] == 2 and same["exact"] == 1 and same["rewrite"] == 1
    assert same["by_kind"] == {"exact": 1, "linked": 0, "reordered": 0, "slot": 1, "content": 0}
    assert (same["linked"], same["lexical"]) == (0, 1)
    assert [(e["test_id"], e["kind"]) for e in same["flagged"]] == [("10", "exact"), ("11", "slot")]
    assert {(e["test_id"], e["train_id"], e["kind"]) for e in same["examples"]} == {("10", "1", "exact"),
                                                                                    ("11", "2", "slot")}
    assert cross["questions"] == 1 and cross["by_kind"]["exact"] == 1
    assert nd["n_train"] == 4 and nd["n_test"] == 5


def test_near_duplicates_count_strongest_kind_once():
    train = [rec(1, "A", "Is the left kidney enlarged?"), rec(2, "A", "Is the right kidney enlarged?")]
    nd = near_duplicate_questions(train, [rec(9, "A", "Is the right kidney enlarged?", "test")])
    assert nd["same_image"]["questions"] == 1 and nd["same_image"]["by_kind"]["exact"] == 1
    assert nd["same_image"]["examples"][0]["train_id"] == "2"
    assert nd["cross_image"]["questions"] == 0


def _synthetic(n: int, seed: int, split: str) -> list[dict]:
    rng = random.Random(seed)
    organs = ["liver", "left kidney", "right kidney", "spleen", "lung", "heart", "brain", "colon"]
    findings = ["enlarged", "normal", "abnormal", "calcified", "visible", "fractured"]
    templates = ["Is the {o} {f}?", "Is there evidence that the {o} is {f}?", "{f} {o}?", "Where is the {o}?",
                 "Is the {o} {f} in this image?", "Does the {o} appear {f}?", "What is {f} about the {o}?",
                 "Is this a CT?", "Is this an MRI?", "Is {f} the {o}?", "Is the {f} {o} seen on the left side of the image?"]
    return [rec(f"{split}{i}", f"img{rng.randrange(40)}",
                rng.choice(templates).format(o=rng.choice(organs), f=rng.choice(findings)), split)
            for i in range(n)]


def test_bucketed_near_duplicates_equal_brute_force():
    train, test = _synthetic(400, 1, "train"), _synthetic(150, 2, "test")
    nd = near_duplicate_questions(train, test)
    expected = {"same_image": Counter(), "cross_image": Counter()}
    for t in test:
        best = {}
        for r in train:
            kind = match_kind(t["prompt"], r["prompt"])
            side = "same_image" if r["image_id"] == t["image_id"] else "cross_image"
            if kind and (side not in best or KINDS.index(kind) < KINDS.index(best[side])):
                best[side] = kind
        for side, kind in best.items():
            expected[side][kind] += 1
    for side, counts in expected.items():
        assert nd[side]["by_kind"] == {k: counts[k] for k in KINDS}, side
        assert sum(counts.values()) == nd[side]["questions"] > 0


def test_audit_splits_statement_and_report():
    train = [rec(1, "A", "Is there a fracture?"), rec(2, "B", "Is the liver enlarged?")]
    test = [rec(10, "A", "Is there a fracture?", "test"), rec(11, "C", "Is the liver normal?", "test")]
    result = audit_splits(train, test)
    assert result["statement"] == ("1 of 2 test questions (50.0%) have their image in train (by content hash); 1 "
                                   "near-duplicate questions on the same image (1 exact, linked rewrites not checked: "
                                   "no linkage in the data, 0 lexical rewrites); 0 have a near-duplicate on another "
                                   "image.")
    assert result["sizes"] == {"train": 2, "test": 2} and result["names"] == {"a": "train", "b": "test"}
    json.dumps(result)  # serialisable
    text = format_audit(result)
    assert result["statement"] in text and "1 of 2 (50.0%)" in text and "Is there a fracture?" in text
    named = audit_splits(train, test, name_a="dev", name_b="heldout")
    assert "heldout questions" in named["statement"] and "image in dev" in named["statement"]


# ------------------------------------------------------------------------------------------------ linked rewrites


def vrec(rid, image_id, prompt, split="train", group="", frame=None, rephrase=None, relation="strict agreement"):
    """A record with VQA-RAD's linkage meta (as ``adapters.vqa_rad_original`` keeps it)."""
    return {**rec(rid, image_id, prompt, split, qid_linked_id=group, question_frame=frame,
                  question_rephrase=rephrase, question_relation=relation), "image_name": f"{image_id}.jpg"}


def test_linked_rewrites_from_the_datasets_own_linkage():
    train = [vrec(1, "A", "Are >12 ribs present in the image?", group="g1"),
             vrec(2, "A", "Is there a pneumothorax?", group="g2"),
             vrec(3, "B", "Is the heart enlarged?", group="g3", relation="Subsumes"),
             vrec(4, "C", "Is/Are the lungs normal size?", group="g9")]  # the same text on another image
    test = [vrec(10, "A", "does this represent adequate inspiratory effort?", "test", group="g1",
                 frame="Is/Are the lungs normal size?"),
            vrec(11, "B", "Is there cardiomegaly?", "test", group="g3", relation="Subsumed"),  # loose: not linked
            vrec(12, "A", "Is there a pneumothorax?", "test", group="g2")]
    assert match_kind(train[0]["prompt"], test[0]["prompt"]) is None  # no lexical rule sees this rewrite
    nd = near_duplicate_questions(train, test)
    same = nd["same_image"]
    assert [(e["test_id"], e["train_id"], e["kind"]) for e in same["flagged"]] == [("10", "1", "linked"),
                                                                                  ("12", "2", "exact")]
    assert (same["questions"], same["exact"], same["linked"], same["lexical"], same["rewrite"]) == (2, 1, 1, 0, 1)
    assert nd["cross_image"]["linked"] == 0  # a linkage group lives on one image
    assert nd["linkage"] == {"train_rows": 4, "test_rows": 3, "reference_rows": 0}


def test_reference_recovers_the_linkage_a_derived_split_dropped():
    original = [vrec(1, "A", "Is there a rib fracture?", "test", group="g1", frame="Is/Are there a rib fracture?",
                     rephrase="Is there evidence of any fractures of the ribs?"),
                vrec(2, "A", "Is there evidence of any fractures of the ribs?", "test", group="g1",
                     frame="Is/Are there fracturing in the patient's ribs?"),
                vrec(3, "A", "Is the heart enlarged?", "train", group="g2", frame="Is/Are the heart enlarged?",
                     relation="conversion")]
    bare = lambda r, **kw: {**r, "meta": "{}", **kw}  # noqa: E731 - the derived split keeps no linkage fields
    test = [bare(original[0]), bare(original[1])]
    train = [bare(original[2]), bare(original[1], id="f2", prompt="Is/Are there fracturing in the patient's ribs?",
                                      split="train")]
    groups = linkage_groups(train + test, reference=original)
    assert groups[0] == {"g2#3"} and groups[1] == {"g1"} == groups[2] == groups[3]
    assert linkage_groups(train + test) == [frozenset()] * 4
    lexical = near_duplicate_questions(train, test)["same_image"]
    linked = near_duplicate_questions(train, test, reference=original)["same_image"]
    assert lexical["questions"] == 0  # "fracturing in the patient's ribs" is no lexical rewrite of either
    assert [(e["test_id"], e["train_id"], e["kind"]) for e in linked["flagged"]] == [("1", "f2", "linked"),
                                                                                    ("2", "f2", "linked")]
    # joined by file name when the derived split re-encoded the images (another content hash)
    renamed = [{**r, "image_id": "A2"} for r in train + test]
    assert near_duplicate_questions(renamed[:2], renamed[2:], reference=original)["same_image"]["linked"] == 2


# ------------------------------------------------------------------------------------------------ disjoint split


def _with_images(n_images: int = 60, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for k in range(n_images):
        organ = ["HEAD", "CHEST", "ABD"][k % 3]
        for q in range(rng.randint(1, 12)):
            rows.append(rec(f"{k}-{q}", f"img{k}", f"question {q} about image {k}", "train", organ=organ))
    return rows


def test_image_disjoint_split_properties():
    rows = _with_images()
    train, test = image_disjoint_split(rows, test_fraction=0.25, seed=3)
    assert len(train) + len(test) == len(rows)
    assert sorted(r["id"] for r in train + test) == sorted(r["id"] for r in rows)
    assert not {r["image_id"] for r in train} & {r["image_id"] for r in test}
    assert {r["split"] for r in train} == {"train"} and {r["split"] for r in test} == {"test"}
    assert abs(len(test) / len(rows) - 0.25) < 0.05
    assert audit_splits(train, test)["image_overlap"]["questions"] == 0
    # deterministic, independent of input order, different for another seed; input rows untouched
    again = image_disjoint_split(list(reversed(rows)), test_fraction=0.25, seed=3)[1]
    assert sorted(r["id"] for r in again) == sorted(r["id"] for r in test)
    other = image_disjoint_split(rows, test_fraction=0.25, seed=4)[1]
    assert sorted(r["id"] for r in other) != sorted(r["id"] for r in test)
    assert all(r["split"] == "train" for r in rows)


def test_image_disjoint_split_stratified_and_edges():
    rows = _with_images(90, seed=1)
    train, test = image_disjoint_split(rows, test_fraction=0.3, seed=0, stratify_by="organ")
    total = Counter(json.loads(r["meta"])["organ"] for r in rows)
    held = Counter(json.loads(r["meta"])["organ"] for r in test)
    for organ in total:
        assert abs(held[organ] / total[organ] - 0.3) < 0.06, organ
    assert not {r["image_id"] for r in train} & {r["image_id"] for r in test}
    assert image_disjoint_split(rows, 0.0)[1] == [] and image_disjoint_split(rows, 1.0)[0] == []
    no_image = [rec(i, "", f"q{i}") for i in range(20)]
    tr, te = image_disjoint_split(no_image, 0.5)
    assert len(tr) + len(te) == 20 and len(te) == 10
    tr, te = image_disjoint_split(rows, 0.2, names=("dev", "heldout"))
    assert {r["split"] for r in te} == {"heldout"}
    with pytest.raises(ValueError, match="test_fraction"):
        image_disjoint_split(rows, 1.5)


# ------------------------------------------------------------------------------------------------ real VQA-RAD


@pytest.fixture(scope="module")
def vqa_rad_rows():
    from medvqa.data.adapters import vqa_rad_original
    from medvqa.data.records import validate_record

    rows = []
    for raw in vqa_rad_original(VQA_RAD, "all"):
        row = validate_record(raw)
        row["image"] = b""
        rows.append(row)
    return rows


@needs_vqa_rad
def test_vqa_rad_official_split_overlap(vqa_rad_rows):
    assert len(vqa_rad_rows) == 2248 and not any(r["reject_reason"] for r in vqa_rad_rows)
    train = [r for r in vqa_rad_rows if r["split"] == "train"]
    test = [r for r in vqa_rad_rows if r["split"] == "test"]
    result = audit_splits(train, test)
    ov = result["image_overlap"]
    assert (len(train), len(test)) == (1797, 451)
    assert ov["questions"] == 446 and ov["total_questions"] == 451
    assert result["statement"].startswith("446 of 451 test questions (98.9%) have their image in train")
    # The official split keeps every linkage group on one side, so the same-image hits are few, and each is listed
    # here with what it is. Two repeat a training question and its answer about the image: 447 is 422 word for word
    # (both "Anterior mediastinum"), 1301 is 1306 but for "any" (both "No"). Two are template siblings on the
    # image, another finding in the same slot: air vs fluid in the peritoneal cavity (both "No"), the right vs the
    # left hemidiaphragm ("No" vs "Yes").
    nd = result["near_duplicates"]
    same = nd["same_image"]
    assert [(e["test_id"], e["train_id"], e["kind"]) for e in same["flagged"]] == [
        ("103", "118", "slot"), ("299", "195", "slot"), ("447", "422", "exact"), ("1301", "1306", "content")]
    assert (same["exact"], same["linked"], same["lexical"]) == (1, 0, 3)
    assert nd["linkage"] == {"train_rows": 1797, "test_rows": 451, "reference_rows": 0}
    cross = nd["cross_image"]
    assert (cross["questions"], cross["exact"], cross["linked"], cross["lexical"]) == (188, 85, 0, 103)


def _derived_split(rows: list[dict]) -> tuple[list[dict], list[dict], set[str]]:
    """A derived split as the literature builds them from VQA-RAD: the official train and test questions plus every
    record's templated frame as a training question of its own, on the same image with the same answer (frames of
    test questions included: 1,797 + 1,267 = 3,064 training questions), every linkage field dropped. Returns (train,
    test, ids of the test questions whose frame went into training)."""
    def bare(r: dict, **kw) -> dict:
        meta = {k: v for k, v in json.loads(r["meta"]).items()
                if k not in ("qid_linked_id", "question_frame", "question_rephrase", "question_relation")}
        return {**r, "meta": json.dumps(meta), **kw}

    frames = [bare(r, id=f"frame-{r['id']}", prompt=json.loads(r["meta"])["question_frame"], split="train")
              for r in rows if json.loads(r["meta"])["question_frame"]]
    train = [bare(r) for r in rows if r["split"] == "train"] + frames
    test = [bare(r) for r in rows if r["split"] == "test"]
    framed = {f["id"][len("frame-"):] for f in frames} & {r["id"] for r in test}
    return train, test, framed


@needs_vqa_rad
def test_vqa_rad_derived_split_with_test_frames(vqa_rad_rows):
    train, test, framed = _derived_split(vqa_rad_rows)
    assert (len(train), len(test), len(framed)) == (3064, 451, 284)
    lexical = audit_splits(train, test)
    joined = audit_splits(train, test, reference=vqa_rad_rows)

    def flagged(result: dict) -> dict[str, str]:
        return {e["test_id"]: e["kind"] for e in result["near_duplicates"]["same_image"]["flagged"]}

    # the lexical matcher alone finds fewer than half of the test questions whose frame is in training ...
    assert len(set(flagged(lexical)) & framed) == 109 < len(framed) / 2
    assert "linked rewrites not checked: no linkage in the data" in lexical["statement"]
    # ... joined against the original release, the audit finds every one (and two whose strict paraphrase's frame
    # was added), as exact (the frame repeats the question) or linked rewrites
    assert framed <= set(flagged(joined)) and len(flagged(joined)) == 286
    same = joined["near_duplicates"]["same_image"]
    assert (same["exact"], same["linked"], same["lexical"]) == (16, 270, 0)
    assert set(flagged(lexical)) <= set(flagged(joined))
    assert joined["near_duplicates"]["linkage"] == {"train_rows": 3064, "test_rows": 451, "reference_rows": 2248}
    assert "(16 exact, 270 linked rewrites, 0 lexical rewrites)" in joined["statement"]


@needs_vqa_rad
def test_vqa_rad_image_disjoint_split(vqa_rad_rows):
    train, test = image_disjoint_split(vqa_rad_rows, test_fraction=0.2, seed=0)
    assert len(train) + len(test) == 2248
    assert sorted(r["id"] for r in train + test) == sorted(r["id"] for r in vqa_rad_rows)
    assert abs(len(test) / 2248 - 0.2) < 0.01
    result = audit_splits(train, test)
    assert result["image_overlap"]["questions"] == 0 and result["image_overlap"]["unique_images"] == 0
    assert result["near_duplicates"]["same_image"]["questions"] == 0
    again = image_disjoint_split(vqa_rad_rows, test_fraction=0.2, seed=0)[1]
    assert [r["id"] for r in again] == [r["id"] for r in test]
    assert [r["id"] for r in image_disjoint_split(vqa_rad_rows, 0.2, seed=1)[1]] != [r["id"] for r in test]
    strat_train, strat_test = image_disjoint_split(vqa_rad_rows, test_fraction=0.2, seed=0, stratify_by="organ")
    total = Counter(json.loads(r["meta"])["organ"] for r in vqa_rad_rows)
    held = Counter(json.loads(r["meta"])["organ"] for r in strat_test)
    assert all(abs(held[o] / total[o] - 0.2) < 0.02 for o in total), held
    assert audit_splits(strat_train, strat_test)["image_overlap"]["questions"] == 0


@needs_vqa_rad
def test_cli_audit_json():
    from typer.testing import CliRunner

    from medvqa.cli import app

    runner = CliRunner()
    out = runner.invoke(app, ["data", "audit", "--kind", "vqa_rad", "--path", str(VQA_RAD), "--json"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)
    assert result["image_overlap"]["questions"] == 446 and result["image_overlap"]["total_questions"] == 451
    assert result["sizes"] == {"train": 1797, "test": 451} and result["data"]["split"] == "official"
    assert result["data"]["rejected"] == {"train": 0, "test": 0}

    out = runner.invoke(app, ["data", "audit", "--path", str(VQA_RAD), "--disjoint", "--stratify", "organ",
                              "--seed", "0", "--json"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)
    assert result["image_overlap"]["questions"] == 0 and result["data"]["split"] == "image_disjoint"
    assert sum(result["sizes"].values()) == 2248 and abs(result["sizes"]["test"] / 2248 - 0.2) < 0.01

    out = runner.invoke(app, ["data", "audit", "--path", str(VQA_RAD)])
    assert out.exit_code == 0 and "446 of 451 test questions (98.9%)" in out.stdout


def test_cli_audit_missing_path(tmp_path):
    from typer.testing import CliRunner

    from medvqa.cli import app

    out = CliRunner().invoke(app, ["data", "audit", "--kind", "vqa_rad", "--path", str(tmp_path / "nowhere")])
    assert out.exit_code == 2 and "not found" in out.output and "nowhere" in out.output


def _release_and_derived(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny VQA-RAD release (with its linkage) and a split derived from it: the frames of the two linked test
    questions added to training as questions of their own, every linkage field dropped, the same image files."""
    images = {"synpic1.jpg": 1, "synpic2.jpg": 2}
    items = [vqa_rad_item(1, "synpic1.jpg", "Is there a pneumothorax?", "No", "freeform", "g1",
                          frame="Is/Are there pneumothorax?"),
             vqa_rad_item(2, "synpic1.jpg", "does this represent adequate inspiratory effort?", "Yes", "test_freeform",
                          "g2", frame="Is/Are the lungs normal size?", rephrase="Are >12 ribs present in the image?"),
             vqa_rad_item(3, "synpic1.jpg", "Are >12 ribs present in the image?", "Yes", "test_para", "g2",
                          frame="Are there >12 of ribs?", rephrase="does this represent adequate inspiratory effort?"),
             vqa_rad_item(4, "synpic2.jpg", "Is the liver enlarged?", "No", "test_freeform", "g3")]
    original = vqa_rad_release(tmp_path / "original", items, images)
    linkage = ("qid_linked_id", "question_frame", "question_rephrase", "question_relation")
    derived = [{k: v for k, v in it.items() if k not in linkage} for it in items]
    derived += [{**derived[i], "qid": f"f{i}", "question": items[i]["question_frame"], "phrase_type": "frame"}
                for i in (1, 2)]
    return original, vqa_rad_release(tmp_path / "derived", derived, images)


def test_cli_audit_reference_recovers_linked_rewrites(tmp_path):
    from typer.testing import CliRunner

    from medvqa.cli import app

    original, derived = _release_and_derived(tmp_path)
    runner = CliRunner()
    args = ["data", "audit", "--kind", "vqa_rad", "--path", str(derived), "--json"]
    alone = json.loads(runner.invoke(app, args).stdout)
    joined = runner.invoke(app, [*args, "--reference", str(original)])
    assert joined.exit_code == 0, joined.output
    joined = json.loads(joined.stdout)
    assert alone["sizes"] == joined["sizes"] == {"train": 3, "test": 3}
    same_alone, same = alone["near_duplicates"]["same_image"], joined["near_duplicates"]["same_image"]
    assert [(e["test_id"], e["kind"]) for e in same_alone["flagged"]] == [("3", "content")]  # ">12 ribs" only
    # 2 and 3 are paraphrases in strict agreement: each is linked to both frames (the first is listed)
    assert [(e["test_id"], e["train_id"], e["kind"]) for e in same["flagged"]] == [("2", "f1", "linked"),
                                                                                  ("3", "f1", "linked")]
    assert same["questions"] == 2 and (same["exact"], same["linked"], same["lexical"]) == (0, 2, 0)
    assert joined["near_duplicates"]["linkage"]["reference_rows"] == 4 and joined["data"]["reference"] == str(original)
    text = runner.invoke(app, ["data", "audit", "--path", str(derived), "--reference", str(original)]).stdout
    assert "(0 exact, 2 linked rewrites, 0 lexical rewrites)" in text and "joined against 4 reference" in text
    bad = runner.invoke(app, [*args, "--reference", str(tmp_path / "nowhere")])
    assert bad.exit_code == 2 and "nowhere" in bad.output


def test_cli_audit_slake(tmp_path):
    from typer.testing import CliRunner

    from medvqa.cli import app

    root = slake_release(tmp_path / "Slake1.0")
    out = CliRunner().invoke(app, ["data", "audit", "--kind", "slake", "--path", str(root), "--json"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)
    assert result["sizes"] == {"train": 4, "test": 2}  # English only; the test image not shipped and the escaping
    assert result["data"]["rejected"] == {"train": 0, "test": 2}  # path are rejects, left out of the audit
    assert (result["image_overlap"]["questions"], result["image_overlap"]["unique_images"]) == (1, 1)
    same = result["near_duplicates"]["same_image"]
    assert [(e["test_id"], e["train_id"], e["kind"]) for e in same["flagged"]] == [("6", "1", "exact")]
    assert "linked rewrites not checked" in result["statement"]
