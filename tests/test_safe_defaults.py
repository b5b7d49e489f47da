"""Safe by default: the Ray we start keeps token authentication on with an owner-only token file, turning it off is
loud, its job API refuses unauthenticated requests, and a GPU request without a visible CUDA device is an error
everywhere it could have fallen back to the CPU (the driver before Ray starts, a Train worker, a predictor actor).

Unit tests (no Ray started: ``ray.init`` is replaced) take well under a second each; the integration test starts a
real Ray in a subprocess with its own HOME (~15 s on 2 cores)."""

import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from medvqa.config import load_config, to_dict
from medvqa.ray_init import AUTH_DISABLED_WARNING, init_ray

ROOT = Path(__file__).resolve().parents[1]
AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")


@pytest.fixture()
def fake_ray(tmp_path, monkeypatch):
    """HOME in tmp_path, no Ray auth settings in the environment, and ``ray.init`` recorded instead of run."""
    import ray

    monkeypatch.setenv("HOME", str(tmp_path))
    for key in AUTH_ENV:
        monkeypatch.delenv(key, raising=False)
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {})
    return calls


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ------------------------------------------------------------------------------------------------- token auth


def test_a_new_token_file_is_owner_only(fake_ray, tmp_path):
    init_ray(load_config("tiny"))
    token = tmp_path / ".ray" / "auth_token"
    assert fake_ray and fake_ray[0]["address"] == "local"
    assert _mode(token) == 0o600 and _mode(token.parent) == 0o700
    assert len(token.read_text()) == 64 and int(token.read_text(), 16) >= 0  # 256 bits in hex, as Ray makes them


def test_a_world_readable_token_file_is_made_owner_only(fake_ray, tmp_path, monkeypatch, caplog):
    token = tmp_path / "elsewhere" / "token"  # RAY_AUTH_TOKEN_PATH is honoured, as Ray's loader does
    token.parent.mkdir()
    token.write_text("the-token")
    token.chmod(0o644)  # what Ray 2.60 itself writes
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    with caplog.at_level(logging.WARNING, logger="medvqa.ray_init"):
        init_ray(load_config("tiny"))
    assert _mode(token) == 0o600 and token.read_text() == "the-token"
    assert "readable by other users (mode 644)" in caplog.text
    assert not (tmp_path / ".ray").exists()


def test_a_token_in_the_environment_needs_no_file(fake_ray, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "x" * 64)
    init_ray(load_config("tiny"))
    assert fake_ray and not (tmp_path / ".ray").exists()


def test_turning_auth_off_is_loud(fake_ray, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with caplog.at_level(logging.WARNING, logger="medvqa.ray_init"):
        init_ray(load_config("tiny"))
    assert fake_ray  # the user's choice is respected ...
    assert AUTH_DISABLED_WARNING in caplog.text and "all network interfaces" in caplog.text  # ... but not silently
    assert not (tmp_path / ".ray").exists()


_PROBE = """
import json, sys
from medvqa.config import load_config
from medvqa.ray_init import init_ray, token_path
ctx = init_ray(load_config("tiny", ["resources.num_cpus=1"]), sys.argv[1])
print(json.dumps({"dashboard": ctx.dashboard_url, "token": str(token_path())}), flush=True)
sys.stdin.read()  # keep Ray up until the test closes stdin
"""


def _get(url: str, token: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.integration
def test_the_job_api_of_our_ray_refuses_unauthenticated_requests(tmp_path):
    """``python jobs/two_stage.py``, ``medvqa eval`` and the sweep start Ray through ``init_ray``: on a fresh HOME it
    writes an owner-only token and the job API answers 401 without it, 403 with a wrong one, 200 with it."""
    env = {k: v for k, v in os.environ.items() if k not in AUTH_ENV}
    env.update(HOME=str(tmp_path), PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    temp_dir = tempfile.mkdtemp(prefix="rauth", dir="/tmp")  # short: Ray's socket paths live under it
    proc = subprocess.Popen([sys.executable, "-c", _PROBE, temp_dir], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert line, "the probe exited before starting Ray"
        info = json.loads(line)
        token_file = Path(info["token"])
        assert token_file == tmp_path / ".ray" / "auth_token" and _mode(token_file) == 0o600
        url = f"http://{info['dashboard'].removeprefix('http://')}/api/jobs/"
        for _ in range(60):  # the job API comes up a few seconds after ray.init returns
            if _get(url, token_file.read_text().strip()) == 200:
                break
            time.sleep(1)
        assert _get(url, token_file.read_text().strip()) == 200
        assert _get(url) == 401
        assert _get(url, "0" * 64) == 403
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


# ------------------------------------------------------------------------------------------- GPUs without CUDA


@pytest.fixture()
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_a_gpu_run_without_cuda_fails_before_ray_starts(fake_ray, no_cuda):
    with pytest.raises(RuntimeError, match=r"resources.use_gpu=true but this machine .* sees no CUDA device"):
        init_ray(load_config("tiny", ["resources.use_gpu=true"]))
    assert fake_ray == []


def test_a_submitted_gpu_run_leaves_the_check_to_the_gpu_nodes(fake_ray, no_cuda, monkeypatch):
    """On a cluster the driver runs on the head, which may have no GPU while the worker nodes do."""
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    init_ray(load_config("tiny", ["resources.use_gpu=true"]))
    assert len(fake_ray) == 1


def test_a_train_worker_without_cuda_refuses_a_gpu_run(no_cuda, tmp_path):
    from medvqa.train import train_fn_per_worker

    cfg = load_config("tiny", ["resources.use_gpu=true"])
    with pytest.raises(RuntimeError, match="this Train worker sees no CUDA device"):
        train_fn_per_worker({"cfg": to_dict(cfg), "stage": "stage1", "run_dir": str(tmp_path)})


def test_a_predictor_actor_without_cuda_refuses_a_gpu_run(no_cuda, monkeypatch):
    from medvqa import model
    from medvqa.infer import Predictor

    monkeypatch.setattr(model, "load_inference_model", lambda *a, **k: pytest.fail("loaded a model on the CPU"))
    with pytest.raises(RuntimeError, match="this predictor actor sees no CUDA device"):
        Predictor(load_config("tiny", ["resources.use_gpu=true"]))


def test_a_gpu_model_is_never_put_on_the_cpu(no_cuda):
    from medvqa.model import worker_device

    assert worker_device(False) == torch.device("cpu")
    with pytest.raises(RuntimeError, match="resources.use_gpu=false"):
        worker_device(True)
