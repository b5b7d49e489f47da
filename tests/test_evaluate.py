"""Evaluation matrix: swap hygiene (never the true image, seeded, same modality/organ when possible), resumable
cells, and one local-Ray run of base + a tiny trained adapter over true/swapped/expert."""

import json

import pandas as pd
import pytest

from medvqa.data.phantoms import phantom_records
from medvqa.data.records import validate_record
from medvqa.evaluate import (
    MEDHALT_CSV,
    build_cells,
    cell_path,
    medhalt_condition,
    run_matrix,
    swap_candidates,
    swapped_condition,
)

INSTRUCTION = "Answer briefly."


@pytest.fixture(scope="module")
def records():
    recs = [validate_record(r) for r in phantom_records("vqa", 24, seed=5, split="test")]
    assert not any(r["reject_reason"] for r in recs)
    return recs


def _meta(r):
    return json.loads(r["meta"])


# ------------------------------------------------------------------------------------------------- unit


def test_swap_never_shows_the_true_image_and_prefers_same_modality_and_organ(records):
    rows = swapped_condition(records, INSTRUCTION, seed=0)
    by_image = {r["image_id"]: r for r in records}
    assert len(rows) == len(records)
    for rec, row in zip(records, rows):
        assert row["question_id"] == rec["id"] and row["true_image_id"] == rec["image_id"]
        assert row["image_id_shown"] != rec["image_id"] and row["image"] != rec["image"]
        shown = _meta(by_image[row["image_id_shown"]])
        if row["swap_match"] == "modality+organ":
            assert (shown["modality"], shown["organ"]) == (_meta(rec)["modality"], _meta(rec)["organ"])
        elif row["swap_match"] == "modality":
            assert shown["modality"] == _meta(rec)["modality"]
            # only when no other image of the same modality AND organ exists
            assert not [r for r in records if r["image_id"] != rec["image_id"]
                        and (_meta(r)["modality"], _meta(r)["organ"]) == (_meta(rec)["modality"], _meta(rec)["organ"])]
    assert sum(r["swap_match"] == "modality+organ" for r in rows) >= len(rows) // 2


def test_swap_is_seeded_and_per_question(records):
    a = swapped_condition(records, INSTRUCTION, seed=0)
    assert [r["image_id_shown"] for r in a] == [r["image_id_shown"] for r in swapped_condition(records, INSTRUCTION, 0)]
    assert [r["image_id_shown"] for r in a] != [r["image_id_shown"] for r in swapped_condition(records, INSTRUCTION, 1)]
    # a question's swap depends on its id and the pool, not on the order of the questions
    rev = {r["question_id"]: r["image_id_shown"] for r in swapped_condition(records[::-1], INSTRUCTION, 0)}
    assert rev == {r["question_id"]: r["image_id_shown"] for r in a}


def test_swap_falls_back_to_any_other_image_without_meta():
    pool = {"a": (b"1", {}), "b": (b"2", {}), "c": (b"3", {"organ": "head"})}
    assert swap_candidates("a", {}, pool) == (["b", "c"], "any")
    assert swap_candidates("c", {"organ": "head"}, pool) == (["a", "b"], "any")  # no other head image
    pool["d"] = (b"4", {"organ": "head"})
    assert swap_candidates("c", {"organ": "head"}, pool) == (["d"], "organ")  # VQA-RAD meta: organ only
    with pytest.raises(ValueError):
        swapped_condition([{"id": "q", "image": b"x", "image_id": "a", "meta": "{}"}], INSTRUCTION)


def test_expert_and_medhalt_conditions(records):
    from medvqa.prompts import EXPERT_INSTRUCTION

    cells = build_cells(records[:6], ["true", "expert"], INSTRUCTION)
    assert {r["instruction"] for r in cells["true"]} == {INSTRUCTION}
    assert {r["instruction"] for r in cells["expert"]} == {EXPERT_INSTRUCTION}
    assert [r["prompt"] for r in cells["true"]] == [r["prompt"] for r in cells["expert"]]
    questions = [{"id": f"m{i}", "prompt": f"nonsense {i}?", "target": "I do not know", "answer_type": "open"}
                 for i in range(10)]
    rows = medhalt_condition(records[:6], INSTRUCTION, seed=3, questions=questions)
    images = {r["image_id"] for r in records[:6]}
    assert all(r["image_id_shown"] in images and r["true_image_id"] == "" for r in rows)
    assert rows == medhalt_condition(records[:6], INSTRUCTION, seed=3, questions=questions)


def test_medhalt_from_the_shared_csv(records):
    import os

    if not os.path.exists(MEDHALT_CSV):
        pytest.skip("no Med-HALT CSV here")
    cells = build_cells(records[:4], ["medhalt"], INSTRUCTION, medhalt_path=MEDHALT_CSV, medhalt_limit=7)
    assert len(cells["medhalt"]) == 7 and all(r["true_answer"] == "I do not know" for r in cells["medhalt"])


def _fake_cell(rows, model, answer):
    df = pd.DataFrame([{k: v for k, v in r.items() if k != "image"} for r in rows])
    df["model"] = model
    df["raw_prediction"] = answer
    df["predicted_answer"] = answer
    return df


def test_existing_cells_are_skipped_and_scored(records, tmp_path):
    from medvqa.config import load_config
    from medvqa.evaluate import _write_cell

    cfg = load_config("tiny")
    cells = build_cells(records, ["true", "swapped"], cfg.stage2.prompt)
    for c, rows in cells.items():
        _write_cell(_fake_cell(rows, "base", "yes"), cell_path(tmp_path, "base", c))
    before = {c: cell_path(tmp_path, "base", c).stat().st_mtime_ns for c in cells}
    # No Ray: every cell exists, so nothing is predicted (a model that needed predicting would start Ray).
    out = run_matrix(cfg, {"base": None, "two_stage": None}, records, tmp_path, conditions=["true", "swapped"],
                     n_boot=100)
    assert out["predicted"] == [] and sorted(out["skipped"]) == [["base", "swapped"], ["base", "true"]]
    assert {c: cell_path(tmp_path, "base", c).stat().st_mtime_ns for c in cells} == before
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["cells"]["base"]) == {"true", "swapped"} and "two_stage" not in metrics["cells"]
    assert metrics["image_reliance"]["base"]["normalized_em"]["drop"] == 0.0  # same answer on both
    # a stale cell (other questions) is refused, not silently reused
    _write_cell(_fake_cell(cells["true"][:3], "base", "no"), cell_path(tmp_path, "base", "true"))
    with pytest.raises(ValueError, match="other questions"):
        run_matrix(cfg, {"base": None}, records, tmp_path, conditions=["true"], n_boot=100)


# ------------------------------------------------------------------------------------------------- integration


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    """A run directory with config.yaml and a LoRA trained for a few steps as adapters/stage2."""
    from conftest import train_tiny_adapter

    from medvqa.config import dump_yaml, load_config
    from medvqa.model import load_processor, save_adapter

    cfg = load_config("tiny", [f"model.name_or_path={tiny_model_dir}", "resources.num_cpus=2"])
    run_dir = tmp_path_factory.mktemp("run")
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    model, _ = train_tiny_adapter(cfg, load_processor(cfg.model), steps=4)
    save_adapter(model, run_dir / "adapters" / "stage2")
    return cfg, run_dir


@pytest.mark.integration
def test_matrix_on_local_ray(ray_local, tiny_run, tmp_path):
    cfg, run_dir = tiny_run
    test = [validate_record(r) for r in phantom_records("vqa", 12, seed=cfg.stage2.data.seed, split="test")]
    conditions = ["true", "swapped", "expert"]
    kwargs = {"conditions": conditions, "seed": 0, "max_new_tokens": 4, "concurrency": 2, "cpus_per_actor": 0.25,
              "batch_size": 4, "n_boot": 200}
    out = run_matrix(cfg, {"base": None, "single_stage": None, "two_stage": run_dir}, test, tmp_path, **kwargs)
    assert sorted(out["predicted"]) == sorted([m, c] for m in ("base", "two_stage") for c in conditions)
    ids = sorted(r["id"] for r in test)
    true_image = {r["id"]: r["image_id"] for r in test}
    frames = {}
    for m in ("base", "two_stage"):
        for c in conditions:
            df = pd.read_parquet(cell_path(tmp_path, m, c))
            frames[m, c] = df
            assert sorted(df["question_id"]) == ids and len(df) == 12  # one row per question
            assert set(df["model"]) == {m} and set(df["condition"]) == {c}
            if c == "swapped":
                assert all(s != true_image[q] for q, s in zip(df["question_id"], df["image_id_shown"]))
            else:
                assert all(s == true_image[q] for q, s in zip(df["question_id"], df["image_id_shown"]))
    assert not (tmp_path / "predictions" / "single_stage").exists()
    assert list(frames["base", "true"]["raw_prediction"]) != list(frames["two_stage", "true"]["raw_prediction"])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for m in ("base", "two_stage"):
        for c in conditions:
            cell = metrics["cells"][m][c]
            assert cell["n"] == 12 and len(cell["ci"]["normalized_f1"]) == 2
            assert cell["ci"]["normalized_f1"][0] <= cell["normalized_f1"] <= cell["ci"]["normalized_f1"][1]
        assert "ci" in metrics["image_reliance"][m]["normalized_f1"]
    assert "two_stage_vs_base" in metrics["paired_true"]
    again = run_matrix(cfg, {"base": None, "two_stage": run_dir}, test, tmp_path, **kwargs)
    assert again["predicted"] == [] and len(again["skipped"]) == 6


@pytest.mark.integration
def test_eval_job_on_a_run_dir(ray_local, tiny_run):
    """`medvqa eval` (= jobs/eval_matrix.py) end to end (base only, small): the run's test split, Med-HALT and
    phantom ood cells."""
    import os

    if not os.path.exists(MEDHALT_CSV):
        pytest.skip("no Med-HALT CSV here")
    _, run_dir = tiny_run
    from typer.testing import CliRunner

    from medvqa.cli import app

    out = CliRunner().invoke(app, ["eval", str(run_dir), "--base-only", "--conditions", "true,medhalt", "--medhalt",
                                   MEDHALT_CSV, "--medhalt-limit", "4", "--ood", "--test-limit", "6",
                                   "--max-new-tokens", "3", "--cpus-per-actor", "0.25", "resources.num_cpus=2"])
    assert out.exit_code == 0, out.output
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert set(metrics["cells"]["base"]) == {"true", "medhalt", "ood"}
    assert metrics["cells"]["base"]["true"]["n"] == 6 and metrics["cells"]["base"]["medhalt"]["n"] == 4
    assert metrics["medhalt_abstention"]["base"]["n"] == 4
    ood = pd.read_parquet(run_dir / "eval" / "predictions" / "base" / "ood.parquet")
    true = pd.read_parquet(run_dir / "eval" / "predictions" / "base" / "true.parquet")
    assert not set(ood["image_id_shown"]) & set(true["image_id_shown"])  # another phantom seed: other images
