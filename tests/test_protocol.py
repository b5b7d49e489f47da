"""Evaluation protocols (data.protocol): the image-disjoint re-split of a source's released splits, used alike by
training, the validation carve, the evaluation's test set and the report's leakage statement.

Unit tests on a small VQA-RAD release written here (generated images: 12 images, 3 organs, 4 questions each, the
official split sharing most test images with training); an integration test prepares training records through Ray
Data; the end-to-end test (slow tier) trains and evaluates a tiny two-stage run on the real VQA-RAD in
../shared under the image-disjoint protocol and checks the report states 0 shared images."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from data_fixtures import DATA, vqa_rad_item, vqa_rad_release

from medvqa.config import ConfigError, DataConfig, load_config
from medvqa.data.adapters import iter_raw_records
from medvqa.data.protocol import describe, iter_protocol_records, protocol_records, side_ids

ORGANS = ("CHEST", "HEAD", "ABD")


@pytest.fixture()
def release(tmp_path) -> Path:
    """12 images (4 per organ) x 4 questions; the official test split takes question 3 of every image (all 12 test
    images are training images) and image 11's missing file makes its 4 questions rejects."""
    items = []
    for img in range(12):
        for q in range(4):
            items.append(vqa_rad_item(img * 4 + q, f"img{img}.jpg", f"Question {q} about image {img}?",
                                      "yes" if q % 2 else "no", "test_freeform" if q == 3 else "freeform",
                                      f"g{img}-{q}", organ=ORGANS[img % 3]))
    return vqa_rad_release(tmp_path / "vqa_rad", items, {f"img{i}.jpg": i for i in range(11)})


def _data(release: Path, **kw) -> DataConfig:
    return DataConfig(kind="vqa_rad", path=str(release), protocol="image_disjoint", test_fraction=0.25, **kw)


def _image(record_id: str) -> int:
    return int(record_id) // 4


def test_image_disjoint_sides_partition_the_pooled_records_by_image(release):
    train = side_ids(_data(release, split="train"))
    test = side_ids(_data(release, split="test"))
    assert not train & test and len(train | test) == 48  # every record of both released splits, once
    train_images, test_images = {_image(i) for i in train}, {_image(i) for i in test}
    assert not train_images & test_images  # no image on both sides
    assert len(test) == 12  # 0.25 of 48 questions, whole images (3 of 12)
    assert sorted(ORGANS[i % 3] for i in test_images) == sorted(ORGANS)  # stratified: one image of each organ
    assert side_ids(_data(release, split="test")) == test  # seeded
    assert any(side_ids(_data(release, split="test", seed=s)) != test for s in (1, 2, 3))
    assert "stratified by organ" in describe(_data(release)) and "36 train / 12 test" in describe(_data(release))


def test_records_of_a_side_say_where_they_came_from_and_limits_are_seeded_subsets(release):
    rows, rejected = protocol_records(_data(release, split="test"))
    ids = side_ids(_data(release, split="test"))
    assert {r["id"] for r in rows} | {r["id"] for r in rejected} == ids
    assert all(r["split"] == "test" for r in rows)
    official = {json.loads(r["meta"])["official_split"] for r in rows}
    assert official <= {"train", "test"} and "train" in official  # the re-split moved official training records
    small = {r["id"] for r in iter_protocol_records(_data(release, split="test", limit=5))}
    larger = {r["id"] for r in iter_protocol_records(_data(release, split="test", limit=8))}
    assert len(small) == 5 and small < larger <= ids  # a larger limit is a superset


def test_official_protocol_is_the_release_as_it_is(release):
    data = DataConfig(kind="vqa_rad", path=str(release), split="test")
    assert side_ids(data) is None
    assert [r["id"] for r in iter_protocol_records(data)] == [r["id"] for r in iter_raw_records(data)]
    phantom = DataConfig(kind="phantom", split="test", num_records=4, protocol="image_disjoint")
    assert side_ids(phantom) is None and "image-disjoint as generated" in describe(phantom)


def test_rejected_records_keep_their_side_and_are_counted_there(release):
    found = {}
    for side in ("train", "test"):
        _, rejected = protocol_records(_data(release, split=side))
        found.update({r["id"]: (side, r["reject_reason"]) for r in rejected})
    assert sorted(found) == [str(i) for i in range(44, 48)]  # image 11's questions, each rejected once
    assert len({side for side, _ in found.values()}) == 1  # on one side together, grouped by the file they name
    assert all(reason.startswith("missing image") for _, reason in found.values())


def test_protocol_config_errors():
    load_config("tiny", ["stage2.data.protocol=image_disjoint"])  # phantoms: accepted (image-disjoint as generated)
    for overrides, key in ((["stage2.data.protocol=leaky"], "stage2.data.protocol"),
                           (["stage2.data.protocol=image_disjoint", "stage2.data.split=validation"],
                            "stage2.data.split"),
                           (["stage1.data.protocol=image_disjoint"], "stage1.data.protocol"),
                           (["stage2.data.test_fraction=1.0"], "stage2.data.test_fraction")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config("tiny", overrides)


@pytest.mark.integration
def test_training_records_and_the_validation_carve_come_from_the_training_side(ray_local, release, tmp_path):
    from medvqa.data.pipeline import prepare_records

    cfg = load_config("tiny")
    data = _data(release, split="train", validation_fraction=0.3)
    train_ids, test_ids = side_ids(data), side_ids(dataclasses.replace(data, split="test"))
    parts = {}
    for part in ("train", "validation"):
        manifest = prepare_records(data, tmp_path / part, tmp_path / f"rejects_{part}", cfg.resources, 0.5, part=part)
        parts[part] = {r for f in (tmp_path / part).glob("*.parquet")
                       for r in pq.read_table(f, columns=["id"]).column("id").to_pylist()}
        assert manifest["protocol"] == "image_disjoint"
    assert parts["train"] and parts["validation"] and not parts["train"] & parts["validation"]
    assert parts["train"] | parts["validation"] <= train_ids  # the carve stays inside the training side
    assert not {_image(i) for i in parts["train"] | parts["validation"]} & {_image(i) for i in test_ids}


VQA_RAD = DATA / "vqa_rad"


@pytest.mark.slow
def test_two_stage_run_on_the_image_disjoint_protocol_end_to_end(ray_local, tmp_path):
    """A tiny two-stage run on the real VQA-RAD under the image-disjoint protocol, trained and evaluated by one
    command; the report states 0 shared images (audited and measured on the run's own training records). The same
    run evaluated on the official test set is marked: it trained on most of those images."""
    if not (VQA_RAD / "VQA_RAD Dataset Public.json").exists():
        pytest.skip(f"no VQA-RAD release at {VQA_RAD}")
    from typer.testing import CliRunner

    from medvqa.cli import app
    from medvqa.runs import RunDir

    common = [f"run.output_dir={tmp_path}", "resources.num_cpus=2", "eval.cpus_per_actor=0.25",
              "eval.max_new_tokens=4", "eval.n_boot=100"]
    res = CliRunner().invoke(app, ["train", *common, "stage1.data.num_records=16", "stage1.epochs=1",
                                   "stage2.data.kind=vqa_rad", f"stage2.data.path={VQA_RAD}",
                                   "stage2.data.protocol=image_disjoint", "stage2.data.limit=24",
                                   "stage2.data.validation_fraction=0.2", "stage2.epochs=1", "run.evaluate=true",
                                   "eval.models=base,two_stage", "eval.conditions=true,blank,few_shot",
                                   "eval.test_limit=8"])
    assert res.exit_code == 0, res.output
    run = RunDir(Path(next(line for line in res.output.splitlines() if line.startswith("run dir: "))[9:]))
    metrics = json.loads(run.eval_metrics.read_text())
    assert set(metrics["cells"]["two_stage"]) == {"true", "blank", "few_shot"}
    leak = metrics["settings"]["leakage"]
    assert leak["meaningful"] and leak["per_model"]["two_stage"]["shared_images"] == 0
    manifest = json.loads(run.manifest.read_text())["stage2"]
    assert manifest["protocol"] == "image_disjoint" and manifest["valid"] <= 24
    from medvqa.report import build_report

    md = Path(build_report(run.path)["markdown"]).read_text()
    leakage = md.split("## Leakage", 1)[1].split("\n## ", 1)[0]
    assert "image-disjoint protocol on vqa_rad" in leakage
    assert "Shared images between the training and the test side: 0." in leakage
    assert "0 of 451 test questions (0.0%) have their image in train" in leakage
    assert "two_stage trained on 0 of the" in leakage and "NOT A CLEAN TEST" not in md

    # 40 official test questions: 1 of them is on one of the 19 images this run trained on (its 24 records less the
    # validation carve); any overlap makes the comparison unclean, measured, not assumed
    res = CliRunner().invoke(app, ["eval", str(run.path), "eval.protocol=official", "eval.models=two_stage",
                                   "eval.conditions=true", "eval.test_limit=40", *common[1:]])
    assert res.exit_code == 0, res.output
    metrics = json.loads(run.eval_metrics.read_text())
    assert not metrics["settings"]["leakage"]["meaningful"]
    assert metrics["settings"]["leakage"]["per_model"]["two_stage"]["questions"] == 1
    md = Path(build_report(run.path)["markdown"]).read_text()
    assert "NOT A CLEAN TEST: two_stage trained on images of this test set (official protocol" in md
