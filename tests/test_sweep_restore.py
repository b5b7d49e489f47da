"""The smoke sweep end to end on local Ray, tracked in MLflow (tiny model, phantoms, 2 trials one at a time without
early stopping, each training its 2 replicate seeds at once): killed by an injected fault right after a run's first
validation round, restored by the same command (the killed runs resume from that round's checkpoint, no trial is
added or trained again, a killed run ends with the adapters of its configuration trained uninterrupted), reported,
with one MLflow parent run and a child per replicate run."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import job_env, run_job
from safetensors.torch import load_file

from medvqa.config import load_config
from medvqa.runs import read_metrics

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
N_TRIALS = 2
N_RUNS = 2 * N_TRIALS  # tune/tiny.yaml: replicates run.seed [0, 1]


def _steps(run_dir: Path) -> dict[str, list[int]]:
    """Stage -> the logged training steps of a trial's run (superseded rows of an interrupted attempt left out)."""
    out: dict[str, list[int]] = {}
    for r in read_metrics(run_dir):
        if "loss" in r:
            out.setdefault(r["stage"], []).append(r["step"])
    return out


def _fired(runs: Path) -> list[Path]:
    """The run directories in which the injected fault fired."""
    return sorted(r for r in runs.iterdir() if any(m.get("event") == "fault" for m in read_metrics(r, superseded=True)))


def _round1_step(run: Path) -> int:
    (round1,) = [m for m in read_metrics(run) if m.get("event") == "validation"]
    assert round1["val_round"] == 1
    return round1["step"]


def test_sweep_is_killed_restored_tracked_and_reported(tmp_path):
    """~10-15 min on 2 cores: four tiny runs, a kill, a restore, and the killed run's configuration trained again."""
    from mlflow import MlflowClient

    from medvqa.tracking import PARENT_TAG, SWEEP_TAG
    from medvqa.trainstep import adapter_max_abs_diff

    space = yaml.safe_load((ROOT / "tune" / "tiny.yaml").read_text())
    space.update(name="tiny-fifo", num_samples=N_TRIALS, max_concurrent=1, asha=None)
    (tmp_path / "tiny-fifo.yaml").write_text(yaml.safe_dump(space))
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = job_env(MEDVQA_RUNS_BASE=str(tmp_path))
    cmd = [sys.executable, str(ROOT / "tune" / "sweep.py"), "--preset", str(tmp_path / "tiny-fifo.yaml"),
           "run.tracking=mlflow", f"run.tracking_uri={store}"]

    # 1. The fault: the first run to finish its first stage-2 validation round (and have that round's checkpoint
    #    registered) SIGKILLs the sweep driver's whole process group. The replicates of a trial train at once: one of
    #    them fired, or both if they reached the round together.
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.run(cmd, env={**env, "MEDVQA_FAULT": "stage2:val_round=1:driver"}, cwd=ROOT,
                               start_new_session=True, stdout=log, stderr=subprocess.STDOUT, timeout=900)
    assert first.returncode == -9, "the fault did not fire: " + (tmp_path / "first.log").read_text()[-3000:]
    (sweep_dir,) = (tmp_path / "sweeps").iterdir()
    killed = _fired(sweep_dir / "runs")
    assert killed and all(not (run / "stages.json").exists() for run in killed)
    round1 = {run: _round1_step(run) for run in killed}

    # 2. The same command (no fault) restores it and runs only what is missing.
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "restoring" in out.stdout
    assert len(list((sweep_dir / "tune").glob("*/params.json"))) == N_TRIALS  # no trial was added or repeated
    assert len(list((sweep_dir / "runs").iterdir())) == N_RUNS  # interrupted runs resumed in their run dirs
    for run in killed:  # the killed runs resumed from their round-1 checkpoint, not from the start of the stage
        starts = [(m["stage"], m["step"]) for m in read_metrics(run, superseded=True) if m.get("event") == "train_start"]
        assert starts[-1] == ("stage2", round1[run]), (run.name, starts)
    for run in (sweep_dir / "runs").iterdir():  # every run's steps once, in order, across the kill
        for stage, steps in _steps(run).items():
            assert steps == sorted(set(steps)), (run.name, stage, steps)

    # 3. The Optuna study survived in optuna.db (what optuna-dashboard reads).
    import optuna

    study = optuna.load_study(study_name="tiny-fifo", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    assert len(study.trials) >= N_TRIALS and sum(t.state.name == "COMPLETE" for t in study.trials) >= N_TRIALS - 1

    # 4. The report: every trial, traceable to its runs, and a best preset.
    report = sweep_dir / "report"
    trials = pd.read_csv(report / "trials.csv")
    assert len(trials) == N_TRIALS and set(trials["status"]) == {"completed"}
    for _, row in trials.iterrows():
        assert row["replicates"] == 2 and len(row["run_dirs"].split()) == 2
        for run_dir in row["run_dirs"].split():  # the trial's round is one every replicate reached
            rounds = read_metrics(run_dir)
            assert any(r.get("event") == "validation" and r.get("val_round") == row["val_round"] for r in rounds)
    assert (report / "curve.png").stat().st_size > 1000 and (report / "report.html").exists()
    assert load_config(str(report / "best.yaml")).stage2.data.validation_fraction == 0  # trains on all its data

    # 5. MLflow: the sweep's parent run with the report, a child per replicate run with its curves from the Train
    #    workers; the killed runs' children were continued by the restore and finished.
    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("medvqa").experiment_id])
    (parent,) = [r for r in runs if SWEEP_TAG in r.data.tags]
    children = [r for r in runs if r.data.tags.get(PARENT_TAG) == parent.info.run_id]
    assert parent.info.status == "FINISHED" and len(children) == N_RUNS and len(runs) == N_RUNS + 1
    assert "report/trials.csv" in [a.path for a in client.list_artifacts(parent.info.run_id, "report")]
    for child in children:
        assert child.info.status == "FINISHED", child.info.status
        assert len(client.get_metric_history(child.info.run_id, "stage1/loss")) >= 2
        assert client.get_metric_history(child.info.run_id, "stage2/val_normalized_f1")
        assert child.data.params["lora.r"] in ("2", "4", "8")

    # 6. A killed run ends with the adapters of its configuration trained uninterrupted by the main job.
    args = ["--preset", str(killed[0] / "config.yaml"), f"run.output_dir={tmp_path / 'plain'}", "run.tracking=none"]
    assert run_job(args, job_env(), tmp_path / "plain.log") == 0, (tmp_path / "plain.log").read_text()[-3000:]
    (plain,) = (tmp_path / "plain").iterdir()
    dw = {stage: adapter_max_abs_diff(*(load_file(str(r / "adapters" / stage / "adapter_model.safetensors"))
                                        for r in (killed[0], plain))) for stage in ("stage1", "stage2")}
    print(f"\nmax |Δw| of a sweep run killed after its first validation round, restored: {dw}")
    assert max(dw.values()) <= 1e-5
