"""Evaluation matrix: swap hygiene (never the true image, seeded, same modality/organ when possible), resumable
cells, and one local-Ray run of base + a tiny trained adapter over true/swapped/expert."""

import json

import pandas as pd
import pytest

from medvqa.data.phantoms import phantom_records
from medvqa.data.records import validate_record
from medvqa.evaluate import (
    MEDHALT_CSV,
    CellWriter,
    build_cells,
    cell_path,
    group_by_image,
    medhalt_condition,
    parts_dir,
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


def test_seed_runs_are_evaluated_as_model_at_seed(tmp_path, monkeypatch):
    """evaluate_run(seed_runs=...) names every run of the model <model>@<seed> (score_matrix then summarises them
    across seeds); two runs with one seed are refused."""
    import medvqa.evaluate as ev
    from medvqa.config import dump_yaml, load_config

    runs = []
    for seed in (0, 1):
        run = tmp_path / f"run{seed}"
        run.mkdir()
        cfg = load_config("tiny", [f"run.seed={seed}", "stage2.data.num_records=4"])
        (run / "config.yaml").write_text(dump_yaml(cfg))
        runs.append(run)
    seen = {}
    monkeypatch.setattr(ev, "run_matrix", lambda cfg, models, *a, **k: seen.update(models) or {})
    ev.evaluate_run(runs[0], seed_runs=[runs[1]], test_limit=2)
    name = "two_stage" if cfg.stage1.enabled else "single_stage"
    assert {k: v for k, v in seen.items() if k.startswith(name)} == {f"{name}@0": runs[0], f"{name}@1": runs[1]}
    with pytest.raises(ValueError, match="seed 0"):
        ev.evaluate_run(runs[0], seed_runs=[runs[0]], test_limit=2)


def test_rows_are_grouped_by_image_across_conditions(records):
    from medvqa.infer import image_key

    cells = build_cells(records[:8], ["true", "swapped", "expert"], INSTRUCTION, seed=0)
    rows = group_by_image([r for c in cells.values() for r in c])
    keys = [image_key(r["image"]) for r in rows]
    runs = [k for i, k in enumerate(keys) if i == 0 or k != keys[i - 1]]
    assert len(runs) == len(set(keys))  # every image's rows are consecutive, whatever their condition
    assert sorted(map(id, rows)) == sorted(id(r) for c in cells.values() for r in c)  # a permutation, nothing lost
    for k in set(keys):  # a stable sort: each condition keeps its order within an image
        for c in cells:
            mine = [r["question_id"] for r in rows if r["condition"] == c and image_key(r["image"]) == k]
            assert mine == [r["question_id"] for r in cells[c] if image_key(r["image"]) == k]


def _predicted(rows, model="base"):
    df = _fake_cell(rows, model, "yes")
    df["raw_prediction"] = [f"answer to {q}" for q in df["question_id"]]
    return df


def test_cells_stream_to_disk_and_an_interrupted_run_resumes_only_missing_rows(records, tmp_path):
    """A 'killed' job (the writer stops mid-stream): finished cells are on disk, unfinished ones are never taken as
    done, their streamed questions are kept, a torn part write is ignored, and the resumed run predicts only what is
    missing."""
    cells = build_cells(records[:10], ["true", "swapped", "expert"], INSTRUCTION, seed=0)
    writer = CellWriter(tmp_path, "base", cells)
    assert writer.finished == [] and len(writer.pending()) == 30
    stream = group_by_image([{**r, "model": "base"} for r in writer.pending()])
    for i in range(0, 16, 4):  # four batches of four arrive, then the job dies
        writer.add(_predicted(stream[i:i + 4]))
    done_rows = {(r["condition"], r["question_id"]) for r in stream[:16]}
    complete = [c for c in cells if all((c, r["question_id"]) in done_rows for r in cells[c])]
    for c in cells:  # a cell lands on disk the moment its last question arrives, not at the end of the job
        assert cell_path(tmp_path, "base", c).exists() == (c in complete)
        assert parts_dir(tmp_path, "base", c).exists() == (c not in complete and any(k[0] == c for k in done_rows))
    partial = next(c for c in cells if c not in complete and parts_dir(tmp_path, "base", c).exists())
    (parts_dir(tmp_path, "base", partial) / "torn.parquet.tmp").write_bytes(b"PAR1 half a file")

    again = CellWriter(tmp_path, "base", cells)
    assert sorted(again.finished) == sorted(complete)
    pending = {(r["condition"], r["question_id"]) for r in again.pending()}
    assert pending == {(c, r["question_id"]) for c in cells for r in cells[c]} - done_rows
    assert sum(again.reused_rows.values()) == len(done_rows) - sum(len(cells[c]) for c in complete)
    again.add(_predicted(again.pending()))
    assert again.done == {} and sorted(again.written) == sorted(set(cells) - set(complete))
    for c in cells:
        df = pd.read_parquet(cell_path(tmp_path, "base", c))
        assert list(df["question_id"]) == [r["question_id"] for r in cells[c]]  # the cell's order, no duplicates
        assert list(df["raw_prediction"]) == [f"answer to {q}" for q in df["question_id"]]
        assert not parts_dir(tmp_path, "base", c).exists()
    assert CellWriter(tmp_path, "base", cells).pending() == []


def test_parts_of_another_matrix_are_refused(records, tmp_path):
    cells = build_cells(records[:6], ["true"], INSTRUCTION)
    CellWriter(tmp_path, "base", cells).add(_predicted(cells["true"][:2]))
    other = build_cells(records[6:12], ["true"], INSTRUCTION)
    with pytest.raises(ValueError, match="not in this matrix"):
        CellWriter(tmp_path, "base", other)


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
    assert again["predicted"] == [] and len(again["skipped"]) == 6 and again["rows_predicted"] == {}

    # Resume after a kill: two_stage/true lost, two_stage/swapped left as parts holding 5 of its 12 questions (plus
    # a torn write). Only the 12 + 7 missing rows are predicted, with the answers of the uninterrupted run, and the
    # image-feature cache off gives the same answers.
    cell_path(tmp_path, "two_stage", "true").unlink()
    swapped = frames["two_stage", "swapped"]
    parts = parts_dir(tmp_path, "two_stage", "swapped")
    parts.mkdir()
    swapped.iloc[[0, 3, 4, 8, 11]].to_parquet(parts / "p0.parquet", index=False)
    (parts / "p1.parquet.tmp").write_bytes(b"PAR1 torn")
    cell_path(tmp_path, "two_stage", "swapped").unlink()
    resumed = run_matrix(cfg, {"base": None, "two_stage": run_dir}, test, tmp_path, **kwargs, feature_cache_mb=0)
    assert resumed["rows_predicted"] == {"two_stage/true": 12, "two_stage/swapped": 7}
    assert resumed["rows_reused"] == {"two_stage/swapped": 5}
    assert sorted(resumed["predicted"]) == [["two_stage", "swapped"], ["two_stage", "true"]]
    assert len(resumed["skipped"]) == 4 and not parts.exists()
    for c in ("true", "swapped"):
        pd.testing.assert_frame_equal(pd.read_parquet(cell_path(tmp_path, "two_stage", c)), frames["two_stage", c])


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
