"""Run ids, the run-directory layout, environment.json and metrics.jsonl (no Ray, no torch)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from medvqa.config import ConfigError, from_dict, load_config
from medvqa.runs import (
    ID_EXCLUDED,
    PACKAGES,
    RunDir,
    append_metrics,
    canonical_config,
    prepare_run_dir,
    read_json,
    read_metrics,
    run_dir_for,
    run_id,
    write_json,
)


def _cfg(tmp_path=None, *overrides):
    extra = [f"run.output_dir={tmp_path}"] if tmp_path else []
    return load_config("tiny", [*extra, *overrides])


def test_run_id_is_deterministic_and_named():
    a, b = _cfg(), _cfg()
    assert run_id(a) == run_id(b)
    assert run_id(a).startswith("tiny-") and len(run_id(a).split("-")[-1]) == 12


def test_run_id_is_stable_across_processes():
    # No hash randomisation, no dict-order or object-identity leaking into the id.
    code = "from medvqa.config import load_config; from medvqa.runs import run_id; print(run_id(load_config('tiny')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"})
    assert out.stdout.strip() == run_id(_cfg())


@pytest.mark.parametrize("override", ["run.seed=1", "stage2.lr=3e-4", "lora.r=16", "stage1.data.limit=100",
                                      "model.name_or_path=other", "resources.use_gpu=true", "run.name=other",
                                      "stage2.global_batch_size=8",
                                      "resources.num_workers=2 stage1.batch_size=2 stage2.batch_size=2"])
def test_run_id_changes_with_what_changes_results(override):
    assert run_id(_cfg(None, *override.split())) != run_id(_cfg())


@pytest.mark.parametrize("override", ["run.output_dir=/elsewhere", "run.evaluate=true", "run.log_every_n_steps=7",
                                      "run.checkpoint_every_n_steps=3", "run.max_failures=0",
                                      "model.cache_dir=/tmp/cache", "resources.num_cpus=2",
                                      "resources.cpus_per_worker=2", "resources.data_cpus_per_task=1",
                                      "resources.data_concurrency=8", "resources.worker_resource=w",
                                      "eval.max_new_tokens=8",
                                      "eval.conditions=true", "stage2.grad_accum=1"])
def test_run_id_ignores_where_and_how_often(override):
    assert run_id(_cfg(None, override)) == run_id(_cfg())


def test_excluded_keys_exist_in_the_config():
    # A renamed field would silently enter the hash again; an excluded key must name a real field.
    cfg, canonical = _cfg(), canonical_config(_cfg())
    for key in ID_EXCLUDED:
        *parents, leaf = key.split(".")
        node, cnode = cfg, canonical
        for part in parents:
            node, cnode = getattr(node, part), cnode[part]
        assert hasattr(node, leaf), key
        assert leaf not in cnode, key


def test_layout_is_created(tmp_path):
    cfg = _cfg(tmp_path)
    rd = prepare_run_dir(cfg)
    assert isinstance(rd, RunDir)
    assert rd.path == tmp_path.resolve() / run_id(cfg)
    assert Path(rd) == rd.path and os.fspath(rd) == str(rd.path) and rd / "x" == rd.path / "x"
    assert sorted(p.name for p in rd.path.iterdir() if p.is_dir()) == ["adapters", "checkpoints", "data", "rejects"]
    assert rd.checkpoints("stage1") == rd.path / "checkpoints" / "stage1"
    assert rd.adapters("stage2") == rd.path / "adapters" / "stage2"
    assert rd.data("stage1") == rd.path / "data" / "stage1"
    assert rd.rejects("stage1") == rd.path / "rejects" / "stage1"
    assert rd.config.name == "config.yaml" and rd.metrics.name == "metrics.jsonl"
    assert rd.manifest.name == "manifest.json" and rd.environment.name == "environment.json"
    assert rd.eval_metrics == rd.path / "eval" / "metrics.json" and rd.human_eval.parent == rd.report
    assert not list(rd.path.glob(".*.tmp"))  # atomic writes leave no temp files


def test_config_round_trips(tmp_path):
    cfg = _cfg(tmp_path, "lora.r=4", "stage1.lr=2e-5")
    rd = prepare_run_dir(cfg)
    again = from_dict(yaml.safe_load(rd.config.read_text()))
    assert again == cfg and run_id(again) == rd.name


def test_run_dir_reads_its_config_with_overrides(tmp_path):
    cfg = _cfg(tmp_path, "lora.r=4")
    rd = prepare_run_dir(cfg)
    assert rd.read_config() == cfg
    assert rd.read_config(["eval.max_new_tokens=3"]).eval.max_new_tokens == 3 and rd.read_config().lora.r == 4
    with pytest.raises(ConfigError, match="eval.nope"):
        rd.read_config(["eval.nope=1"])
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        RunDir(tmp_path / "elsewhere").read_config()


def test_reopening_resumes_and_accepts_non_hashed_changes(tmp_path):
    cfg = _cfg(tmp_path)
    rd = prepare_run_dir(cfg)
    append_metrics(rd, {"event": "x"})
    rd2 = prepare_run_dir(_cfg(tmp_path, "run.log_every_n_steps=5"))
    assert rd2 == rd and read_metrics(rd2)[0]["event"] == "x"
    assert yaml.safe_load(rd.config.read_text())["run"]["log_every_n_steps"] == 5


def test_edited_config_is_refused(tmp_path):
    cfg = _cfg(tmp_path)
    rd = prepare_run_dir(cfg)
    rd.config.write_text(rd.config.read_text().replace("r: 8", "r: 32"))
    with pytest.raises(ConfigError, match="lora.r"):
        prepare_run_dir(cfg)
    rd.config.write_text("run: [not, a, mapping]\n")
    with pytest.raises(ConfigError, match="cannot be read"):
        prepare_run_dir(cfg)


def test_environment_json(tmp_path):
    torch_was_imported = "torch" in sys.modules
    rd = prepare_run_dir(_cfg(tmp_path))
    env = read_json(rd.environment)
    assert set(env["packages"]) == set(PACKAGES)
    assert env["packages"]["ray"] and env["packages"]["numpy"] and env["packages"]["pyarrow"]
    assert env["python"] == ".".join(map(str, sys.version_info[:3]))
    assert env["platform"] and len(env["source_sha256"]) == 16
    assert set(env["git"]) == {"commit", "dirty"}
    if env["git"]["commit"] is not None:
        assert len(env["git"]["commit"]) == 40 and isinstance(env["git"]["dirty"], bool)
    assert ("torch" in sys.modules) == torch_was_imported  # preparing a run never imports torch
    if not torch_was_imported:
        assert env["cuda"] is None


def test_environment_is_not_imported_heavily():
    code = ("import sys; from medvqa.config import load_config; from medvqa.runs import environment; environment(); "
            "print(sorted(m for m in ('torch', 'ray', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_environment_change_is_kept(tmp_path):
    cfg = _cfg(tmp_path)
    rd = prepare_run_dir(cfg)
    env = read_json(rd.environment)
    env["packages"]["ray"] = "0.0.1"
    write_json(rd.environment, env)
    prepare_run_dir(cfg)
    env2 = read_json(rd.environment)
    assert env2["previous"][0]["packages"]["ray"] == "0.0.1" and env2["packages"]["ray"] != "0.0.1"
    prepare_run_dir(cfg)  # same environment again: no new entry
    assert len(read_json(rd.environment)["previous"]) == 1


def test_metrics_append_and_read(tmp_path):
    assert read_metrics(tmp_path) == []
    append_metrics(tmp_path, {"stage": "stage1", "step": 1, "loss": 2.5})
    append_metrics(RunDir(tmp_path), {"stage": "stage1", "step": 2, "loss": 2.0, "time": 123.0})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"torn": ')  # a crash mid-line
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    assert isinstance(rows[0]["time"], float) and rows[0]["time"] > 1.6e9
    assert rows[1]["time"] == 123.0


def test_rows_past_a_restored_checkpoint_are_superseded(tmp_path):
    """An attempt logs steps 1-5 (checkpoint at 4, validation at 5) and dies; the resumed attempt restarts at step 4
    and logs 5-6: every step once, the resumed attempt's rows win; the raw history stays in the file."""
    rows = [{"stage": "stage1", "event": "train_start", "step": 0}]
    rows += [{"stage": "stage1", "step": s, "loss": 10 - s} for s in range(1, 6)]
    rows += [{"stage": "stage1", "event": "checkpoint", "step": 4}, {"stage": "stage1", "event": "validation",
                                                                       "step": 5, "val_round": 1},
             {"stage": "stage1", "event": "fault", "fault": "stage1:step=5:driver"},
             {"stage": "stage1", "event": "train_start", "step": 4}]
    rows += [{"stage": "stage1", "step": s, "loss": 0.5 - s / 100} for s in (5, 6)]
    rows += [{"stage": "stage1", "event": "validation", "step": 5, "val_round": 1}, {"stage": "stage1", "event": "end"},
             {"stage": "stage2", "event": "train_start", "step": 0}, {"stage": "stage2", "step": 1, "loss": 3.0}]
    for r in rows:
        append_metrics(tmp_path, r)
    kept = read_metrics(tmp_path)
    losses = [(r["stage"], r["step"], r["loss"]) for r in kept if "loss" in r]
    assert losses == [("stage1", 1, 9), ("stage1", 2, 8), ("stage1", 3, 7), ("stage1", 4, 6), ("stage1", 5, 0.45),
                      ("stage1", 6, 0.44), ("stage2", 1, 3.0)]
    assert [r["step"] for r in kept if r.get("event") == "validation"] == [5]
    assert [r["step"] for r in kept if r.get("event") == "checkpoint"] == [4]
    assert any(r.get("event") == "fault" for r in kept)  # rows without a step are history, not superseded
    assert len(read_metrics(tmp_path, superseded=True)) == len(rows)


def test_write_json_is_atomic_and_read_json_default(tmp_path):
    path = tmp_path / "sub" / "x.json"
    write_json(path, {"a": 1, "p": Path("/x")})
    assert read_json(path) == {"a": 1, "p": "/x"}
    write_json(path, [1, 2])
    assert read_json(path) == [1, 2]
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]
    assert read_json(tmp_path / "missing.json", default=None) is None
    with pytest.raises(FileNotFoundError):
        read_json(tmp_path / "missing.json")


def test_relative_output_dir_follows_runs_base(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MEDVQA_RUNS_BASE", raising=False)
    cfg = load_config("tiny", ["run.output_dir=runs"])
    assert run_dir_for(cfg).path == tmp_path.resolve() / "runs" / run_id(cfg)
    monkeypatch.setenv("MEDVQA_RUNS_BASE", str(tmp_path / "base"))
    assert run_dir_for(cfg).path == (tmp_path / "base").resolve() / "runs" / run_id(cfg)
    absolute = load_config("tiny", [f"run.output_dir={tmp_path / 'abs'}"])
    assert run_dir_for(absolute).path == (tmp_path / "abs").resolve() / run_id(absolute)
    from medvqa.sweep import load_space, space_hash, sweep_dir_for  # sweeps resolve their folder the same way

    space = load_space("tiny")
    assert sweep_dir_for(space) == (tmp_path / "base").resolve() / "sweeps" / f"tiny-{space_hash(space)}"


def test_environment_records_the_ray_job(tmp_path, monkeypatch):
    meta = {"runtime_env": {}, "metadata": {"job_submission_id": "raysubmit_abc", "job_name": "raysubmit_abc"}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(meta))
    rd = prepare_run_dir(_cfg(tmp_path))
    env = read_json(rd.environment)
    assert env["ray_job_submission_id"] == "raysubmit_abc" and env["run_dir"] == str(rd.path)
