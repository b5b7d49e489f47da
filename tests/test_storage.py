"""Run directories on any storage (``medvqa.storage``, ``medvqa.runs``): local folders and an S3 bucket served by moto
on loopback. No Ray, no model: seconds each."""

import json
import os
import pickle
from pathlib import Path

import pytest
from conftest import bucket_keys, make_bucket

from medvqa import runs
from medvqa.config import ConfigError, load_config
from medvqa.runs import RunDir, append_metrics, prepare_run_dir, read_json, read_metrics, run_dir_for, run_id
from medvqa.storage import StoragePath, local_copy, mirrored_file, staged


# ------------------------------------------------------------------------------------------------ names (no I/O)


def test_a_uri_is_joined_named_and_compared_like_a_path():
    root = StoragePath("s3://bkt/runs/")
    assert root == StoragePath("s3://bkt/runs") and str(root) == "s3://bkt/runs"
    run = root / "tiny-abc" / "config.yaml"
    assert str(run) == "s3://bkt/runs/tiny-abc/config.yaml" and run.name == "config.yaml" and run.suffix == ".yaml"
    assert run.parent.parent == root and run.with_suffix(".json").name == "config.json"
    assert run.relative_to(root).as_posix() == "tiny-abc/config.yaml"
    with pytest.raises(ValueError):
        run.relative_to(StoragePath("s3://other/runs"))
    assert pickle.loads(pickle.dumps(run)) == run and not run.is_local
    with pytest.raises(TypeError, match="object storage"):  # a bucket path never silently becomes a local file
        os.fspath(run)
    with pytest.raises(ValueError):
        root / "/abs"


def test_a_local_path_stays_a_path(tmp_path):
    sp = StoragePath(tmp_path / "a")
    assert sp.is_local and sp == tmp_path / "a" and os.fspath(sp) == str(tmp_path / "a") and sp.local == tmp_path / "a"
    assert StoragePath(f"file://{tmp_path}/a") == sp and StoragePath(str(tmp_path / "a" / "..")) == tmp_path
    assert RunDir(tmp_path).path == StoragePath(tmp_path) and StoragePath(RunDir(tmp_path)) == tmp_path


def test_output_dir_and_runs_base_accept_uris(monkeypatch):
    monkeypatch.setenv(runs.RUNS_BASE_ENV, "s3://medvqa-bucket")
    cfg = load_config("tiny", ["run.output_dir=runs"])
    assert run_dir_for(cfg).path == StoragePath(f"s3://medvqa-bucket/runs/{run_id(cfg)}")
    direct = load_config("tiny", ["run.output_dir=gs://other/x"])
    assert str(run_dir_for(direct).path) == f"gs://other/x/{run_id(direct)}"
    assert run_id(direct) == run_id(cfg)  # where a run lives is not what it is
    from medvqa.sweep import load_space, space_hash, sweep_dir_for

    space = load_space("tiny")
    assert str(sweep_dir_for(space)) == f"s3://medvqa-bucket/sweeps/tiny-{space_hash(space)}"


# ------------------------------------------------------------------------------------------------ local disk


def test_local_files_are_written_atomically_listed_and_removed(tmp_path):
    root = StoragePath(tmp_path)
    (root / "tune" / "t1" / "params.json").write_text("{}")
    (root / "tune" / "t2" / "params.json").write_text("{}")
    (root / "tune" / "t2" / "result.json").write_bytes(b"")
    assert [p.parent.name for p in (root / "tune").glob("*/params.json")] == ["t1", "t2"]
    assert [p.name for p in (root / "tune").iterdir()] == ["t1", "t2"]
    assert not list(tmp_path.rglob("*.tmp"))
    (root / "tune").rmtree()
    assert not (root / "tune").exists() and local_copy(root) == tmp_path
    with staged(root / "adapters") as folder:
        assert folder == tmp_path / "adapters"  # a local run writes in place


# ------------------------------------------------------------------------------------------------ a bucket


@pytest.fixture(scope="module")
def bucket(s3_server):
    return make_bucket("medvqa-storage-test")


@pytest.fixture()
def empty_cwd(tmp_path, monkeypatch):
    """Run from an empty folder, which must stay empty: nothing of a bucket run lands on local disk."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("MEDVQA_STORAGE_CACHE", str(tmp_path / "cache"))
    yield cwd
    assert list(cwd.iterdir()) == []


def test_a_run_directory_lives_in_a_bucket(bucket, empty_cwd):
    cfg = load_config("tiny", [f"run.output_dir={bucket}/runs", "lora.r=4"])
    rd = prepare_run_dir(cfg)
    assert str(rd.path) == f"{bucket}/runs/{run_id(cfg)}"
    keys = bucket_keys(bucket[5:], f"runs/{rd.name}/")
    assert keys == [f"runs/{rd.name}/config.yaml", f"runs/{rd.name}/environment.json"]
    assert rd.read_config() == cfg and read_json(rd.environment)["run_dir"] == str(rd.path)
    assert prepare_run_dir(load_config("tiny", [f"run.output_dir={bucket}/runs", "lora.r=4",
                                                 "run.log_every_n_steps=3"])) == rd  # reopened to resume
    rd.config.write_text(rd.config.read_text().replace("r: 4", "r: 32"))
    with pytest.raises(ConfigError, match="lora.r"):
        prepare_run_dir(cfg)


def test_metrics_in_a_bucket_are_parts_merged_in_time_order(bucket, empty_cwd, monkeypatch, tmp_path):
    """Object storage has no append: each process writes its own parts (rolled over past a size), and read_metrics
    merges them by time, so a resumed worker's rows supersede its predecessor's exactly as in a local file."""
    rd = RunDir(f"{bucket}/metrics-run")
    monkeypatch.setattr(runs, "_PART_BYTES", 300)  # a few records per part
    first = [{"stage": "stage1", "event": "train_start", "step": 0, "time": 1.0}]
    first += [{"stage": "stage1", "step": s, "loss": 10.0 - s, "time": 1.0 + s} for s in range(1, 6)]
    for r in first:  # the first worker, killed after step 5 (checkpoint at 4)
        append_metrics(rd, r)
    monkeypatch.setattr(runs, "_parts", {})  # a new process: the resumed worker
    second = [{"stage": "stage1", "event": "train_start", "step": 4, "time": 20.0},
              {"stage": "stage1", "step": 5, "loss": 0.5, "time": 21.0},
              {"stage": "stage1", "step": 6, "loss": 0.4, "time": 22.0}]
    for r in second:
        append_metrics(rd, r)
    append_metrics(rd, {"stage": "stage1", "event": "end", "time": 15.0})  # another writer, between them in time
    parts = [k for k in bucket_keys(bucket[5:], "metrics-run/") if k.startswith("metrics-run/metrics/")]
    assert len(parts) >= 3 and all(k.endswith(".jsonl") for k in parts)
    losses = [(r["step"], r["loss"]) for r in read_metrics(rd) if "loss" in r]
    assert losses == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 6.0), (5, 0.5), (6, 0.4)]
    assert [r["time"] for r in read_metrics(rd, superseded=True)] == sorted(r["time"] for r in first + second
                                                                            + [{"time": 15.0}])
    copy = tmp_path / "copy"  # the run directory copied to disk (e.g. `aws s3 sync`) reads the same
    for key in parts:
        (copy / key).parent.mkdir(parents=True, exist_ok=True)
        (copy / key).write_bytes((StoragePath(bucket) / key).read_bytes())
    assert read_metrics(copy / "metrics-run") == read_metrics(rd)


def test_local_copy_downloads_once_and_follows_changes(bucket, empty_cwd):
    adapter = StoragePath(f"{bucket}/copy/adapters/stage1")
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    (adapter / "weights" / "w.bin").write_bytes(b"\x00" * 10)
    first = local_copy(adapter)
    assert first.name == "stage1" and (first / "adapter_config.json").read_text() == '{"r": 8}'
    assert (first / "weights" / "w.bin").read_bytes() == b"\x00" * 10
    assert local_copy(adapter) == first  # cached
    (adapter / "adapter_config.json").write_text('{"r": 16}')
    second = local_copy(adapter)
    assert second != first and (second / "adapter_config.json").read_text() == '{"r": 16}'
    assert local_copy(adapter / "adapter_config.json").read_text() == '{"r": 16}'  # a single file too


def test_staged_folders_and_mirrored_files_reach_the_bucket(bucket, empty_cwd):
    dest = StoragePath(f"{bucket}/staged/adapters/stage1")
    with pytest.raises(RuntimeError):
        with staged(dest) as folder:
            (folder / "adapter_model.safetensors").write_bytes(b"w")
            raise RuntimeError("killed mid-save")
    assert not dest.exists()  # a failed block uploads nothing
    with staged(dest, last=("adapter_config.json",)) as folder:
        (folder / "adapter_config.json").write_text("{}")
        (folder / "adapter_model.safetensors").write_bytes(b"w")
    assert [p.name for p in dest.iterdir()] == ["adapter_config.json", "adapter_model.safetensors"]
    log = StoragePath(f"{bucket}/staged/logs/train.log")
    for session in ("first\n", "second\n"):  # appended per session, as the local log is
        with mirrored_file(log) as local:
            with open(local, "a") as f:
                f.write(session)
    assert log.read_text() == "first\nsecond\n"


def test_report_of_a_run_in_a_bucket(bucket, empty_cwd):
    """The evaluation's cells and metrics (CellWriter, write_json) and the report (plots made locally, uploaded)
    are read and written in the bucket."""
    from test_report import make_run

    from medvqa.report import build_report

    run_dir = make_run(StoragePath(f"{bucket}/report-runs"))
    out = build_report(str(run_dir), audit=False)
    assert out["markdown"] == f"{run_dir}/report/report.md"
    keys = bucket_keys(bucket[5:], f"report-runs/{run_dir.name}/report/")
    assert {k.rsplit("/", 1)[-1] for k in keys} >= {"report.md", "report.html", "metrics.png", "forest.png",
                                                   "training_stage1.png", "training_stage2.png"}
    md = (run_dir / "report" / "report.md").read_text()
    assert f"Run directory: `{run_dir}`" in md and "tiny-run-abc123" in md
    assert json.loads((run_dir / "eval" / "metrics.json").read_text())["settings"]["cells"]
