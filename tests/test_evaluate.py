"""Evaluation matrix: swap hygiene (never the true image, seeded, same modality/organ when possible), cells stored
and resumed by what produced them, and one local-Ray run of base + a tiny trained adapter over true/swapped/expert."""

import json
from pathlib import Path

import pandas as pd
import pytest

import medvqa.evaluate as ev
from medvqa.conditions import build_cells, medhalt_condition, swap_candidates, swapped_condition
from medvqa.config import load_config
from medvqa.data.phantoms import phantom_records
from medvqa.data.records import validate_record
from medvqa.evaluate import group_by_image, run_matrix
from medvqa.predictions import CellWriter, cell_key
from medvqa.runs import RunDir, run_id

INSTRUCTION = "Answer briefly."
MEDHALT_CSV = Path(__file__).resolve().parents[2] / "shared" / "data" / "medhalt" / "reasoning_fake.csv"
PRODUCER = {"model": "test", "decoding": {"max_new_tokens": 4}}


@pytest.fixture(scope="module")
def records():
    recs = [validate_record(r) for r in phantom_records("vqa", 24, seed=5, split="test")]
    assert not any(r["reject_reason"] for r in recs)
    return recs


def _meta(r):
    return json.loads(r["meta"])


def _cells(out: dict, out_dir: Path) -> dict:
    """(model, condition) -> the cell parquet of a run_matrix result."""
    return {(m, c): out_dir / rel for m, cs in out["metrics"]["settings"]["cells"].items() for c, rel in cs.items()}


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
    if not MEDHALT_CSV.exists():
        pytest.skip(f"no Med-HALT CSV at {MEDHALT_CSV}")
    cells = build_cells(records[:4], ["medhalt"], INSTRUCTION, medhalt_path=str(MEDHALT_CSV), medhalt_limit=7)
    assert len(cells["medhalt"]) == 7 and all(r["true_answer"] == "I do not know" for r in cells["medhalt"])


def _fake_run(root: Path, name: str = "two", **cfg_overrides) -> Path:
    """A run directory with config.yaml and a stand-in stage-2 adapter (two files, never loaded)."""
    rd = RunDir(root / name)
    rd.write_config(load_config("tiny", [f"{k}={v}" for k, v in cfg_overrides.items()]))
    rd.adapters("stage2").mkdir(parents=True)
    (rd.adapters("stage2") / "adapter_config.json").write_text("{}")
    (rd.adapters("stage2") / "adapter_model.safetensors").write_bytes(b"weights v1")
    return rd.path


def _fake_predictions(calls: list, die_after: int | None = None):
    """Stands in for the Ray job: answers '<model>|<question>|<max_new_tokens>' in batches of 4, and raises (a
    killed job) after ``die_after`` batches."""
    def predict(rows, cfg, models, out_dir=None):
        calls.append(len(rows))
        for n, i in enumerate(range(0, len(rows), 4)):
            if die_after is not None and n == die_after:
                raise KeyboardInterrupt("killed")
            df = pd.DataFrame([{k: v for k, v in r.items() if k != "image"} for r in rows[i:i + 4]])
            df["raw_prediction"] = df["predicted_answer"] = [
                f"{m}|{q}|{cfg.eval.max_new_tokens}" for m, q in zip(df["model"], df["question_id"])]
            yield df
    return predict


def test_predictions_are_keyed_by_what_produced_them(records, tmp_path, monkeypatch):
    """A change of max_new_tokens, of an adapter's content (same path) or of the instruction predicts the affected
    cells anew in a new place, never mixing old and new answers; unchanged settings reuse the finished cells."""
    run, out = _fake_run(tmp_path), tmp_path / "eval"
    calls = []
    monkeypatch.setattr(ev, "_predict_rows", _fake_predictions(calls))
    base = ["eval.conditions=true,swapped", "eval.n_boot=50"]
    cfg4, cfg2 = (load_config("tiny", base + [f"eval.max_new_tokens={n}"]) for n in (4, 2))
    models = {"base": None, "single_stage": None, "two_stage": run}
    test = records[:8]
    everything = {f"{m}/{c}": 8 for m in ("base", "two_stage") for c in ("true", "swapped")}

    first = run_matrix(cfg4, models, test, out)
    assert first["rows_predicted"] == everything and first["skipped"] == []
    cells4 = _cells(first, out)
    assert "single_stage" not in first["metrics"]["cells"] and set(first["metrics"]["cells"]["base"]) == {"true",
                                                                                                      "swapped"}
    again = run_matrix(cfg4, models, test, out)
    assert again["rows_predicted"] == {} and len(again["skipped"]) == 4 and len(calls) == 1  # no job at all

    stamp = {k: p.stat().st_mtime_ns for k, p in cells4.items()}
    second = run_matrix(cfg2, models, test, out)
    cells2 = _cells(second, out)
    assert second["rows_predicted"] == everything and second["rows_reused"] == {}
    for k in cells4:
        assert cells2[k] != cells4[k] and cells4[k].stat().st_mtime_ns == stamp[k]  # old cells untouched
        assert {a.rsplit("|", 1)[1] for a in pd.read_parquet(cells4[k])["raw_prediction"]} == {"4"}
        assert {a.rsplit("|", 1)[1] for a in pd.read_parquet(cells2[k])["raw_prediction"]} == {"2"}
        assert json.loads(cells2[k].with_suffix(".json").read_text())["producer"]["decoding"]["max_new_tokens"] == 2
    assert run_matrix(cfg4, models, test, out)["rows_predicted"] == {}  # back to 4 tokens: the first cells again

    (run / "adapters" / "stage2" / "adapter_model.safetensors").write_bytes(b"weights v2")  # retrained in place
    third = run_matrix(cfg4, models, test, out)
    assert third["rows_predicted"] == {"two_stage/true": 8, "two_stage/swapped": 8}
    assert sorted(third["skipped"]) == [["base", "swapped"], ["base", "true"]]

    prompt = load_config("tiny", base + ["eval.max_new_tokens=4", "stage2.prompt=Answer in one word."])
    assert run_matrix(prompt, models, test, out)["rows_predicted"] == everything


def test_a_killed_cell_resumes_only_under_its_own_key(records, tmp_path, monkeypatch):
    """Parts of a killed job are kept for the same settings only: resumed with another max_new_tokens, nothing is
    reused; resumed with the same, only the missing questions are predicted."""
    out = tmp_path / "eval"
    cfg4, cfg2 = (load_config("tiny", ["eval.conditions=true", "eval.n_boot=20", f"eval.max_new_tokens={n}"])
                  for n in (4, 2))
    monkeypatch.setattr(ev, "_predict_rows", _fake_predictions([], die_after=1))
    with pytest.raises(KeyboardInterrupt):
        run_matrix(cfg4, {"base": None}, records[:10], out)
    monkeypatch.setattr(ev, "_predict_rows", _fake_predictions([]))
    other = run_matrix(cfg2, {"base": None}, records[:10], out)
    assert other["rows_reused"] == {} and other["rows_predicted"] == {"base/true": 10}
    resumed = run_matrix(cfg4, {"base": None}, records[:10], out)
    assert resumed["rows_reused"] == {"base/true": 4} and resumed["rows_predicted"] == {"base/true": 6}
    answers = pd.read_parquet(_cells(resumed, out)["base", "true"])["raw_prediction"]
    assert list(answers) == [f"base|{r['id']}|4" for r in records[:10]]


def test_eval_settings_are_recorded_without_changing_the_run_id(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(ev, "run_matrix", lambda cfg, models, test, out_dir, **k: seen.update(cfg=cfg) or {})
    rd = RunDir(_fake_run(tmp_path, **{"stage2.data.num_records": 4}))
    before = run_id(rd.read_config())
    ev.evaluate_run(rd.path, ["eval.max_new_tokens=3", "eval.conditions=true,ood", "resources.num_cpus=1"])
    stored = rd.read_config()
    assert seen["cfg"].eval == stored.eval and stored.eval.max_new_tokens == 3
    assert stored.eval.conditions == ["true", "ood"]
    assert stored.resources.num_cpus is None  # only the eval section is recorded
    assert run_id(stored) == before

    from typer.testing import CliRunner

    from medvqa.cli import app

    res = CliRunner().invoke(app, ["eval", str(rd.path), "eval.max_new_tokens=0"])
    assert res.exit_code == 2 and "eval.max_new_tokens" in res.output


def test_train_with_run_evaluate_then_evaluates(tmp_path, monkeypatch):
    """`medvqa train run.evaluate=true` (= jobs/two_stage.py) evaluates the run it trained, with its eval.*
    settings; without run.evaluate it does not."""
    from typer.testing import CliRunner

    import medvqa.train
    from medvqa.cli import app

    calls = []
    monkeypatch.setattr(medvqa.train, "run_two_stage", lambda cfg: calls.append(("train", cfg.eval)) or tmp_path)
    monkeypatch.setattr(ev, "evaluate_run", lambda run_dir: calls.append(("eval", run_dir)) or {
        "metrics_path": "m", "predicted": [], "skipped": [], "rows_reused": {}})
    res = CliRunner().invoke(app, ["train", "run.evaluate=true", "eval.max_new_tokens=5"])
    assert res.exit_code == 0, res.output
    assert [c[0] for c in calls] == ["train", "eval"] and calls[0][1].max_new_tokens == 5 and calls[1][1] == tmp_path
    calls.clear()
    assert CliRunner().invoke(app, ["train"]).exit_code == 0 and [c[0] for c in calls] == ["train"]


def test_seed_runs_are_evaluated_as_model_at_seed(tmp_path, monkeypatch):
    """evaluate_run(seed_runs=...) names every run of the model <model>@<seed> (the metrics then summarise them
    across seeds); two runs with one seed are refused."""
    runs = [_fake_run(tmp_path, f"run{seed}", **{"run.seed": seed, "stage2.data.num_records": 4}) for seed in (0, 1)]
    seen = {}
    monkeypatch.setattr(ev, "run_matrix", lambda cfg, models, *a, **k: seen.update(models) or {})
    ev.evaluate_run(runs[0], ["eval.test_limit=2"], seed_runs=[runs[1]])
    assert {k: v for k, v in seen.items() if k.startswith("two_stage")} == {"two_stage@0": runs[0],
                                                                            "two_stage@1": runs[1]}
    with pytest.raises(ValueError, match="seed 0"):
        ev.evaluate_run(runs[0], ["eval.test_limit=2"], seed_runs=[runs[0]])


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
    df = pd.DataFrame([{k: v for k, v in r.items() if k != "image"} for r in rows])
    df["model"] = model
    df["raw_prediction"] = [f"answer to {q}" for q in df["question_id"]]
    df["predicted_answer"] = "yes"
    return df


def test_cells_stream_to_disk_and_an_interrupted_run_resumes_only_missing_rows(records, tmp_path):
    """A 'killed' job (the writer stops mid-stream): finished cells are on disk, unfinished ones are never taken as
    done, their streamed questions are kept, a torn part write is ignored, and the resumed run predicts only what is
    missing."""
    cells = build_cells(records[:10], ["true", "swapped", "expert"], INSTRUCTION, seed=0)
    writer = CellWriter(tmp_path, "base", cells, PRODUCER)
    assert writer.finished == [] and len(writer.pending()) == 30
    stream = group_by_image([{**r, "model": "base"} for r in writer.pending()])
    for i in range(0, 16, 4):  # four batches of four arrive, then the job dies
        writer.add(_predicted(stream[i:i + 4]))
    done_rows = {(r["condition"], r["question_id"]) for r in stream[:16]}
    complete = [c for c in cells if all((c, r["question_id"]) in done_rows for r in cells[c])]
    for c in cells:  # a cell lands on disk the moment its last question arrives, not at the end of the job
        assert writer.path(c).exists() == (c in complete)
        assert writer.parts(c).exists() == (c not in complete and any(k[0] == c for k in done_rows))
    partial = next(c for c in cells if c not in complete and writer.parts(c).exists())
    (writer.parts(partial) / "torn.parquet.tmp").write_bytes(b"PAR1 half a file")

    again = CellWriter(tmp_path, "base", cells, PRODUCER)
    assert sorted(again.finished) == sorted(complete)
    pending = {(r["condition"], r["question_id"]) for r in again.pending()}
    assert pending == {(c, r["question_id"]) for c in cells for r in cells[c]} - done_rows
    assert sum(again.reused_rows.values()) == len(done_rows) - sum(len(cells[c]) for c in complete)
    again.add(_predicted(again.pending()))
    assert again.done == {} and sorted(again.written) == sorted(set(cells) - set(complete))
    for c in cells:
        df = pd.read_parquet(again.path(c))
        assert list(df["question_id"]) == [r["question_id"] for r in cells[c]]  # the cell's order, no duplicates
        assert list(df["raw_prediction"]) == [f"answer to {q}" for q in df["question_id"]]
        assert not again.parts(c).exists()
    assert CellWriter(tmp_path, "base", cells, PRODUCER).pending() == []


def test_another_question_set_is_another_cell(records, tmp_path):
    cells = build_cells(records[:6], ["true"], INSTRUCTION)
    CellWriter(tmp_path, "base", cells, PRODUCER).add(_predicted(cells["true"]))
    for other in (build_cells(records[6:12], ["true"], INSTRUCTION), build_cells(records[:5], ["true"], INSTRUCTION),
                  build_cells(records[:6], ["true"], "Answer in one word.")):
        writer = CellWriter(tmp_path, "base", other, PRODUCER)
        assert writer.finished == [] and len(writer.pending()) == len(other["true"])
    assert cell_key(PRODUCER, cells["true"]) != cell_key({**PRODUCER, "device": "cuda"}, cells["true"])


# ------------------------------------------------------------------------------------------------- integration


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    """A run directory with config.yaml and a LoRA trained for a few steps as adapters/stage2."""
    from conftest import train_tiny_adapter

    from medvqa.model import load_processor, save_adapter

    cfg = load_config("tiny", [f"model.name_or_path={tiny_model_dir}", "resources.num_cpus=2"])
    rd = RunDir(tmp_path_factory.mktemp("run"))
    rd.write_config(cfg)
    model, _ = train_tiny_adapter(cfg, load_processor(cfg.model), steps=4)
    save_adapter(model, rd.adapters("stage2"))
    return cfg, rd.path


@pytest.mark.integration
def test_matrix_on_local_ray(ray_local, tiny_run, tmp_path):
    base_cfg, run_dir = tiny_run
    test = [validate_record(r) for r in phantom_records("vqa", 12, seed=base_cfg.stage2.data.seed, split="test")]
    conditions = ["true", "swapped", "expert"]
    settings = ["eval.conditions=true,swapped,expert", "eval.seed=0", "eval.max_new_tokens=4", "eval.concurrency=2",
                "eval.cpus_per_actor=0.25", "eval.batch_size=4", "eval.n_boot=200"]
    cfg = load_config("tiny", [f"model.name_or_path={base_cfg.model.name_or_path}", *settings])
    out = run_matrix(cfg, {"base": None, "single_stage": None, "two_stage": run_dir}, test, tmp_path)
    assert sorted(out["predicted"]) == sorted([m, c] for m in ("base", "two_stage") for c in conditions)
    cells = _cells(out, tmp_path)
    ids = sorted(r["id"] for r in test)
    true_image = {r["id"]: r["image_id"] for r in test}
    frames = {}
    for m in ("base", "two_stage"):
        for c in conditions:
            df = pd.read_parquet(cells[m, c])
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
    assert "mcnemar" in metrics["paired_true"]["two_stage_vs_base"]["normalized_em"]
    models = {"base": None, "two_stage": run_dir}
    again = run_matrix(cfg, models, test, tmp_path)
    assert again["predicted"] == [] and len(again["skipped"]) == 6 and again["rows_predicted"] == {}

    # Resume after a kill: two_stage/true lost, two_stage/swapped left as parts holding 5 of its 12 questions (plus
    # a torn write). Only the 12 + 7 missing rows are predicted, with the answers of the uninterrupted run, and the
    # image-feature cache off gives the same answers.
    cells[("two_stage", "true")].unlink()
    parts = cells["two_stage", "swapped"].with_suffix(".parts")
    parts.mkdir()
    frames["two_stage", "swapped"].iloc[[0, 3, 4, 8, 11]].to_parquet(parts / "p0.parquet", index=False)
    (parts / "p1.parquet.tmp").write_bytes(b"PAR1 torn")
    cells["two_stage", "swapped"].unlink()
    no_cache = load_config("tiny", [f"model.name_or_path={base_cfg.model.name_or_path}", *settings,
                                    "eval.feature_cache_mb=0"])
    resumed = run_matrix(no_cache, models, test, tmp_path)
    assert resumed["rows_predicted"] == {"two_stage/true": 12, "two_stage/swapped": 7}
    assert resumed["rows_reused"] == {"two_stage/swapped": 5}
    assert sorted(resumed["predicted"]) == [["two_stage", "swapped"], ["two_stage", "true"]]
    assert len(resumed["skipped"]) == 4 and not parts.exists()
    for c in ("true", "swapped"):
        pd.testing.assert_frame_equal(pd.read_parquet(cells["two_stage", c]), frames["two_stage", c])


@pytest.mark.integration
def test_eval_job_on_a_run_dir(ray_local, tiny_run):
    """`medvqa eval` (= jobs/eval_matrix.py) end to end (base only, small): the run's test split, Med-HALT and
    phantom ood cells, with eval.* settings recorded in the run's config."""
    if not MEDHALT_CSV.exists():
        pytest.skip(f"no Med-HALT CSV at {MEDHALT_CSV}")
    _, run_dir = tiny_run
    from typer.testing import CliRunner

    from medvqa.cli import app

    out = CliRunner().invoke(app, ["eval", str(run_dir), "--base-only", "eval.conditions=true,medhalt,ood",
                                   f"eval.medhalt_path={MEDHALT_CSV}", "eval.medhalt_limit=4", "eval.test_limit=6",
                                   "eval.max_new_tokens=3", "eval.cpus_per_actor=0.25", "resources.num_cpus=2"])
    assert out.exit_code == 0, out.output
    rd = RunDir(run_dir)
    metrics = json.loads(rd.eval_metrics.read_text())
    assert set(metrics["cells"]["base"]) == {"true", "medhalt", "ood"}
    assert metrics["cells"]["base"]["true"]["n"] == 6 and metrics["cells"]["base"]["medhalt"]["n"] == 4
    assert metrics["medhalt_abstention"]["base"]["n"] == 4
    cells = metrics["settings"]["cells"]["base"]
    ood, true = (pd.read_parquet(rd.eval / cells[c]) for c in ("ood", "true"))
    assert not set(ood["image_id_shown"]) & set(true["image_id_shown"])  # another phantom seed: other images
    assert rd.read_config().eval.test_limit == 6 and rd.read_config().eval.max_new_tokens == 3
