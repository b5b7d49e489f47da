"""Faults injected at exact steps (``MEDVQA_FAULT``) on a local Ray with the tiny model: a killed Train worker is
restarted by Ray Train, a killed job resumes when its command is re-run, and either way the adapters equal those of the
uninterrupted reference run (conftest's ``reference_run``), each optimizer step is taken once and metrics.jsonl holds
each step once. Every test prints the max |Δw| it measured (run pytest with -s to see them).

Reference run (REFERENCE_ARGS): stage 1 = 12 steps/epoch x 2, stage 2 = 24 steps/epoch x 3, checkpoints every 8 steps
and at epoch ends (stage 1: 8, 12, 16, 24; stage 2: 8, 16, 24, 32, ...)."""

from pathlib import Path

import pytest
from conftest import REFERENCE_ARGS, job_env, run_job

from medvqa.config import load_config
from medvqa.runs import read_metrics, run_dir_for

pytestmark = pytest.mark.integration

EXACT_RESUME = 1e-5  # max |Δw| of a resumed run vs the uninterrupted one (CPU, fp32)
DETERMINISM = 1e-6  # max |Δw| of two uninterrupted runs
# One job through every fault, re-run after each kill: SIGKILL to its process group at three points, then a Train
# worker killed and restarted by Ray Train (FailureConfig) within the last run.
CHAIN = ["stage1:step=10:driver",  # mid-epoch: restores step 8 (2 steps lost)
         "stage1:end:driver",  # between the stages: stage 1 is done, stage 2 not started
         "stage2:step=24:driver",  # exactly after stage 2's end-of-epoch checkpoint: restores (epoch 1, record 0)
         "stage2:step=36:worker"]  # mid-epoch: Ray Train restarts the worker from step 32 (4 steps lost <= 8)
CHAIN_STARTS = [("stage1", 0), ("stage1", 8), ("stage2", 0), ("stage2", 24), ("stage2", 32)]


def _max_dw(run_a, run_b, stage: str) -> float:
    from safetensors.torch import load_file

    from medvqa.trainstep import adapter_max_abs_diff

    a, b = (load_file(str(r / "adapters" / stage / "adapter_model.safetensors")) for r in (run_a, run_b))
    return adapter_max_abs_diff(a, b)


def _each_step_once(run_dir, reference_dir) -> None:
    """metrics.jsonl of the resumed run: every step of every stage once, with the reference run's loss (the lost
    attempt's rows are superseded)."""
    def losses(d):
        return [(r["stage"], r["step"], r["loss"]) for r in read_metrics(d) if "loss" in r]

    got, want = losses(run_dir), losses(reference_dir)
    assert [x[:2] for x in got] == [x[:2] for x in want]
    assert max(abs(g[2] - w[2]) for g, w in zip(got, want)) <= 1e-4


def _run_through(faults: list[str], tmp_path) -> Path:
    """The reference command with ``MEDVQA_FAULT=faults`` in ``tmp_path``, re-run after each driver kill until it
    finishes (each kill is a -9, the last run a 0); its run directory."""
    args = [*REFERENCE_ARGS, f"run.output_dir={tmp_path}"]
    kills = sum(f.endswith(":driver") for f in faults)
    env = job_env(MEDVQA_FAULT=",".join(faults))
    codes = []
    while not codes or (codes[-1] != 0 and len(codes) <= kills):
        codes.append(run_job(args, env, tmp_path / f"attempt{len(codes)}.log"))
    assert codes == [-9] * kills + [0], (tmp_path / f"attempt{len(codes) - 1}.log").read_text()[-4000:]
    return run_dir_for(load_config("tiny", args[2:])).path


def _same_adapters(run_dir, ref_dir, what: str, bound: float) -> None:
    dw = {stage: _max_dw(run_dir, ref_dir, stage) for stage in ("stage1", "stage2")}
    print(f"\nmax |Δw| {what}: {dw}")
    assert max(dw.values()) <= bound


def _starts(run_dir) -> list[tuple[str, int]]:
    return [(r["stage"], r["step"]) for r in read_metrics(run_dir, superseded=True) if r.get("event") == "train_start"]


def test_killed_job_resumes_at_every_point(reference_run, tmp_path):
    """The job is SIGKILLed (whole process group) mid-epoch, between the stages and exactly after an end-of-epoch
    checkpoint, re-run by the same command after each kill, and its Train worker dies mid-epoch in the last run: the
    adapters equal the uninterrupted reference's (which ran in another process: equality also shows the training is
    deterministic across processes), and every step was taken once."""
    _, ref_dir = reference_run
    run_dir = _run_through(CHAIN, tmp_path)
    rows = read_metrics(run_dir, superseded=True)
    assert [r["fault"] for r in rows if r.get("event") == "fault"] == CHAIN
    assert _starts(run_dir) == CHAIN_STARTS
    resumed = [r for r in rows if r.get("event") == "train_start"]
    assert [(r["epoch"], r["micro_in_epoch"]) for r in resumed] == [(0, 0), (0, 16), (0, 0), (1, 0), (1, 16)]
    _same_adapters(run_dir, ref_dir, f"after the faults {CHAIN}", EXACT_RESUME)
    _each_step_once(run_dir, ref_dir)


@pytest.mark.slow
def test_killed_job_resumes_at_the_other_points(reference_run, tmp_path):
    """Two more kill points, one job: exactly after stage 1's end-of-epoch checkpoint (step 12 of 12 per epoch) and
    mid-epoch in stage 2's second epoch (step 45: restores step 40). ~5 min on 2 cores."""
    _, ref_dir = reference_run
    faults = ["stage1:step=12:driver", "stage2:step=45:driver"]
    run_dir = _run_through(faults, tmp_path)
    assert _starts(run_dir) == [("stage1", 0), ("stage1", 12), ("stage2", 0), ("stage2", 40)]
    _same_adapters(run_dir, ref_dir, f"after the faults {faults}", EXACT_RESUME)
    _each_step_once(run_dir, ref_dir)


@pytest.mark.slow
def test_two_uninterrupted_jobs_train_the_same_adapters(reference_run, tmp_path):
    """The reference command again, in a fresh run directory (data prepared anew): ~3 min on 2 cores."""
    _, ref_dir = reference_run
    _same_adapters(_run_through([], tmp_path), ref_dir, "of two uninterrupted runs", DETERMINISM)


@pytest.mark.slow
def test_killed_ddp_worker_is_restarted_from_its_checkpoint(ray_local, tmp_path, monkeypatch):
    """Two DDP workers (gloo): an uninterrupted run vs one whose rank 0 dies mid-epoch; every rank restores its own
    random state. ~4 min on 2 cores."""
    from medvqa.train import run_two_stage

    args = ["stage2.data.num_records=46", "stage2.epochs=2", "stage2.batch_size=2", "stage2.global_batch_size=8",
            "resources.num_workers=2", "run.checkpoint_every_n_steps=2", "run.log_every_n_steps=1"]
    plain = run_two_stage(load_config("tiny_single_stage", [*args, f"run.output_dir={tmp_path / 'plain'}"]))
    monkeypatch.setenv("MEDVQA_FAULT", "stage2:step=5:worker")
    killed = run_two_stage(load_config("tiny_single_stage", [*args, f"run.output_dir={tmp_path / 'killed'}"]))
    assert _starts(killed) == [("stage2", 0), ("stage2", 4)]
    dw = _max_dw(killed, plain, "stage2")
    print(f"\nmax |Δw| 2 DDP workers, rank 0 killed at step 5: {dw:.3g}")
    assert dw <= EXACT_RESUME
    _each_step_once(killed, plain)
