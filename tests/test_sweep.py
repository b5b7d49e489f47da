"""Sweeps: search spaces as data, the validation carve, concurrency, and the report (on a synthetic sweep directory,
so every number it prints is known). The end-to-end sweep on local Ray is in test_sweep_restore.py."""

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from medvqa.config import ConfigError, dump_yaml, load_config
from medvqa.data.pipeline import in_validation
from medvqa.sweep import (
    SPACES_DIR,
    TRIAL_LINK,
    load_space,
    max_concurrent_trials,
    space_hash,
    trial_config,
    tune_param_space,
)
from medvqa.sweep_report import cell_summary, importance, load_trials, write_report

SPACES = sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))


def test_the_search_spaces_exist():
    assert {"tiny", "paper"} <= set(SPACES)


@pytest.mark.parametrize("name", SPACES)
def test_every_search_space_loads_into_valid_trial_configs(name):
    space = load_space(name)
    domains = tune_param_space(space)
    assert set(domains) == set(space.params) | set(space.replicates)
    assert space.metric.startswith("val_")
    for _ in range(3):  # sampled points are valid configs that carve a validation split
        params = {k: d.sample() for k, d in domains.items()}
        cfg = trial_config(space, params)
        assert cfg.stage2.data.validation_fraction > 0
        assert all(_get(cfg, k) == v for k, v in params.items())


def test_paper_space_is_the_study_axis():
    space = load_space("paper")
    assert space.preset == "paper"
    assert space.params["stage1.data.limit"]["values"][0] == 7000
    assert space.params["stage1.data.limit"]["values"][-1] == 55000
    assert space.params["lora.r"]["values"] == [4, 8, 16, 32]
    assert space.replicates["run.seed"] == [0, 1]


def _get(cfg, key):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _space_file(tmp_path, **changes):
    data = yaml.safe_load((SPACES_DIR / "tiny.yaml").read_text())
    data.update(changes)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("changes, words", [
    ({"colour": "red"}, ["colour"]),
    ({"params": {"lora.rank": {"values": [2, 4]}}}, ["lora.rank"]),
    ({"params": {"lora.r": {"values": []}}}, ["params.lora.r"]),
    ({"params": {"stage2.lr": {"loguniform": [0, 1e-3]}}}, ["params.stage2.lr"]),
    ({"params": {"lora.r": {"choice": [2]}}}, ["params.lora.r"]),
    ({"params": {"stage1.data.limit": {"values": [48]}, "lora.r": {"values": [2, "big"]}}}, ["lora.r", "integer"]),
    ({"metric": "val_bleu"}, ["metric", "val_normalized_f1"]),
    ({"metric": "loss"}, ["metric", "val_"]),
    ({"overrides": ["stage1.epochs=1"]}, ["validation_fraction"]),
    ({"report": {"x": "stage2.lr", "line": "lora.r"}}, ["report.x"]),
    ({"replicates": {"lora.r": [0]}}, ["lora.r"]),
])
def test_a_bad_search_space_is_an_error_naming_the_key(tmp_path, changes, words):
    with pytest.raises(ConfigError) as err:
        load_space(_space_file(tmp_path, **changes))
    for word in words:
        assert word in str(err.value)


def test_sweep_identity_ignores_scale_but_not_the_space():
    a = load_space("tiny")
    assert space_hash(a) == space_hash(load_space("tiny", {"num_samples": 40, "max_concurrent": 8}))
    assert space_hash(a) != space_hash(load_space("tiny", {"params": {**a.params, "lora.r": {"values": [2, 4]}}}))


def test_concurrency_comes_from_gpus_or_cpus():
    space = load_space("tiny", {"max_concurrent": None})
    assert max_concurrent_trials(space, {"CPU": 4.0}) == 4  # a trial takes 0.5 + 2 x 0.25 CPUs
    assert max_concurrent_trials(load_space("tiny"), {"CPU": 64.0}) == 2  # the space's cap wins
    paper = load_space("paper")  # 1 GPU per trial
    assert max_concurrent_trials(paper, {"CPU": 64.0, "GPU": 8.0}) == 8
    two_gpu = load_space("paper", {"overrides": paper.overrides + ["resources.num_workers=2"]})
    assert max_concurrent_trials(two_gpu, {"CPU": 64.0, "GPU": 8.0}) == 4
    with pytest.raises(RuntimeError, match="GPU"):
        max_concurrent_trials(two_gpu, {"CPU": 64.0, "GPU": 1.0})


def test_validation_carve_is_image_disjoint_seeded_and_near_the_fraction():
    images = [f"{i:040x}" for i in range(4000)]
    picked = [in_validation(i, 0.1, seed=0) for i in images]
    assert 0.08 < sum(picked) / len(picked) < 0.12
    assert picked == [in_validation(i, 0.1, seed=0) for i in images]  # deterministic
    assert picked != [in_validation(i, 0.1, seed=1) for i in images]  # the seed moves it
    # Nested in the fraction (a larger carve contains a smaller one) and never everything or nothing by accident.
    assert all(in_validation(i, 0.2, 0) for i, p in zip(images, picked) if p)
    assert not any(in_validation(i, 0.0, 0) for i in images)
    assert not in_validation("", 0.5, 0)  # an image-less record is never validation


def test_prepare_records_carves_an_image_disjoint_validation_split(ray_local, tmp_path):
    import pyarrow.parquet as pq

    from medvqa.data.pipeline import prepare_records

    cfg = load_config("tiny", ["stage2.data.num_records=96", "stage2.data.validation_fraction=0.25"])
    data, res = cfg.stage2.data, cfg.resources
    train = prepare_records(data, tmp_path / "train", tmp_path / "rej_train", res, 0.05, part="train")
    val = prepare_records(data, tmp_path / "val", tmp_path / "rej_val", res, 0.05, part="validation")
    read = lambda d: [r for f in sorted(d.glob("*.parquet")) for r in pq.read_table(f, columns=["image_id"]).to_pylist()]
    t, v = read(tmp_path / "train"), read(tmp_path / "val")
    assert train["valid"] == len(t) and val["valid"] == len(v) and len(t) + len(v) == 96
    assert 10 <= len(v) <= 40
    assert not {r["image_id"] for r in t} & {r["image_id"] for r in v}
    assert all(in_validation(r["image_id"], 0.25, data.seed) for r in v)
    assert train["part"] == "train" and val["part"] == "validation"
    with pytest.raises(ValueError, match="validation_fraction"):
        prepare_records(load_config("tiny").stage2.data, tmp_path / "x", tmp_path / "y", res, 0.05, part="validation")


# ------------------------------------------------------------------------------------------ report (synthetic)


def _fake_sweep(tmp_path: Path) -> Path:
    """A sweep directory as Tune and the trials leave it: score = limit/1000 + r/100 (+ seed noise 0.001), so the
    best cell, the curve and the importances are known. Trial 'e' errored; trial 's' was stopped by ASHA after one
    round and has no run link (found through Tune's results); trial 'k' was killed after its last round before Tune
    recorded any result (its run's metrics.jsonl has them)."""
    space = load_space("tiny")
    sdir = tmp_path / "sweep"
    (sdir / "tune").mkdir(parents=True)
    (sdir / "space.yaml").write_text(yaml.safe_dump(space.to_dict()))
    trials = [(f"t{i}", {"stage1.data.limit": limit, "lora.r": r, "run.seed": seed})
              for i, (limit, r, seed) in enumerate((l, r, s) for l in (48, 96, 192) for r in (2, 8) for s in (0, 1))]
    trials[0] = ("k", trials[0][1])
    for tid, params in trials + [("s", {"stage1.data.limit": 48, "lora.r": 4, "run.seed": 0}),
                                 ("e", {"stage1.data.limit": 96, "lora.r": 4, "run.seed": 1})]:
        tdir = sdir / "tune" / f"trial_fn_{tid}"
        tdir.mkdir()
        (tdir / "params.json").write_text(json.dumps(params))
        run_dir = sdir / "runs" / f"trial-{tid}"
        run_dir.mkdir(parents=True)
        (run_dir / "config.yaml").write_text(dump_yaml(trial_config(space, params, f"trial-{tid}")))
        if tid != "s":
            (tdir / TRIAL_LINK).write_text(json.dumps({"trial_id": tid, "run_dir": str(run_dir)}))
        score = params["stage1.data.limit"] / 1000 + params["lora.r"] / 100 + params["run.seed"] / 1000
        rounds = 1 if tid in ("s", "e") else 3
        validation = [{"stage": "stage2", "event": "validation", "val_round": k, "val_final": k == 3, "val_n": 24,
                       "val_normalized_f1": score * k / 3, "val_normalized_f1_ci": [score * k / 3 - 0.05,
                                                                                    score * k / 3 + 0.05]}
                      for k in range(1, rounds + 1)]
        if tid == "t3":  # a resumed stage repeated round 2: the later row counts
            validation.insert(2, {**validation[1], "val_normalized_f1": 0.0})
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(v) + "\n" for v in validation))
        results = [{**v, "run_dir": str(run_dir), "trial_id": tid, "time_total_s": 10.0 * v["val_round"]}
                   for v in validation]
        if tid == "k":
            results = []
        if tid == "e":
            (tdir / "error.txt").write_text("boom")
        (tdir / "result.json").write_text("".join(json.dumps(x) + "\n" for x in results))
    return sdir


def test_report_statuses_cells_and_importance(tmp_path):
    space, trials = load_trials(_fake_sweep(tmp_path))
    status = dict(zip(trials["trial_id"], trials["status"]))
    assert status["s"] == "stopped" and status["e"] == "error" and status["k"] == "completed"
    assert trials.set_index("trial_id").loc["e", "error"] == "boom"
    assert list(trials["status"])[:12] == ["completed"] * 12  # completed first, best first
    by_id = trials.set_index("trial_id")
    assert pd.isna(by_id.loc["k", "seconds"]) and by_id.loc["t11", "seconds"] == 30.0  # Tune's trial time
    assert by_id.loc["t3", "val_round"] == 3 and by_id.loc["t3", "val_normalized_f1"] == pytest.approx(0.129)
    assert trials.iloc[0]["trial_id"] == "t11"  # limit 192, r 8, seed 1: 0.192 + 0.08 + 0.001

    cells = cell_summary(space, trials)
    assert len(cells) == 6 and (cells["n"] == 2).all()  # 3 limits x 2 ranks, seeds pooled
    top = cells.iloc[0]
    assert (top["stage1.data.limit"], top["lora.r"]) == (192, 8)
    assert top["mean"] == pytest.approx(0.2725)
    half = 12.706 * pd.Series([0.272, 0.273]).std() / math.sqrt(2)  # t-interval over the 2 seeds
    assert (top["low"], top["high"]) == pytest.approx((0.2725 - half, 0.2725 + half))

    imp = importance(space, trials).set_index("key")["eta_squared"]
    # Balanced design: between-level variances 0.003584 (limit), 0.0009 (rank), 0.00000025 (seed) of the total.
    total = 0.003584 + 0.0009 + 0.00000025
    assert imp["stage1.data.limit"] == pytest.approx(0.003584 / total, rel=1e-3)
    assert imp["lora.r"] == pytest.approx(0.0009 / total, rel=1e-3)
    assert imp["run.seed"] < 1e-3  # the seed is the noise reference
    assert imp["stage1.data.limit"] + imp["lora.r"] + imp["run.seed"] == pytest.approx(1.0, abs=1e-6)


def test_report_files_and_best_preset(tmp_path):
    sdir = _fake_sweep(tmp_path)
    out = write_report(sdir)
    assert out["trials"] == 14 and out["status"] == {"completed": 12, "stopped": 1, "error": 1, "pending": 0}
    csv = pd.read_csv(out["trials_csv"])
    assert len(csv) == 14 and csv["run_dir"].notna().all()  # every row traces to its run
    assert Path(out["curve"]).stat().st_size > 1000
    md = Path(out["markdown"]).read_text()
    assert "t11" in md and "curve.png" in md and "eta" in md and "## Errors" in md and "boom" in md
    assert Path(out["html"]).read_text().startswith("<!DOCTYPE html>")

    best = load_config(out["best_yaml"])  # a preset jobs/two_stage.py accepts unchanged
    assert (best.stage1.data.limit, best.lora.r) == (192, 8)
    assert best.stage2.data.validation_fraction == 0  # the final model trains on the whole split
    assert best.run.seed == load_config("tiny").run.seed and best.run.name == "tiny-best"
    assert sorted(out["best"]["trial_ids"].split()) == ["t10", "t11"] and out["best"]["mean"] == pytest.approx(0.2725)


def test_report_of_a_directory_that_is_not_a_sweep(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a sweep"):
        write_report(tmp_path)


def test_cli_reports_bad_input_with_exit_code_2(tmp_path):
    from typer.testing import CliRunner

    from medvqa.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["sweep", "run", "--preset", "no_such_space"])
    assert res.exit_code == 2 and "no search space 'no_such_space'" in res.output
    res = runner.invoke(app, ["sweep", "run", "--preset", "tiny", "lora.rank=4"])
    assert res.exit_code == 2 and "lora.rank" in res.output
    res = runner.invoke(app, ["sweep", "report", str(tmp_path)])
    assert res.exit_code == 2 and "not a sweep directory" in res.output
    res = runner.invoke(app, ["sweep", "report", str(_fake_sweep(tmp_path))])
    assert res.exit_code == 0 and json.loads(res.output)["trials"] == 14
