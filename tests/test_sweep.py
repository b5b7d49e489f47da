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
    replicate_points,
    space_hash,
    trial_config,
    tune_param_space,
)
from medvqa.sweep_report import cell_summary, importance, load_trials, validation_rounds, write_report

SPACES = sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))


def test_the_search_spaces_exist():
    assert {"tiny", "paper"} <= set(SPACES)


@pytest.mark.parametrize("name", SPACES)
def test_every_search_space_loads_into_valid_trial_configs(name):
    space = load_space(name)
    domains = tune_param_space(space)
    assert set(domains) == set(space.params)  # replicates are not searched: every trial runs them all
    assert space.metric.startswith("val_")
    for _ in range(3):  # sampled points are valid configs that carve a validation split
        params = {k: d.sample() for k, d in domains.items()}
        for point in replicate_points(space):
            cfg = trial_config(space, {**params, **point})
            assert cfg.stage2.data.validation_fraction > 0
            assert all(_get(cfg, k) == v for k, v in {**params, **point}.items())


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
    space = load_space("tiny", {"max_concurrent": None, "num_samples": 8})
    assert max_concurrent_trials(space, {"CPU": 4.0}) == 2  # a trial's 2 seeds take 2 x (0.5 + 2 x 0.25) CPUs
    assert max_concurrent_trials(load_space("tiny"), {"CPU": 64.0}) == 1  # the space's cap wins
    paper = load_space("paper")  # 1 GPU per run, 2 seeds per trial
    assert max_concurrent_trials(paper, {"CPU": 64.0, "GPU": 8.0}) == 4
    two_gpu = load_space("paper", {"overrides": paper.overrides + ["resources.num_workers=2"]})
    assert max_concurrent_trials(two_gpu, {"CPU": 64.0, "GPU": 8.0}) == 2
    with pytest.raises(RuntimeError, match="a trial needs 4"):
        max_concurrent_trials(two_gpu, {"CPU": 64.0, "GPU": 3.0})


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
    """A sweep directory as Tune and the trials leave it: one trial per configuration, each with a run per replicate
    seed; score = limit/1000 + r/100 (+ seed noise 0.001), so the best cell, the curve and the importances are known.
    Trial 'e' errored; trial 's' was stopped by ASHA after one round; trial 'k' was killed after its last round
    before Tune recorded any result (its runs' metrics.jsonl have them)."""
    space = load_space("tiny")
    sdir = tmp_path / "sweep"
    (sdir / "tune").mkdir(parents=True)
    (sdir / "space.yaml").write_text(yaml.safe_dump(space.to_dict()))
    trials = [(f"t{i}", {"stage1.data.limit": limit, "lora.r": r})
              for i, (limit, r) in enumerate((l, r) for l in (48, 96, 192) for r in (2, 8))]
    trials[0] = ("k", trials[0][1])
    for tid, params in trials + [("s", {"stage1.data.limit": 48, "lora.r": 4}),
                                 ("e", {"stage1.data.limit": 96, "lora.r": 4})]:
        tdir = sdir / "tune" / f"trial_fn_{tid}"
        tdir.mkdir()
        (tdir / "params.json").write_text(json.dumps(params))
        runs, results = {}, []
        for seed in (0, 1):
            run_dir = sdir / "runs" / f"trial-{tid}-seed{seed}"
            run_dir.mkdir(parents=True)
            (run_dir / "config.yaml").write_text(dump_yaml(trial_config(space, {**params, "run.seed": seed},
                                                                        f"trial-{tid}-seed{seed}")))
            runs[f"run.seed={seed}"] = str(run_dir)
            score = params["stage1.data.limit"] / 1000 + params["lora.r"] / 100 + seed / 1000
            rounds = 1 if tid in ("s", "e") else 3
            validation = [{"stage": "stage2", "event": "validation", "val_round": k, "val_final": k == 3,
                           "val_n": 24, "val_normalized_f1": score * k / 3,
                           "val_normalized_f1_ci": [score * k / 3 - 0.05, score * k / 3 + 0.05]}
                          for k in range(1, rounds + 1)]
            if tid == "t3" and seed == 0:  # a resumed stage repeated round 2: the later row counts
                validation.insert(2, {**validation[1], "val_normalized_f1": 0.0})
            (run_dir / "metrics.jsonl").write_text("".join(json.dumps(v) + "\n" for v in validation))
            results = [{"val_round": k, "trial_id": tid, "time_total_s": 10.0 * k} for k in range(1, rounds + 1)]
        (tdir / TRIAL_LINK).write_text(json.dumps({"trial_id": tid, "runs": runs, "replicates": {
            label: {"run.seed": int(label[-1])} for label in runs}}))
        if tid == "k":
            results = []
        if tid == "e":
            (tdir / "error.txt").write_text("boom")
        (tdir / "result.json").write_text("".join(json.dumps(x) + "\n" for x in results))
    return sdir


def test_report_statuses_cells_and_importance(tmp_path):
    space, trials, runs = load_trials(_fake_sweep(tmp_path))
    status = dict(zip(trials["trial_id"], trials["status"]))
    assert status["s"] == "stopped" and status["e"] == "error" and status["k"] == "completed"
    assert trials.set_index("trial_id").loc["e", "error"] == "boom"
    assert list(trials["status"])[:6] == ["completed"] * 6  # completed first, best first
    assert len(runs) == 16 and (trials["replicates"] == 2).all()  # every trial ran both seeds
    by_id = trials.set_index("trial_id")
    assert pd.isna(by_id.loc["k", "seconds"]) and by_id.loc["t5", "seconds"] == 30.0  # Tune's trial time
    assert by_id.loc["t3", "val_round"] == 3
    assert by_id.loc["t3", "val_normalized_f1"] == pytest.approx(0.1765)  # mean of seeds 0.176, 0.177
    assert by_id.loc["t3", "val_normalized_f1_by_replicate"] == "run.seed=0: 0.1760; run.seed=1: 0.1770"
    assert trials.iloc[0]["trial_id"] == "t5"  # limit 192, r 8: 0.2725
    half = 12.706 * pd.Series([0.272, 0.273]).std() / math.sqrt(2)  # t-interval over the 2 seeds
    assert (by_id.loc["t5", "ci_low"], by_id.loc["t5", "ci_high"]) == pytest.approx((0.2725 - half, 0.2725 + half))
    assert by_id.loc["s", "val_round"] == 1 and by_id.loc["s", "val_normalized_f1"] == pytest.approx(
        (0.088 + 0.089) / 2 / 3)  # a stopped trial: its replicates' mean at the round they all reached

    cells = cell_summary(space, trials, runs)
    assert len(cells) == 6 and (cells["n"] == 2).all()  # 3 limits x 2 ranks, the 2 seeds of each pooled
    top = cells.iloc[0]
    assert (top["stage1.data.limit"], top["lora.r"], top["trial_ids"]) == (192, 8, "t5")
    assert top["mean"] == pytest.approx(0.2725)
    assert (top["low"], top["high"]) == pytest.approx((0.2725 - half, 0.2725 + half))

    imp = importance(space, trials, runs).set_index("key")["eta_squared"]
    # Balanced design: between-level variances 0.003584 (limit), 0.0009 (rank), 0.00000025 (seed) of the total.
    total = 0.003584 + 0.0009 + 0.00000025
    assert imp["stage1.data.limit"] == pytest.approx(0.003584 / total, rel=1e-3)
    assert imp["lora.r"] == pytest.approx(0.0009 / total, rel=1e-3)
    assert imp["run.seed"] < 1e-3  # the seed is the noise reference
    assert imp["stage1.data.limit"] + imp["lora.r"] + imp["run.seed"] == pytest.approx(1.0, abs=1e-6)


def test_report_files_and_best_preset(tmp_path):
    sdir = _fake_sweep(tmp_path)
    out = write_report(sdir)
    assert out["trials"] == 8 and out["status"] == {"completed": 6, "stopped": 1, "error": 1, "pending": 0}
    csv = pd.read_csv(out["trials_csv"])
    assert len(csv) == 8 and csv["run_dirs"].notna().all()  # every row traces to its runs
    assert len(pd.read_csv(out["runs_csv"])) == 16
    assert Path(out["curve"]).stat().st_size > 1000
    md = Path(out["markdown"]).read_text()
    assert "t5" in md and "curve.png" in md and "eta" in md and "## Errors" in md and "boom" in md
    assert "run.seed=0: 0.2720; run.seed=1: 0.2730" in md and "Replicates: run.seed [0, 1]" in md
    assert Path(out["html"]).read_text().startswith("<!DOCTYPE html>")

    best = load_config(out["best_yaml"])  # a preset jobs/two_stage.py accepts unchanged
    assert (best.stage1.data.limit, best.lora.r) == (192, 8)
    assert best.stage2.data.validation_fraction == 0  # the final model trains on the whole split
    assert best.run.seed == load_config("tiny").run.seed and best.run.name == "tiny-best"
    assert out["best"]["trial_ids"] == "t5" and out["best"]["n_runs"] == 2
    assert out["best"]["mean"] == pytest.approx(0.2725)


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
    assert res.exit_code == 0 and json.loads(res.output)["trials"] == 8


def test_a_trial_reports_the_replicates_mean_only_for_rounds_every_replicate_reached(tmp_path, monkeypatch):
    """run_replicates (a trial's body) trains all replicates at once and reports to Tune, in round order, the mean
    over replicates of each validation round once every replicate has written it: seed 0 finishes all three rounds
    while seed 1 is held after round 1, and round 2 is reported only after seed 1 writes it. A failing replicate
    fails the trial."""
    import threading

    import medvqa.train
    from medvqa.runs import append_metrics, run_dir_for
    from medvqa.sweep import run_replicates

    space = load_space("tiny")
    cfgs = {f"run.seed={s}": trial_config(space, {"stage1.data.limit": 48, "lora.r": 2, "run.seed": s}, "t",
                                          str(tmp_path)) for s in (0, 1)}
    seed0_done, release = threading.Event(), threading.Event()

    def fake_run(cfg):  # seed 0: three rounds at once; seed 1: round 1 after that, rounds 2-3 after a report
        rd = run_dir_for(cfg)
        rd.path.mkdir(parents=True, exist_ok=True)
        for k in (1, 2, 3):
            if cfg.run.seed == 1:
                assert (seed0_done if k == 1 else release).wait(60)
            append_metrics(rd, {"stage": "stage2", "event": "validation", "val_round": k, "val_final": k == 3,
                                "val_n": 8, "val_normalized_f1": k / 10 + cfg.run.seed / 100})
        if cfg.run.seed == 0:
            seed0_done.set()
        return rd.path

    reports, seen_by_seed0 = [], []

    def report(result):
        reports.append(result)
        seen_by_seed0.append(len(validation_rounds(run_dir_for(cfgs["run.seed=0"]))))
        release.set()

    monkeypatch.setattr(medvqa.train, "run_two_stage", fake_run)
    run_replicates(cfgs, "val_normalized_f1", report, poll_s=0.01)
    assert [r["val_round"] for r in reports] == [1, 2, 3]
    assert [r["val_normalized_f1"] for r in reports] == pytest.approx([0.105, 0.205, 0.305])
    assert reports[0]["val_normalized_f1_by_replicate"] == {"run.seed=0": 0.1, "run.seed=1": 0.11}
    assert [r["val_final"] for r in reports] == [False, False, True] and reports[0]["n_replicates"] == 2
    assert seen_by_seed0[0] == 3  # round 1 waited for seed 1 although seed 0 was already done

    def broken(cfg):
        raise RuntimeError(f"seed {cfg.run.seed} failed")

    monkeypatch.setattr(medvqa.train, "run_two_stage", broken)
    with pytest.raises(RuntimeError, match="failed"):
        run_replicates(cfgs, "val_normalized_f1", report, poll_s=0.01)
