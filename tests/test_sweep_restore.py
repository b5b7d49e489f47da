"""The smoke sweep end to end on local Ray (tiny model, phantoms, 2 trials one at a time, each training its 2
replicate seeds at once): killed by an injected fault right after a run's first validation round, restored by the
same command (the killed runs resume from that round's checkpoint, no trial is added or trained again), reported, and
its best preset trains unchanged."""

import os
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
from medvqa.sweep import load_space, sweep_dir_for

pytestmark = pytest.mark.integration
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


@pytest.mark.slow  # ~6-11 min on 2 cores: four tiny runs, a kill, a restore and the best preset's run
def test_sweep_is_interrupted_restored_and_reported(tmp_path):
    env = job_env(MEDVQA_RUNS_BASE=str(tmp_path))
    cmd = [sys.executable, str(ROOT / "tune" / "sweep.py"), "--preset", "tiny", "--num-samples", str(N_TRIALS)]
    os.environ["MEDVQA_RUNS_BASE"] = str(tmp_path)
    try:
        sweep_dir = sweep_dir_for(load_space("tiny", {"num_samples": N_TRIALS}))
    finally:
        del os.environ["MEDVQA_RUNS_BASE"]

    # 1. Start the sweep with a fault: the first trial to finish its first stage-2 validation round (and have that
    #    round's checkpoint registered) SIGKILLs the sweep driver's whole process group.
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.run(cmd, env={**env, "MEDVQA_FAULT": "stage2:val_round=1:driver"}, cwd=ROOT,
                               start_new_session=True, stdout=log, stderr=subprocess.STDOUT, timeout=900)
    assert first.returncode == -9, "the fault did not fire: " + (tmp_path / "first.log").read_text()[-3000:]
    # The replicates of a trial train at once: one of them fired, or both if they reached the round together.
    killed = _fired(sweep_dir / "runs")
    assert killed and all(not (run / "stages.json").exists() for run in killed)
    round1 = {run: _round1_step(run) for run in killed}

    # 2. The same command (no fault) restores it and runs only what is missing.
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "restoring" in out.stdout
    params = list((sweep_dir / "tune").glob("*/params.json"))
    assert len(params) == N_TRIALS  # no trial was added or repeated
    assert len(list((sweep_dir / "runs").iterdir())) == N_RUNS  # interrupted runs resumed in their run dirs
    for run in killed:  # the killed runs resumed from their round-1 checkpoint, not from the start of the stage
        starts = [(m["stage"], m["step"]) for m in read_metrics(run, superseded=True) if m.get("event") == "train_start"]
        assert starts[-1] == ("stage2", round1[run]), (run.name, starts)
    for run in (sweep_dir / "runs").iterdir():  # every run's steps once, in order, across the kill
        for stage, steps in _steps(run).items():
            assert steps == sorted(set(steps)), (run.name, stage, steps)

    # 3. The Optuna study survived in optuna.db (what optuna-dashboard reads).
    import optuna

    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    assert len(study.trials) >= N_TRIALS
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials) >= N_TRIALS - 1

    # 4. The report: every trial, traceable to its run dir, and a best preset.
    report = sweep_dir / "report"
    trials = pd.read_csv(report / "trials.csv")
    errors = [(Path(d) / "error.txt").read_text()[-3000:] for d in trials["trial_dir"] if (Path(d) / "error.txt").exists()]
    assert len(trials) == N_TRIALS and set(trials["status"]) <= {"completed", "stopped"}, errors
    assert (trials["status"] == "completed").any()
    for _, row in trials.iterrows():
        assert row["replicates"] == 2 and len(row["run_dirs"].split()) == 2
        for run_dir in row["run_dirs"].split():  # the trial's round is one every replicate reached
            rounds = read_metrics(run_dir)
            assert any(r.get("event") == "validation" and r.get("val_round") == row["val_round"] for r in rounds)
    assert (report / "curve.png").stat().st_size > 1000 and (report / "report.html").exists()

    # 5. The best preset trains unchanged with the main job.
    best = load_config(str(report / "best.yaml"))
    assert best.stage2.data.validation_fraction == 0
    job = subprocess.run([sys.executable, str(ROOT / "jobs" / "two_stage.py"), "--preset", str(report / "best.yaml"),
                          f"run.output_dir={tmp_path / 'best'}"], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    (run_dir,) = [Path(line.removeprefix("run dir: ")) for line in job.stdout.splitlines() if line.startswith("run dir: ")]
    assert (run_dir / "adapters" / "stage2" / "adapter_config.json").exists()


@pytest.mark.slow
def test_a_killed_trial_ends_with_the_adapters_of_an_uninterrupted_run(tmp_path):
    """The tiny space without early stopping, 2 trials one at a time: the sweep is killed right after a run of the
    first trial reached its first validation round and restored; that trial's adapters equal those of its configuration trained
    uninterrupted by the main job. ~10 min on 2 cores."""
    from medvqa.trainstep import adapter_max_abs_diff

    space = yaml.safe_load((ROOT / "tune" / "tiny.yaml").read_text())
    space.update(name="tiny-fifo", num_samples=2, max_concurrent=1, asha=None)
    (tmp_path / "tiny-fifo.yaml").write_text(yaml.safe_dump(space))
    env = job_env(MEDVQA_RUNS_BASE=str(tmp_path))
    cmd = [sys.executable, str(ROOT / "tune" / "sweep.py"), "--preset", str(tmp_path / "tiny-fifo.yaml"), "--no-report"]
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.run(cmd, env={**env, "MEDVQA_FAULT": "stage2:val_round=1:driver"}, cwd=ROOT,
                               start_new_session=True, stdout=log, stderr=subprocess.STDOUT, timeout=900)
    assert first.returncode == -9, (tmp_path / "first.log").read_text()[-3000:]
    (runs,) = (tmp_path / "sweeps").glob("*/runs")
    killed = _fired(runs)[0]  # one replicate fired (or both, reaching the round together): either is a killed run
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]

    args = ["--preset", str(killed / "config.yaml"), f"run.output_dir={tmp_path / 'plain'}"]
    assert run_job(args, job_env(), tmp_path / "plain.log") == 0, (tmp_path / "plain.log").read_text()[-3000:]
    (plain,) = (tmp_path / "plain").iterdir()
    dw = {stage: adapter_max_abs_diff(*(load_file(str(r / "adapters" / stage / "adapter_model.safetensors"))
                                        for r in (killed, plain))) for stage in ("stage1", "stage2")}
    print(f"\nmax |Δw| of a sweep trial killed after its first validation round, restored: {dw}")
    assert max(dw.values()) <= 1e-5
