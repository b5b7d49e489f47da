"""MLflow tracking against a local sqlite store (no server, no Ray): params, tags, per-step metrics, resume into the
same MLflow run, evaluation metrics, and a sweep's parent and child runs."""

import json
from pathlib import Path

import pytest

pytest.importorskip("mlflow")

from medvqa import tracking  # noqa: E402
from medvqa.config import load_config  # noqa: E402
from medvqa.observe import record  # noqa: E402
from medvqa.runs import run_dir_for  # noqa: E402


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the module (creating its tables takes seconds); tests use their own experiments."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _cfg(tmp_path: Path, store: str, experiment: str, *extra: str):
    return load_config("tiny", [f"run.output_dir={tmp_path}", "run.tracking=mlflow", f"run.tracking_uri={store}",
                                f"run.tracking_experiment={experiment}", *extra])


def _client(store):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=store)


def test_params_are_dotted_and_cut_to_mlflows_limit():
    params = tracking.flatten_params({"lora": {"r": 8, "target_regex": "x" * 7000}, "run": {"limit": None},
                                      "stage2": {"data": {"kinds": ["a", "b"]}}})
    assert params["lora.r"] == "8" and params["run.limit"] == "None" and params["stage2.data.kinds"] == '["a", "b"]'
    assert len(params["lora.target_regex"]) == tracking.PARAM_VALUE_LIMIT
    assert params["lora.target_regex"].endswith("...")


def test_record_metrics_carry_the_stage_and_skip_coordinates():
    record = {"stage": "stage2", "step": 7, "total_steps": 9, "time": 1.0, "epoch": 1, "loss": 0.5, "lr": 1e-3,
              "samples_per_s": 3.0, "val_normalized_f1": 0.4, "val_normalized_f1_ci": [0.3, 0.5], "val_final": True,
              "event": "validation", "bad": float("nan")}
    assert tracking.record_metrics(record) == {"stage2/epoch": 1.0, "stage2/loss": 0.5, "stage2/lr": 1e-3,
                                               "stage2/samples_per_s": 3.0, "stage2/val_normalized_f1": 0.4}


def test_tracking_uri_defaults_to_a_sqlite_store_beside_the_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri("", tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///rel/m.db")
    monkeypatch.chdir(tmp_path)
    assert tracking.tracking_uri("", Path("/elsewhere")) == f"sqlite:///{tmp_path.resolve()}/rel/m.db"
    assert tracking.tracking_uri("http://mlflow:5000", tmp_path) == "http://mlflow:5000"  # config beats env


def test_a_run_logs_params_tags_and_step_metrics_and_a_resume_continues_it(tmp_path, store):
    cfg = _cfg(tmp_path, store, "unit-resume", "lora.r=16")
    rd = run_dir_for(cfg)
    session = tracking.start_run(cfg, rd, tags={"medvqa.preset": "tiny"})
    # The record path every worker and the driver use: metrics.jsonl -> MLflow.
    for step, loss in ((1, 2.0), (2, 1.5)):
        record(rd, {"stage": "stage1", "step": step, "total_steps": 2, "loss": loss, "lr": 1e-3})
    record(rd, {"stage": "stage1", "event": "end", "seconds": 12.5})
    tracking.end_run(rd, "FAILED")  # e.g. killed mid-run

    again = tracking.start_run(cfg, rd)  # re-submitted: the same MLflow run, RUNNING again
    assert again["run_id"] == session["run_id"]
    record(rd, {"stage": "stage2", "step": 1, "total_steps": 1, "loss": 0.9})
    tracking.end_run(rd)

    client = _client(store)
    run = client.get_run(session["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == rd.name
    assert run.data.params["lora.r"] == "16" and run.data.params["stage2.lr"] == str(cfg.stage2.lr)
    assert run.data.tags[tracking.RUN_TAG] == rd.name and run.data.tags["medvqa.preset"] == "tiny"
    assert run.data.tags["medvqa.adapters"] == str(rd.path / "adapters") and run.data.tags["medvqa.source_sha256"]
    history = client.get_metric_history(session["run_id"], "stage1/loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 1.5)]
    assert run.data.metrics["stage1/seconds"] == 12.5 and run.data.metrics["stage2/loss"] == 0.9
    exp = client.get_experiment(session["experiment_id"])
    assert len(client.search_runs([exp.experiment_id])) == 1


def test_a_run_without_its_tracking_file_is_found_by_its_tag(tmp_path, store):
    cfg = _cfg(tmp_path, store, "unit-tag")
    rd = run_dir_for(cfg)
    first = tracking.start_run(cfg, rd)
    (rd.path / tracking.SESSION_FILE).unlink()  # e.g. the run dir was copied without it
    assert tracking.start_run(cfg, rd)["run_id"] == first["run_id"]


def test_tracking_off_keeps_the_run_id_but_stops_logging(tmp_path, store):
    cfg = _cfg(tmp_path, store, "unit-off")
    rd = run_dir_for(cfg)
    session = tracking.start_run(cfg, rd)
    off = load_config("tiny", [f"run.output_dir={tmp_path}"])
    assert tracking.start_run(off, rd) is None
    stored = json.loads((rd.path / tracking.SESSION_FILE).read_text())
    assert stored["tracking"] == "none" and stored["run_id"] == session["run_id"]
    record(rd, {"stage": "stage1", "step": 1, "loss": 3.0})
    assert "stage1/loss" not in _client(store).get_run(session["run_id"]).data.metrics
    assert tracking.start_run(cfg, rd)["run_id"] == session["run_id"]  # tracked again later: the same run


def test_evaluation_metrics_per_cell_and_image_reliance(tmp_path, store):
    metrics = {"cells": {"two_stage": {"true": {"n": 10, "normalized_em": 0.7, "ci": {"normalized_em": [0.5, 0.9]},
                                                "seed": 0, "abstention_rate": {"decline_rate": 0.1, "ci": {}}}},
                         "base": {"swapped": {"n": 10, "normalized_em": None}}},
               "image_reliance": {"two_stage": {"normalized_em": {"drop": 0.25, "ci": [0.1, 0.4]}}}}
    assert tracking.evaluation_metrics(metrics) == {
        "eval/two_stage/true/n": 10.0, "eval/two_stage/true/normalized_em": 0.7,
        "eval/two_stage/true/abstention_rate": 0.1, "eval/base/swapped/n": 10.0,
        "eval/two_stage/image_reliance/normalized_em": 0.25}
    # An evaluation of a run trained without tracking opens the run (FINISHED) and logs to it.
    cfg = _cfg(tmp_path, store, "unit-eval")
    rd = run_dir_for(cfg)
    tracking.log_evaluation(cfg, rd, metrics)
    session = tracking.read_session(rd)
    run = _client(store).get_run(session["run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics["eval/two_stage/true/normalized_em"] == 0.7
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.md").write_text("# report\n")
    tracking.log_artifacts(rd, report, "report")
    assert [a.path for a in _client(store).list_artifacts(session["run_id"], "report")] == ["report/report.md"]


def test_a_sweep_is_a_parent_run_with_a_child_per_trial(tmp_path, store):
    from medvqa.sweep import load_space

    space = load_space("tiny", {"output_dir": str(tmp_path)},
                       ["run.tracking=mlflow", f"run.tracking_uri={store}", "run.tracking_experiment=unit-sweep"])
    sdir = tmp_path / "sweep"
    parent = tracking.start_sweep(space, sdir)
    trials = {}
    for trial in ("finished", "stopped", "killed", "failed"):
        cfg = _cfg(tmp_path / "runs", "sqlite:///ignored-the-parent-decides.db", "ignored", f"run.name={trial}")
        rd = run_dir_for(cfg)
        trials[trial] = (rd, tracking.start_run(cfg, rd, parent=tracking.read_session(sdir)))
    tracking.end_run(trials["finished"][0])
    tracking.end_run(trials["stopped"][0], "FAILED")  # ASHA stopped it: its TorchTrainer failed as the actor went
    tracking.end_run(trials["failed"][0], "FAILED")  # a real error: Tune reports it
    # "killed": its actor was killed, the run is still RUNNING
    (sdir / "report").mkdir()
    (sdir / "report" / "trials.csv").write_text("trial\n")
    tracking.end_sweep(sdir, "FINISHED", sdir / "report",
                       [trials[t][0].path for t in ("finished", "stopped", "killed")] + [None])

    client = _client(store)
    assert {session["experiment_id"] for _, session in trials.values()} == {parent["experiment_id"]}
    runs = {r.info.run_id: r for r in client.search_runs([parent["experiment_id"]])}
    assert runs[parent["run_id"]].info.status == "FINISHED"
    space_params = runs[parent["run_id"]].data.params  # the search space
    assert space_params["params.lora.r.values"] == "[2, 4, 8]" and space_params["metric"] == "val_normalized_f1"
    assert {t: runs[s["run_id"]].data.tags[tracking.PARENT_TAG] for t, (_, s) in trials.items()} == {
        t: parent["run_id"] for t in trials}
    assert {t: runs[s["run_id"]].info.status for t, (_, s) in trials.items()} == {
        "finished": "FINISHED", "stopped": "KILLED", "killed": "KILLED", "failed": "FAILED"}
    assert [a.path for a in client.list_artifacts(parent["run_id"], "report")] == ["report/trials.csv"]
