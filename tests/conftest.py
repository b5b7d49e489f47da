"""Shared fixtures."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The tiny Idefics2 (seed 0), built once per session into a temporary cache through the same cache/rename code
    path that Ray workers use, loadable with ``from_pretrained``."""
    from medvqa.tiny import tiny_model_path

    return tiny_model_path(str(tmp_path_factory.mktemp("model_cache")), seed=0)


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray on 2 logical CPUs for one test module. The temp dir is short: Ray's unix sockets live under it
    and socket paths are limited to ~107 characters."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"),
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """An S3 endpoint on loopback (moto's server, as Ray's own storage tests use), with the standard AWS variables
    set for this process and every process it starts (Ray nodes, jobs): yields the endpoint URL."""
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("moto server did not start")
            time.sleep(0.2)
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(timeout=30)


def make_bucket(name: str) -> str:
    """A new, empty bucket on ``s3_server``; returns ``s3://name``."""
    import boto3

    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"


def bucket_keys(name: str, prefix: str = "") -> list[str]:
    """Every object key in a bucket (under ``prefix``), sorted."""
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=name, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def train_tiny_adapter(cfg, processor, steps: int, lr: float = 3e-2):
    """A fresh LoRA trained in-process for ``steps`` full-batch AdamW steps on 8 phantom answers (stage-2 prompt);
    returns (model, losses)."""
    import torch

    from medvqa.data.phantoms import phantom_records
    from medvqa.data.pipeline import collate_fn_for, decode_image, encode_example
    from medvqa.model import load_model

    torch.manual_seed(0)
    model = load_model(cfg)
    encoded = [encode_example(processor, decode_image(r["image"]), cfg.stage2.prompt, r["prompt"], r["target"], 160)
               for r in phantom_records("vqa", 8, seed=1)]
    batch = collate_fn_for(processor)({k: [e[k] for e in encoded] for k in encoded[0]})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, losses


ROOT = Path(__file__).resolve().parents[1]

# The reference two-stage run (tiny model, phantoms): small but learnable, and shaped to exercise resume. Micro-batches
# of 2 accumulated in pairs over odd micro-batch counts, so every epoch ends on a short step: stage 1 has 46 records =
# 23 micro-batches = 12 steps per epoch (x2), stage 2 94 records = 24 steps per epoch (x3); checkpoints every 8 steps
# and at epoch ends.
REFERENCE_ARGS = ["--preset", "tiny", "stage1.data.num_records=46", "stage1.epochs=2", "stage2.data.num_records=94",
                  "stage2.epochs=3", "stage1.batch_size=2", "stage2.batch_size=2", "stage1.global_batch_size=4",
                  "stage2.global_batch_size=4", "run.checkpoint_every_n_steps=8", "run.log_every_n_steps=1",
                  "resources.num_cpus=2"]


def job_env(**extra) -> dict:
    """Environment for a `jobs/two_stage.py` subprocess: its own local Ray (short temp dir), no injected faults."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray", dir="/tmp"),
           **extra}
    for key in ("RAY_ADDRESS", "MEDVQA_FAULT", "MEDVQA_FAULT_PGID"):
        if key not in extra:
            env.pop(key, None)
    return env


def run_job(args: list[str], env: dict, log_path: Path) -> int:
    """`python jobs/two_stage.py ARGS` in its own session (a driver-group SIGKILL stays inside it); its return code
    (-9 when an injected fault killed it)."""
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "two_stage.py"), *args], env=env, cwd=ROOT,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True, timeout=900)
    return proc.returncode


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """(cfg, run_dir) of one uninterrupted `jobs/two_stage.py` run of REFERENCE_ARGS: the run every resumed or
    repeated run is compared with."""
    from medvqa.config import load_config
    from medvqa.runs import run_dir_for

    out = tmp_path_factory.mktemp("reference")
    args = [*REFERENCE_ARGS, f"run.output_dir={out}"]
    code = run_job(args, job_env(), out / "job.log")
    assert code == 0, (out / "job.log").read_text()[-4000:]
    cfg = load_config("tiny", args[2:])
    return cfg, run_dir_for(cfg).path
