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
    settings, after training the single-stage baseline (stage 1 off, everything else the same) when eval.models
    asks for it; without run.evaluate it does not evaluate."""
    from typer.testing import CliRunner

    import medvqa.train
    from medvqa.cli import app

    calls = []

    def train(cfg):
        calls.append(("train", cfg))
        return tmp_path / cfg.run.name

    monkeypatch.setattr(medvqa.train, "run_two_stage", train)
    monkeypatch.setattr(ev, "evaluate_run", lambda run_dir, single_stage=None: calls.append(
        ("eval", run_dir, single_stage)) or {"metrics_path": "m", "predicted": [], "skipped": [], "rows_reused": {}})
    res = CliRunner().invoke(app, ["train", "run.evaluate=true", "eval.max_new_tokens=5"])
    assert res.exit_code == 0, res.output
    assert [c[0] for c in calls] == ["train", "train", "eval"]
    two, one = calls[0][1], calls[1][1]
    assert two.stage1.enabled and not one.stage1.enabled and one.run.name == "tiny-single-stage"
    assert one.stage2 == two.stage2 and one.run.seed == two.run.seed and one.eval.max_new_tokens == 5
    assert run_id(one) == run_id(load_config("tiny_single_stage"))  # the preset's baseline run, found again
    assert calls[2][1:] == (tmp_path / "tiny", tmp_path / "tiny-single-stage")
    calls.clear()
    assert CliRunner().invoke(app, ["train", "run.evaluate=true", "eval.models=base,two_stage"]).exit_code == 0
    assert [c[0] for c in calls] == ["train", "eval"] and calls[1][2] is None
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


def test_blank_condition_shows_a_uniform_gray_image_of_each_images_size(records):
    import hashlib
    import io

    import numpy as np
    from PIL import Image
    from data_fixtures import image_bytes

    wide = validate_record({**phantom_records("vqa", 1, seed=9, split="test")[0], "id": "wide",
                            "image": image_bytes(size=(48, 32)), "image_id": ""})
    test = records[:3] + [wide]
    rows = build_cells(test, ["blank"], INSTRUCTION)["blank"]
    assert [r["question_id"] for r in rows] == [r["id"] for r in test]
    for r, rec in zip(rows, test):
        shown, true = Image.open(io.BytesIO(r["image"])), Image.open(io.BytesIO(rec["image"]))
        assert shown.size == true.size  # same resize and image tokens as the true condition
        assert np.unique(np.asarray(shown.convert("RGB"))).tolist() == [128]  # uniform mid-gray
        assert r["image_id_shown"] == hashlib.sha1(r["image"]).hexdigest() != rec["image_id"]
        assert r["true_image_id"] == rec["image_id"] and r["prompt"] == rec["prompt"] and r["shots"] == ""
    assert len({r["image_id_shown"] for r in rows}) == 2  # one gray image per size


def test_few_shot_examples_come_from_the_training_pool_never_from_the_questions_image(records):
    from medvqa.conditions import examples_of, pack_images, unpack_images

    test = records[:6]
    pool = [validate_record(r) for r in phantom_records("vqa", 10, seed=5, split="train")]
    same_image = {**test[0], "id": "train-copy-of-q0"}  # a training question on the test question's image
    rows = build_cells(test, ["few_shot"], INSTRUCTION, seed=3, few_shot_pool=pool + [same_image],
                       few_shot_k=2)["few_shot"]
    by_id = {r["id"]: r for r in pool + [same_image]}
    for r, rec in zip(rows, test):
        shots = json.loads(r["shots"])
        assert len(shots) == 2 and len({s["id"] for s in shots}) == 2
        assert all(s["image_id"] != rec["image_id"] for s in shots)  # never the question's own image
        examples = examples_of(r)
        for s, (img, q, a) in zip(shots, examples):
            src = by_id[s["id"]]
            assert (img, q, a) == (src["image"], src["prompt"], src["target"]) and s["image_id"] == src["image_id"]
        assert r["image"] == rec["image"] and r["instruction"] == INSTRUCTION
    again = build_cells(test, ["few_shot"], INSTRUCTION, seed=3, few_shot_pool=list(reversed(pool + [same_image])),
                        few_shot_k=2)["few_shot"]
    assert [r["shots"] for r in again] == [r["shots"] for r in rows]  # seeded; the pool's order does not matter
    other = build_cells(test, ["few_shot"], INSTRUCTION, seed=3, few_shot_pool=pool, few_shot_k=2,
                        few_shot_seed=4)["few_shot"]
    assert [r["shots"] for r in other] != [r["shots"] for r in rows]
    one = build_cells(test, ["few_shot"], INSTRUCTION, seed=3, few_shot_pool=pool, few_shot_k=1)["few_shot"]
    assert cell_key(PRODUCER, one) != cell_key(PRODUCER, rows) != cell_key(PRODUCER, other)  # keyed by examples
    plain = build_cells(test, ["true"], INSTRUCTION)["true"]  # rows without examples keep their pre-few-shot keys
    assert cell_key(PRODUCER, plain) == cell_key(PRODUCER, [{k: v for k, v in r.items() if k != "shots"}
                                                            for r in plain])
    assert build_cells(test, ["few_shot", "true"], INSTRUCTION).keys() == {"true"}  # no pool: skipped
    with pytest.raises(ValueError, match="fewer than k=11"):
        build_cells(test, ["few_shot"], INSTRUCTION, few_shot_pool=pool, few_shot_k=11)
    assert unpack_images(pack_images([b"ab", b"", b"c" * 300])) == [b"ab", b"", b"c" * 300]


def _release_with_bad_records(root: Path) -> tuple[Path, Path, Path]:
    """A VQA-RAD release whose test question 9 names a missing image, a Med-HALT CSV with an empty question and a
    PathVQA folder in the released layout without its images."""
    from data_fixtures import vqa_rad_item, vqa_rad_release

    items = [vqa_rad_item(i, f"img{i % 5}.jpg", f"Question {i}?", "yes" if i % 2 else "no",
                          "test_freeform" if i >= 6 else "freeform", f"g{i}") for i in range(10)]
    items[9]["image_name"] = "gone.jpg"
    vqa = vqa_rad_release(root / "vqa_rad", items, {f"img{i}.jpg": i for i in range(5)})
    csv = root / "medhalt.csv"
    csv.write_text("id,question,options\nm1,What is the capital of Mars?,\"{'0': 'I do not know'}\"\nm2,,\"{}\"\n")
    pvqa = root / "pathvqa"
    pvqa.mkdir()
    (pvqa / "pvqa_test.json").write_text(json.dumps([{"img_id": "test_0001", "sentf": {"pvqa": ["Is this a "
                                                                                             "cell?"]},
                                                      "labelf": {"pvqa": [{"yes": 1.0}]}}]))
    return vqa, csv, pvqa


def test_evaluation_rejects_are_written_with_reasons_and_skips_listed(tmp_path, monkeypatch):
    """Bad test records, Med-HALT rows and out-of-distribution records are written to eval/rejects/<source>.jsonl
    with their reasons and counted in metrics.json and the report; a source left with nothing usable skips its
    condition, listed with the reason, as is a missing single-stage run; too many test rejects stop the evaluation."""
    from medvqa.data.pipeline import TooManyRejects
    from medvqa.report import build_report

    vqa, csv, pvqa = _release_with_bad_records(tmp_path)
    run = _fake_run(tmp_path, **{"stage2.data.kind": "vqa_rad", "stage2.data.path": str(vqa),
                                 "run.max_reject_fraction": 0.5})
    monkeypatch.setattr(ev, "_predict_rows", _fake_predictions([]))
    out = ev.evaluate_run(run, ["eval.conditions=true,medhalt,ood", f"eval.medhalt_path={csv}",
                                f"eval.ood_path={pvqa}", "eval.n_boot=20"])
    rd = RunDir(run)
    test_rejects = [json.loads(x) for x in rd.eval_rejects("test").read_text().splitlines()]
    assert [r["id"] for r in test_rejects] == ["9"] and test_rejects[0]["reject_reason"].startswith("missing image")
    medhalt_rejects = [json.loads(x) for x in rd.eval_rejects("medhalt").read_text().splitlines()]
    assert [(r["id"], r["reject_reason"]) for r in medhalt_rejects] == [("m2", "empty prompt")]
    assert json.loads(rd.eval_rejects("ood").read_text())["reject_reason"].startswith("missing image")
    sources = out["metrics"]["settings"]["sources"]
    assert (sources["test"]["valid"], sources["test"]["rejected"]) == (3, 1)
    assert sources["test"]["reject_reasons"] == {"missing image": 1} and sources["medhalt"]["rejected"] == 1
    assert sources["ood"]["valid"] == 0 and "no valid records" in sources["ood"]["too_many"]
    assert set(out["metrics"]["cells"]["two_stage"]) == {"true", "medhalt"}
    skipped = {(s["model"], s["condition"]): s["reason"] for s in out["metrics"]["skipped_cells"]}
    assert "no valid records" in skipped["*", "ood"] and "not trained" in skipped["single_stage", "*"]
    md = Path(build_report(run)["markdown"]).read_text()
    assert "| evaluation: test | vqa_rad test (official) | 3 | 1 | missing image 1 | eval/rejects/test.jsonl |" in md
    assert "| * | ood | ood: no valid records" in md and "| single_stage | * | not trained" in md

    no_medhalt = ev.evaluate_run(run, ["eval.conditions=true,medhalt", f"eval.medhalt_path={tmp_path / 'x.csv'}",
                                       "eval.n_boot=20"])
    assert "Med-HALT CSV not found" in no_medhalt["metrics"]["skipped_cells"][0]["reason"]
    with pytest.raises(TooManyRejects, match="eval/rejects/test.jsonl"):
        ev.evaluate_run(run, ["run.max_reject_fraction=0.1", "eval.conditions=true"])


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
    pool = [validate_record(r) for r in phantom_records("vqa", 8, seed=base_cfg.stage2.data.seed, split="train")]
    conditions = ["true", "swapped", "blank", "expert", "few_shot"]
    settings = ["eval.conditions=true,swapped,blank,expert,few_shot", "eval.seed=0", "eval.max_new_tokens=4",
                "eval.concurrency=2", "eval.cpus_per_actor=0.25", "eval.batch_size=4", "eval.n_boot=200"]
    cfg = load_config("tiny", [f"model.name_or_path={base_cfg.model.name_or_path}", *settings])
    out = run_matrix(cfg, {"base": None, "single_stage": None, "two_stage": run_dir}, test, tmp_path,
                     few_shot_pool=pool)
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
            if c in ("swapped", "blank"):
                assert all(s != true_image[q] for q, s in zip(df["question_id"], df["image_id_shown"]))
            else:
                assert all(s == true_image[q] for q, s in zip(df["question_id"], df["image_id_shown"]))
            assert all(bool(x) == (c == "few_shot") for x in df["shots"])  # the examples shown are stored
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
    assert set(metrics["vs_true"]["two_stage"]) == {"swapped", "blank", "expert", "few_shot"}
    assert metrics["skipped_cells"] == [{"model": "single_stage", "condition": "*",
                                         "reason": "no run directory given"}]
    models = {"base": None, "two_stage": run_dir}
    again = run_matrix(cfg, models, test, tmp_path, few_shot_pool=pool)
    assert again["predicted"] == [] and len(again["skipped"]) == 10 and again["rows_predicted"] == {}

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
    resumed = run_matrix(no_cache, models, test, tmp_path, few_shot_pool=pool)
    assert resumed["rows_predicted"] == {"two_stage/true": 12, "two_stage/swapped": 7}
    assert resumed["rows_reused"] == {"two_stage/swapped": 5}
    assert sorted(resumed["predicted"]) == [["two_stage", "swapped"], ["two_stage", "true"]]
    assert len(resumed["skipped"]) == 8 and not parts.exists()
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


@pytest.mark.slow
def test_one_command_yields_every_cell_of_the_matrix(ray_local, tmp_path):
    """`medvqa train --preset tiny run.evaluate=true` (= jobs/two_stage.py): the two-stage run, its single-stage
    baseline trained beside it with the same stage-2 data, budget and seed, then base, single_stage and two_stage x
    every condition (Med-HALT from ../shared when present, else listed as skipped with the reason). The same command
    again retrains and repredicts nothing."""
    from typer.testing import CliRunner

    from medvqa.cli import app
    from medvqa.conditions import CONDITIONS
    from medvqa.report import build_report

    medhalt = MEDHALT_CSV.exists()
    cmd = ["train", f"run.output_dir={tmp_path}", "resources.num_cpus=2", "stage1.data.num_records=16",
           "stage1.epochs=1", "stage2.data.num_records=24", "stage2.epochs=1", "run.evaluate=true",
           "eval.test_limit=6", "eval.medhalt_limit=4", "eval.max_new_tokens=3", "eval.cpus_per_actor=0.25",
           "eval.n_boot=50", f"eval.medhalt_path={MEDHALT_CSV if medhalt else ''}"]
    res = CliRunner().invoke(app, cmd)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    run = RunDir(Path(next(x for x in lines if x.startswith("run dir: "))[len("run dir: "):]))
    single = RunDir(Path(next(x for x in lines if x.startswith("single-stage baseline run dir: ")).split(": ")[1]))
    assert single.path.parent == run.path.parent and single.name.startswith("tiny-single-stage-")
    stages = {rd.name: [s["stage"] for s in json.loads(rd.stages_summary.read_text())] for rd in (run, single)}
    assert stages == {run.name: ["stage1", "stage2"], single.name: ["stage2"]}
    one, two = (json.loads(rd.manifest.read_text())["stage2"] for rd in (single, run))
    assert {k: one[k] for k in ("valid", "unique_images", "seed")} == {k: two[k] for k in ("valid", "unique_images",
                                                                                           "seed")}
    assert single.read_config().stage2 == run.read_config().stage2

    metrics = json.loads(run.eval_metrics.read_text())
    conditions = set(CONDITIONS) - (set() if medhalt else {"medhalt"})
    assert {m: set(cs) for m, cs in metrics["cells"].items()} == {m: conditions for m in ("base", "single_stage",
                                                                                           "two_stage")}
    assert metrics["settings"]["models"]["single_stage"] == str(single.path)
    assert metrics["skipped_cells"] == ([] if medhalt else [
        {"model": "*", "condition": "medhalt", "reason": "no Med-HALT CSV: eval.medhalt_path is empty"}])
    assert "ultrasound" in metrics["settings"]["sources"]["ood"]["what"]
    assert set(metrics["vs_true"]["two_stage"]) == {"swapped", "blank", "expert", "few_shot"}
    md = Path(build_report(run.path)["markdown"]).read_text()
    assert ("Every cell of the matrix was evaluated." in md) == medhalt and "| few_shot | solved examples" in md

    again = CliRunner().invoke(app, cmd)
    assert again.exit_code == 0, again.output
    (printed,) = [json.loads(x) for x in again.output.splitlines() if x.startswith('{"metrics"')]
    assert printed["predicted"] == []
    assert {rd.name: len(json.loads(rd.stages_summary.read_text())) for rd in (run, single)} == {
        run.name: 2, single.name: 1}  # nothing trained again
