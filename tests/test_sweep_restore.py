"""The smoke sweep end to end on local Ray (tiny model, phantoms, 2 trials one at a time, each training its 2
replicate seeds at once): killed mid-way, restored by the same command without repeating finished runs, reported,
and its best preset trains unchanged."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from medvqa.config import load_config
from medvqa.sweep import load_space, sweep_dir_for

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
N_TRIALS = 2
N_RUNS = 2 * N_TRIALS  # tune/tiny.yaml: replicates run.seed [0, 1]


def _finished_runs(sweep_dir: Path) -> dict[str, int]:
    """Trial run dirs whose two-stage run returned (stages.json written) -> their metrics.jsonl line count."""
    return {p.parent.name: len((p.parent / "metrics.jsonl").read_text().splitlines())
            for p in (sweep_dir / "runs").glob("*/stages.json")}


def test_sweep_is_interrupted_restored_and_reported(tmp_path):
    env = {**os.environ, "MEDVQA_RUNS_BASE": str(tmp_path), "TOKENIZERS_PARALLELISM": "false",
           "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray", dir="/tmp")}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, str(ROOT / "tune" / "sweep.py"), "--preset", "tiny", "--num-samples", str(N_TRIALS)]
    os.environ["MEDVQA_RUNS_BASE"] = str(tmp_path)
    try:
        sweep_dir = sweep_dir_for(load_space("tiny", {"num_samples": N_TRIALS}))
    finally:
        del os.environ["MEDVQA_RUNS_BASE"]

    # 1. Start the sweep; kill the whole process group once a trial has finished and before all have.
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 420
        while time.time() < deadline and proc.poll() is None and not _finished_runs(sweep_dir):
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = _finished_runs(sweep_dir)
    assert before, "no trial finished before the deadline: " + (tmp_path / "first.log").read_text()[-3000:]
    assert len(before) < N_RUNS, "the sweep finished before the kill"

    # 2. The same command restores it and runs only what is missing.
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "restoring" in out.stdout
    params = list((sweep_dir / "tune").glob("*/params.json"))
    assert len(params) == N_TRIALS  # no trial was added or repeated
    after = _finished_runs(sweep_dir)
    for run, lines in before.items():  # finished trials were not trained again
        assert after.get(run) == lines, run
    assert len(list((sweep_dir / "runs").iterdir())) == N_RUNS  # interrupted runs resumed in their run dirs

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
            rounds = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
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
