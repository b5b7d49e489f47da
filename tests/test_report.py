"""medvqa.report: the run report (md + html + PNGs) and the human-evaluation export / merge. No Ray, no model."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from medvqa.config import load_config
from medvqa.metrics import json_ready, matrix_metrics
from medvqa.predictions import CellWriter
from medvqa.report import (
    HumanEvalError,
    build_report,
    export_human_eval,
    cell_cost,
    fmt_ci,
    merge_human_eval,
    read_human_eval,
    stage_cost,
    training_log,
)
from medvqa.runs import RunDir

COMMIT = "0123456789abcdef0123456789abcdef01234567"

# (question_id, question, true answer, answer_type, question_type, image_id)
QUESTIONS = [
    ("q0", "Is there a fracture?", "yes", "CLOSED", "PRES", "img0"),
    ("q1", "Is the lung normal?", "no", "CLOSED", "ABN", "img1"),
    ("q2", "What organ is shown?", "chest", "OPEN", "ORGAN", "img2"),
    ("q3", "Which side is the lesion on?", "left", "CLOSED", "POS", "img3"),
    ("q4", "What modality is this?", "ct", "OPEN", "MODALITY", "img0"),
    ("q5", "Is there an effusion?", "yes", "CLOSED", "PRES", "img1"),
    ("q6", "What is abnormal?", "pleural effusion", "OPEN", "ABN", "img2"),
    ("q7", "Is this an MRI?", "no", "CLOSED", "MODALITY", "img3"),
]
# predictions per model/condition: index-aligned with QUESTIONS
PREDS = {
    ("base", "true"): ["yes", "yes", "abdomen", "right", "ct", "no", "nothing", "yes"],
    ("base", "swapped"): ["no", "yes", "brain", "right", "mri", "no", "nothing", "yes"],
    ("two_stage", "true"): ["yes", "no", "chest", "left", "ct scan", "yes", "effusion", "no"],
    ("two_stage", "swapped"): ["yes", "no", "head", "right", "ct", "no", "mass", "no"],
}


def _cell_frame(model: str, condition: str) -> pd.DataFrame:
    rows = []
    for (qid, q, a, at, qt, img), p in zip(QUESTIONS, PREDS[model, condition]):
        shown = img if condition == "true" else f"img{(int(img[-1]) + 1) % 4}"
        rows.append({"model": model, "condition": condition, "question_id": qid, "image_id_shown": shown,
                     "true_image_id": img, "prompt": q, "true_answer": a, "answer_type": at, "question_type": qt,
                     "source": "phantom", "instruction": "Answer briefly.",
                     "swap_match": "" if condition == "true" else "any", "shots": "", "raw_prediction": p,
                     "predicted_answer": p})
    return pd.DataFrame(rows)


# metrics.jsonl of a two-stage run, so the curves and the cost are known. stage1: one attempt of 40 s, 4 logged
# windows of 5 steps at 10, 10, 20, 20 samples/s (100, 100, 400, 400 tokens/s). stage2: killed 30 s after its start
# (last record), resumed from the step-5 checkpoint, finished in 50 s; steps 10 and validation round 1 were
# repeated by the resume (the repeat counts). Training throughput is time-weighted: each window lasts steps /
# samples_per_s, so stage1 runs 20 / 1.5 = 13.33 samples/s and 300 / 1.5 = 200 tokens/s, stage2 15 / 1.25 = 12 and
# 150 / 1.25 = 120; steady (the median window) 15 and 250, 16 and 160.
def _step(stage, step, t, sps, loss, tps=None, lr=1e-3):
    return {"stage": stage, "step": step, "total_steps": 20 if stage == "stage1" else 15, "epoch": 0, "loss": loss,
            "lr": lr, "samples_per_s": sps, "tokens_per_s": tps if tps is not None else 10 * sps, "time": t}


def _val(step, t, em, rnd):
    return {"stage": "stage2", "event": "validation", "step": step, "val_round": rnd, "val_final": step == 15,
            "val_n": 24, "val_normalized_em": em, "val_normalized_em_ci": [em - 0.1, em + 0.1],
            "val_normalized_f1": em + 0.05, "val_normalized_f1_ci": [em - 0.05, em + 0.15], "val_closed_accuracy": em,
            "val_closed_accuracy_ci": [em - 0.1, em + 0.1], "val_open_recall": None, "val_open_recall_ci": None,
            "val_seconds": 2.0, "time": t}


TRAINING_LOG = [
    {"stage": "stage1", "event": "start", "time": 1000.0},
    _step("stage1", 5, 1010.0, 10, 2.0, 100), _step("stage1", 10, 1020.0, 10, 1.5, 100),
    _step("stage1", 15, 1030.0, 20, 1.2, 400), _step("stage1", 20, 1040.0, 20, 1.0, 400),
    {"stage": "stage1", "event": "end", "seconds": 40.0, "time": 1045.0},
    {"stage": "stage2", "event": "start", "time": 2000.0},
    {"stage": "stage2", "event": "train_start", "step": 0, "checkpoint": None, "time": 2001.0},
    _step("stage2", 5, 2010.0, 8, 1.8), {"stage": "stage2", "event": "checkpoint", "step": 5, "time": 2011.0},
    _step("stage2", 10, 2020.0, 8, 9.9), _val(10, 2025.0, 0.1, 1), {"stage": "stage2", "step": 10, "time": 2030.0},
    {"stage": "stage2", "event": "start", "time": 3000.0},
    {"stage": "stage2", "event": "train_start", "step": 5, "checkpoint": "step_000005", "time": 3010.0},
    _step("stage2", 10, 3020.0, 16, 1.4), _val(10, 3022.0, 0.4, 1),
    _step("stage2", 15, 3040.0, 16, 1.1), _val(15, 3042.0, 0.6, 2),
    {"stage": "stage2", "event": "end", "seconds": 50.0, "time": 3050.0},
]
# the evaluation's timing of each cell (run_matrix writes it): base/true 8 questions in 4 s
TIMING = {"cells": {"base/true": {"rows": 8, "seconds": 4.0, "gpus": 0}, "base/swapped": {"rows": 8, "seconds": 2.0,
                                                                                         "gpus": 0},
                    "two_stage/true": {"rows": 8, "seconds": 8.0, "gpus": 0}}}


def write_cells(out: Path, frames: dict) -> dict:
    """Store prediction frames {(model, condition): df} as the evaluation does; {model: {condition: path}}."""
    paths: dict = {}
    for (m, c), df in frames.items():
        writer = CellWriter(out, m, {c: df.to_dict("records")}, {"test": m})
        if writer.pending():
            writer.add(df)
        paths.setdefault(m, {})[c] = writer.path(c).relative_to(out).as_posix()
    return paths


def write_metrics(out: Path, frames: dict, n_boot: int = 200) -> dict:
    """Cells and a metrics.json from the real scoring code (``metrics.matrix_metrics``), as ``run_matrix`` writes
    them."""
    metrics = matrix_metrics(frames, n_boot=n_boot, seed=0)
    metrics["settings"] = {"evaluated": list(dict.fromkeys(m for m, _ in frames)), "conditions": ["true", "swapped"],
                           "seed": 0, "n_questions": len(QUESTIONS), "cells": write_cells(out, frames)}
    (out / "metrics.json").write_text(json.dumps(json_ready(metrics)))
    return metrics


def make_run(root: Path, kind: str = "phantom", data_path: str = "") -> Path:
    """A fake run directory: config.yaml, environment.json, metrics.jsonl (``TRAINING_LOG``), eval/ cells and a
    metrics.json with ``TIMING``."""
    rd = RunDir(root / "tiny-run-abc123")
    overrides = [f"stage2.data.kind={kind}"] + ([f"stage2.data.path={data_path}"] if data_path else [])
    rd.write_config(load_config("tiny", overrides))
    rd.write_json(rd.environment, {"time": 0.0, "git": {"commit": COMMIT, "dirty": False}})
    (rd.path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TRAINING_LOG))
    metrics = write_metrics(rd.eval, {(m, c): _cell_frame(m, c) for m, c in PREDS})
    rd.write_json(rd.eval_metrics, json_ready({**metrics, "timing": TIMING}))
    return rd.path


@pytest.fixture()
def run_dir(tmp_path):
    return make_run(tmp_path)


def test_report_files_tables_and_provenance(run_dir):
    out = build_report(run_dir)
    rep = run_dir / "report"
    md = (rep / "report.md").read_text()
    page = (rep / "report.html").read_text()
    for name in ("metrics.png", "forest.png", "training_stage1.png", "training_stage2.png"):
        p = rep / "plots" / name
        assert p.exists() and p.stat().st_size > 1000
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plots/{name}" in md and f'src="plots/{name}"' in page
    assert sorted(out["plots"]) == sorted(str(rep / "plots" / n) for n in ("metrics.png", "forest.png",
                                                                           "training_stage1.png",
                                                                           "training_stage2.png"))

    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    for m in ("base", "two_stage"):
        for c in ("true", "swapped"):
            a = metrics["cells"][m][c]
            for k in ("paper_contains_em", "paper_f1", "paper_bleu1", "normalized_em", "normalized_f1",
                      "closed_accuracy", "open_recall"):
                cell = fmt_ci(a[k], a["ci"][k])
                assert cell in md and cell in page
    # two_stage on true: closed 5 of 5 right, e.g. normalized_em = 6/8 ('ct scan' and 'effusion' miss)
    assert f"{metrics['cells']['two_stage']['true']['normalized_em']:.3f}" == "0.750"
    assert "| two_stage | true | 8 |" in md
    # breakdowns, reliance, abstention, paired tests, leakage, provenance
    assert "By answer_type" in md and "By question_type" in md
    assert "| base | true | ORGAN | 1 |" in md
    assert "Image reliance" in md and "| two_stage | normalized_em |" in md
    assert "Med-HALT" in md and "The medhalt condition was not run." in md
    assert "two_stage_vs_base" in md
    assert "## Leakage" in md and "phantoms (seed 1)" in md and "image-disjoint as generated" in md
    assert "Shared images between the training and the test side: 0." in md
    assert COMMIT in md and COMMIT in page
    assert "tiny-run-abc123" in md and "Report generated:" in md
    assert "stage2:" in md and "../config.yaml" in md  # config embedded and linked
    # the HTML renders the text items' Markdown (a browser would otherwise show backticks and bracketed links)
    assert "<code>tiny-run-abc123</code>" in page and '<a href="../config.yaml">config.yaml</a>' in page
    assert "`" not in page.split("<pre>")[0] and "](" not in page
    assert "Human evaluation" in md and "human-export" in md
    assert "Across seeds" not in md and metrics["seeds"] == {}  # one run per model: no across-seed section


def test_training_curves_and_cost_per_stage_and_cell(run_dir):
    """Figure 4 and the cost tables from metrics.jsonl and eval/metrics.json (numbers: see TRAINING_LOG)."""
    logs = training_log(run_dir)
    s2 = logs["stage2"]
    assert [r["step"] for r in s2["steps"]] == [5, 10, 15] and s2["steps"][1]["loss"] == 1.4  # the resume's repeat
    assert [(r["val_round"], r["val_normalized_em"]) for r in s2["validation"]] == [(1, 0.4), (2, 0.6)]
    assert [e["step"] for e in s2["resumed"]] == [5] and logs["stage1"]["validation"] == []

    cost = {c["stage"]: c for c in stage_cost(run_dir)}
    assert (cost["stage1"]["attempts"], cost["stage1"]["seconds"], cost["stage1"]["steps"]) == (1, 40.0, 20)
    assert cost["stage1"]["samples_per_s"] == pytest.approx(20 / 1.5)
    assert cost["stage1"]["tokens_per_s"] == pytest.approx(200.0)
    assert (cost["stage2"]["attempts"], cost["stage2"]["seconds"]) == (2, 80.0)  # killed 30 s + resumed 50 s
    assert cost["stage2"]["samples_per_s"] == pytest.approx(12.0) and cost["stage2"]["validation_seconds"] == 4.0
    assert (cost["stage1"]["steady_samples_per_s"], cost["stage1"]["steady_tokens_per_s"]) == (15.0, 250.0)
    assert (cost["stage2"]["steady_samples_per_s"], cost["stage2"]["steady_tokens_per_s"]) == (16.0, 160.0)
    assert cost["stage1"]["gpu_hours"] is None  # the tiny preset trains on CPU
    gpu = {c["stage"]: c for c in stage_cost(run_dir, cfg={"resources": {"use_gpu": True, "num_workers": 2}})}
    assert gpu["stage2"]["gpus"] == 2 and gpu["stage2"]["gpu_hours"] == pytest.approx(2 * 80 / 3600)

    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    cells = {(c["model"], c["condition"]): c for c in cell_cost(metrics)}
    assert set(cells) == {("base", "true"), ("base", "swapped"), ("two_stage", "true")}  # two_stage/swapped: untimed
    assert cells["base", "true"]["questions_per_s"] == 2.0 and cells["base", "true"]["gpu_hours"] is None

    build_report(run_dir)
    md = (run_dir / "report" / "report.md").read_text()
    assert "## Training curves (Figure 4)" in md and "![training_stage2](plots/training_stage2.png)" in md
    assert "| stage2 | 1 | 10 | 24 | 0.400 [0.300, 0.500] | 0.450 [0.350, 0.550] |" in md  # validation rounds
    assert "| stage1 | 1 | 40.0 | 20 | 13.33 | 200 | 15.00 | 250 | 0.0 | — |" in md
    assert "| stage2 | 2 | 80.0 | 15 | 12.00 | 120 | 16.00 | 160 | 4.0 | — |" in md
    assert "| total | 3 | 120.0 |" in md
    assert "| base | true | 8 | 4.0 | 2.00 | — |" in md and "| total |  | 24 | 14.0 | 1.71 | — |" in md


def test_run_matrix_times_every_cell(records_and_cfg, tmp_path, monkeypatch):
    """run_matrix records each cell's questions and its share of the prediction job's wall time (no Ray: the job is
    replaced by one that streams two blocks, each 'taking' a known time): the wait for the first block is shared by
    all rows, a later block's time by its rows. A later call keeps the timing of the cells it skips."""
    import medvqa.evaluate as ev

    cfg, records = records_and_cfg
    cfg = load_config("tiny", ["eval.conditions=[true, swapped]", "eval.n_boot=50"])
    clock = {"now": 100.0}
    monkeypatch.setattr("time.perf_counter", lambda: clock["now"])
    last_block = []

    def fake_job(rows, *a, **k):
        df = pd.DataFrame(rows).drop(columns=["image"]).assign(raw_prediction="yes", predicted_answer="yes")
        clock["now"] += 3.0  # the first block (6 of the 8 rows, conditions interleaved by image) takes 3 s
        last_block.extend(df["condition"].iloc[6:])
        yield df.iloc[:6]
        clock["now"] += 1.0  # the last 2 rows 1 s
        yield df.iloc[6:]

    monkeypatch.setattr(ev, "_predict_rows", fake_job)
    out = ev.run_matrix(cfg, {"base": None}, records, tmp_path)
    timing = out["metrics"]["timing"]["cells"]
    n_true = last_block.count("true")
    assert timing["base/true"]["rows"] == 4 and timing["base/swapped"]["rows"] == 4
    assert timing["base/true"]["seconds"] == pytest.approx(3.0 * 4 / 8 + 1.0 * n_true / 2)
    assert timing["base/true"]["seconds"] + timing["base/swapped"]["seconds"] == pytest.approx(4.0)
    assert timing["base/true"]["gpus"] == 0
    again = ev.run_matrix(cfg, {"base": None}, records, tmp_path)
    assert again["metrics"]["timing"]["cells"] == timing  # skipped cells keep the timing of the call that ran them


@pytest.fixture()
def records_and_cfg():
    from medvqa.data.phantoms import phantom_records
    from medvqa.data.records import validate_record

    cfg = load_config("tiny")
    return cfg, [validate_record(r) for r in phantom_records("vqa", 4, seed=1, split="test")]


def test_seeds_are_a_dimension(tmp_path):
    """Two seeds of two_stage (``two_stage@<seed>``): per-seed values and mean ± SD across seeds in metrics.json and
    in the report; a model run with one seed gets no across-seed row."""
    run = make_run(tmp_path)
    other = _cell_frame("two_stage", "true")
    other["predicted_answer"] = other["raw_prediction"] = ["yes", "no", "chest", "left", "ct", "no", "effusion", "no"]
    frames = {(m, c): _cell_frame(m, c) for m, c in PREDS if m == "base"}
    for seed, df in (("0", _cell_frame("two_stage", "true")), ("1", other)):
        frames[f"two_stage@{seed}", "true"] = df.assign(model=f"two_stage@{seed}")
    metrics = write_metrics(run / "eval", frames, n_boot=100)
    em = [metrics["cells"][f"two_stage@{s}"]["true"]["normalized_em"] for s in "01"]
    assert em == [0.75, 0.75]  # seed 1: 'ct' right, 'no' wrong for q5
    f1 = [metrics["cells"][f"two_stage@{s}"]["true"]["normalized_f1"] for s in "01"]
    entry = metrics["seeds"]["two_stage"]["true"]
    assert entry["n_seeds"] == 2 and entry["seeds"] == ["0", "1"] and set(metrics["seeds"]) == {"two_stage"}
    assert entry["normalized_f1"]["per_seed"] == {"0": f1[0], "1": f1[1]}
    assert entry["normalized_f1"]["mean"] == pytest.approx(sum(f1) / 2)
    assert entry["normalized_f1"]["sd"] == pytest.approx(abs(f1[0] - f1[1]) / 2 ** 0.5)  # sample SD of two values
    assert entry["normalized_em"]["sd"] == 0.0 and "swapped" not in metrics["seeds"]["two_stage"]  # one seed only
    build_report(run)
    md = (run / "report" / "report.md").read_text()
    assert "## Across seeds" in md
    mean_sd = f"{entry['normalized_f1']['mean']:.3f} ± {entry['normalized_f1']['sd']:.3f}"
    assert "| two_stage | true | 2 | mean ± sd [min, max] |" in md and mean_sd in md
    assert "| two_stage | true |  | seed 1 |" in md


def test_human_export_only_open_questions(run_dir, tmp_path):
    csv = tmp_path / "human" / "to_score.csv"
    df = export_human_eval(run_dir, csv, resolve_images=False)
    assert csv.exists()
    back = pd.read_csv(csv, dtype=str, keep_default_na=False)
    assert list(back.columns) == ["model", "condition", "question_id", "question", "true_answer",
                                  "predicted_answer", "image_id_shown", "image_path", "clinician_score"]
    # non-yes/no questions: q2, q3 ('left', closed but not yes/no), q4, q6; 4 cells
    assert set(back["question_id"]) == {"q2", "q3", "q4", "q6"}
    assert len(back) == 16 == len(df)
    assert not set(back["true_answer"]) & {"yes", "no"}
    assert (back["clinician_score"] == "").all()
    row = back[(back.model == "base") & (back.condition == "swapped") & (back.question_id == "q2")].iloc[0]
    assert row["predicted_answer"] == "brain" and row["image_id_shown"] == "img3"
    assert row["question"] == "What organ is shown?"


def test_human_export_resolves_phantom_images(tmp_path):
    """The test images of a phantom run are regenerated and written next to the CSV (relative paths); an id that
    is not a test image is left empty."""
    from medvqa.evaluate import heldout_records

    run = make_run(tmp_path / "r")
    test = heldout_records(load_config("tiny").stage2.data, limit=4)
    frames = {(m, c): _cell_frame(m, c) for m, c in PREDS}
    df = frames["base", "true"]
    df.loc[df.question_id == "q2", "image_id_shown"] = test[0]["image_id"]
    write_metrics(run / "eval", frames)
    csv = tmp_path / "h" / "h.csv"
    out = export_human_eval(run, csv, resolve_images=True)
    row = out[(out.model == "base") & (out.condition == "true") & (out.question_id == "q2")].iloc[0]
    assert row["image_path"].startswith("human_images/")
    assert (csv.parent / row["image_path"]).read_bytes() == bytes(test[0]["image"])
    assert (out[out.image_id_shown != test[0]["image_id"]]["image_path"] == "").all()


def test_human_merge_and_report_table(run_dir, tmp_path):
    csv = tmp_path / "h.csv"
    export_human_eval(run_dir, csv, resolve_images=False)
    df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    df["clinician_score"] = ["5" if m == "two_stage" else "1" for m in df["model"]]
    df.loc[0, "clinician_score"] = ""  # blank = not judged
    filled = tmp_path / "filled.csv"
    df.to_csv(filled, index=False)
    summary = merge_human_eval(run_dir, filled)
    assert summary["two_stage"]["true"] == {"mean": 5.0, "n": 4, "ci": [5.0, 5.0]}
    assert summary["base"]["true"]["n"] + summary["base"]["swapped"]["n"] == 7
    assert (run_dir / "report" / "human_eval.csv").exists()
    md = Path(build_report(run_dir)["markdown"]).read_text()
    assert "Human evaluation (clinician scores" in md
    assert "| two_stage | true | 5.00 [5.00, 5.00] | 4 |" in md


def test_human_merge_rejects_bad_scores(run_dir, tmp_path):
    csv = tmp_path / "h.csv"
    export_human_eval(run_dir, csv, resolve_images=False)
    df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    df["clinician_score"] = "3"
    df.loc[2, "clinician_score"] = "7"
    df.loc[5, "clinician_score"] = "good"
    bad = tmp_path / "bad.csv"
    df.to_csv(bad, index=False)
    with pytest.raises(HumanEvalError) as e:
        merge_human_eval(run_dir, bad)
    msg = str(e.value)
    assert "row 4" in msg and "'7'" in msg and "row 7" in msg and "'good'" in msg
    assert f"{df.loc[2, 'model']}/{df.loc[2, 'condition']}/{df.loc[2, 'question_id']}" in msg
    assert not (run_dir / "report" / "human_eval.csv").exists()
    # no score at all, duplicates, missing column
    df["clinician_score"] = ""
    df.to_csv(bad, index=False)
    with pytest.raises(HumanEvalError, match="no clinician_score"):
        merge_human_eval(run_dir, bad)
    pd.concat([df, df.iloc[:1]]).to_csv(bad, index=False)
    with pytest.raises(HumanEvalError, match="duplicate"):
        read_human_eval(bad)
    df.drop(columns=["clinician_score"]).to_csv(bad, index=False)
    with pytest.raises(HumanEvalError, match="missing column"):
        read_human_eval(bad)


def _fake_vqa_rad(folder: Path) -> None:
    from data_fixtures import image_bytes

    from medvqa.data.adapters import VQA_RAD_IMAGES, VQA_RAD_JSON

    (folder / VQA_RAD_IMAGES).mkdir(parents=True)
    for i in range(3):
        (folder / VQA_RAD_IMAGES / f"img{i}.jpg").write_bytes(image_bytes(seed=i))
    items = [  # img0 in train and test: 1 of 2 test questions leaks its image
        {"qid": 1, "image_name": "img0.jpg", "question": "Is there a mass?", "answer": "yes",
         "answer_type": "CLOSED", "question_type": "PRES", "phrase_type": "freeform", "image_organ": "CHEST"},
        {"qid": 2, "image_name": "img1.jpg", "question": "What organ is shown?", "answer": "brain",
         "answer_type": "OPEN", "question_type": "ORGAN", "phrase_type": "freeform", "image_organ": "HEAD"},
        {"qid": 3, "image_name": "img0.jpg", "question": "Where is the mass?", "answer": "left lung",
         "answer_type": "OPEN", "question_type": "POS", "phrase_type": "test_freeform", "image_organ": "CHEST"},
        {"qid": 4, "image_name": "img2.jpg", "question": "Is this a CT?", "answer": "no",
         "answer_type": "CLOSED", "question_type": "MODALITY", "phrase_type": "test_freeform",
         "image_organ": "ABD"},
    ]
    (folder / VQA_RAD_JSON).write_text(json.dumps(items))


def test_leakage_section_vqa_rad_audit(tmp_path):
    data = tmp_path / "vqa_rad"
    _fake_vqa_rad(data)
    run = make_run(tmp_path / "runs", kind="vqa_rad", data_path=str(data))
    md = Path(build_report(run)["markdown"]).read_text()
    section = md.split("## Leakage", 1)[1].split("\n## ", 1)[0]
    assert "Protocol: official split of vqa_rad" in section and "Shared images between the training and the test " \
                                                                "side: 1." in section
    assert "1 of 2 test questions (50.0%) have their image in train" in section
    assert "Split audit: train (2 questions) vs test (2 questions)" in section


def test_leakage_section_never_omitted(tmp_path):
    run = make_run(tmp_path, kind="vqa_rad", data_path=str(tmp_path / "missing"))
    md = Path(build_report(run)["markdown"]).read_text()
    section = md.split("## Leakage", 1)[1].split("\n## ", 1)[0]
    assert "could not be computed" in section and "medvqa data audit" in section


def test_report_without_metrics_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="medvqa eval"):
        build_report(tmp_path)


def test_cli_report_and_human(run_dir, tmp_path):
    from typer.testing import CliRunner

    from medvqa.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["report", str(run_dir)])
    assert res.exit_code == 0, res.output
    assert (run_dir / "report" / "report.html").exists()
    csv = tmp_path / "h.csv"
    res = runner.invoke(app, ["human-export", str(run_dir), str(csv), "--no-images"])
    assert res.exit_code == 0, res.output
    assert "16 rows" in res.output
    df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    df["clinician_score"] = "9"
    df.to_csv(csv, index=False)
    res = runner.invoke(app, ["human-merge", str(run_dir), str(csv)])
    assert res.exit_code == 2
    df["clinician_score"] = "4"
    df.to_csv(csv, index=False)
    res = runner.invoke(app, ["human-merge", str(run_dir), str(csv)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["base"]["true"]["mean"] == 4.0
