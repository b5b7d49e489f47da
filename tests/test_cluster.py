"""cluster/: runtime_env excludes (fast) and the local cluster scripts end to end (integration, ~30 s).

The integration test starts its own cluster on free ports with its own short temp dir, talks to it with token auth,
submits a tiny job through cluster/env.sh and cluster/runtime_env.yaml, and stops exactly that cluster (never
`ray stop`, which would kill every Ray process on the machine, other test runs included).
"""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"


def _runtime_env() -> dict:
    return yaml.safe_load(RUNTIME_ENV.read_text())


# --------------------------------------------------------------------------------------------------------- unit


def test_runtime_env_parses_and_excludes_the_heavy_stuff():
    env = _runtime_env()
    assert set(env) <= {"excludes", "env_vars", "pip", "py_modules", "working_dir", "config"}
    excludes = env["excludes"]
    assert all(isinstance(e, str) for e in excludes)
    for needed in (".git", "/.venv", "/runs", "__pycache__", ".pytest_cache", "/bench/out", "*.safetensors"):
        assert needed in excludes, needed
    assert all(isinstance(v, str) for v in env["env_vars"].values())  # Ray rejects non-string env values


def test_submitted_driver_adds_no_runtime_env(monkeypatch):
    # A job's runtime_env and the driver's ray.init(runtime_env=...) defining the same env var make ray.init fail
    # ("Failed to merge the Job's runtime env ... because of a conflict"): under `ray job submit` (RAY_ADDRESS set)
    # the driver passes none and the job's runtime_env carries the settings.
    import ray

    from medvqa.config import load_config
    from medvqa.ray_init import init_ray

    calls = []
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {})
    init_ray(load_config("tiny"))
    assert calls and "runtime_env" not in calls[0]
    env_vars = _runtime_env().get("env_vars", {})
    assert env_vars.get("TOKENIZERS_PARALLELISM") == "false"
    assert "HF_HUB_OFFLINE" not in env_vars


def test_excludes_with_rays_own_packager(tmp_path):
    """Zip a fake checkout exactly as `ray job submit --working-dir` does (only our excludes: no .gitignore, no
    Ray default excludes) and check what would be uploaded."""
    try:
        from ray._private.runtime_env.packaging import _zip_files
    except ImportError as e:  # private API; the integration test below covers the same ground
        pytest.skip(f"Ray's packager moved: {e}")
    tree = {
        "jobs/two_stage.py": "print()", "medvqa/runs.py": "", "medvqa/data/pipeline.py": "",
        "medvqa/presets/tiny.yaml": "", "cluster/runtime_env.yaml": "", "tests/test_x.py": "",
        "fixtures/runs/keep.json": "{}",  # only the top-level runs/ is excluded
        ".git/HEAD": "ref", ".venv/bin/python": "", "runs/tiny-abc/metrics.jsonl": "", "runs/.ray/ray/x": "",
        "bench/out/result.json": "", "medvqa/__pycache__/runs.cpython-311.pyc": "", ".pytest_cache/v": "",
        "model.safetensors": "w", "data/vqa_rad/img.jpg": "", "ckpt/train_state.pt": "", ".env": "TOKEN=x",
        "medvqa.egg-info/PKG-INFO": "",
    }
    for rel, text in tree.items():
        (tmp_path / "src" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / rel).write_text(text)
    out = tmp_path / "pkg.zip"
    _zip_files(str(tmp_path / "src"), _runtime_env()["excludes"], str(out), include_gitignore=False)
    uploaded = {n.rstrip("/") for n in zipfile.ZipFile(out).namelist()}
    assert uploaded == {"jobs/two_stage.py", "medvqa/runs.py", "medvqa/data/pipeline.py", "medvqa/presets/tiny.yaml",
                        "cluster/runtime_env.yaml", "tests/test_x.py", "fixtures/runs/keep.json"}, uploaded


def test_gpu_cluster_template_fits_rays_schema():
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError as e:
        pytest.skip(f"Ray's cluster-launcher validation is not importable: {e}")
    text = (CLUSTER / "gpu_cluster.yaml").read_text()
    assert "TEMPLATE" in text.splitlines()[1]
    cfg = yaml.safe_load(text)
    validate_config(prepare_config(cfg))  # raises on schema errors
    for cmds in (cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]):
        assert any("RAY_AUTH_MODE=token" in c for c in cmds)  # token auth on every node
    assert any("--dashboard-host=127.0.0.1" in c for c in cfg["head_start_ray_commands"])


def test_scripts_are_valid_bash():
    for name in ("start_local.sh", "stop_local.sh", "env.sh"):
        subprocess.run(["bash", "-n", str(CLUSTER / name)], check=True)
    for name in ("start_local.sh", "stop_local.sh"):
        assert os.access(CLUSTER / name, os.X_OK), f"{name} is not executable"


def test_env_sh_sets_what_clients_need(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_TMPDIR"] = str(tmp_path)  # no state file there: the defaults
    out = subprocess.run(["bash", "-c", f"source {CLUSTER / 'env.sh'} && env"], env=env, capture_output=True,
                         text=True, check=True).stdout
    exported = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert exported["RAY_AUTH_MODE"] == "token"
    assert exported["RAY_API_SERVER_ADDRESS"] == "http://127.0.0.1:8265"
    assert exported["MEDVQA_RAY_GCS_ADDRESS"] == "127.0.0.1:6379"
    assert "RAY_ADDRESS" not in exported  # an http RAY_ADDRESS breaks ray status and ray.init


def test_procs_helper_finds_nothing_for_an_unknown_temp_dir(tmp_path):
    sys.path.insert(0, str(CLUSTER))
    try:
        import _procs
    finally:
        sys.path.remove(str(CLUSTER))
    assert _procs.cluster_processes(tmp_path / "ray") == []
    assert not _procs.gcs_alive(tmp_path / "ray")
    assert _procs.stop(tmp_path / "ray") == 0


# -------------------------------------------------------------------------------------------------- integration


def _ray_cli() -> str | None:
    venv_ray = Path(sys.executable).with_name("ray")
    return str(venv_ray) if venv_ray.exists() else shutil.which("ray")


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


PROBE = '''
import os, ray
ray.init()
print("CPUS", ray.cluster_resources().get("CPU"))
print("RUNS_BASE", os.environ.get("MEDVQA_RUNS_BASE"))
print("FILES", sorted(os.path.relpath(os.path.join(d, f)) for d, _, fs in os.walk(".") for f in fs))
'''


@pytest.mark.integration
def test_local_cluster_start_status_job_stop():
    ray = _ray_cli()
    if ray is None:
        pytest.skip("the `ray` CLI is not installed")
    # Short temp dir: Ray's unix socket paths under it must stay below 108 bytes.
    tmp_root = Path(tempfile.mkdtemp(prefix="rmc", dir="/tmp"))
    gcs, dash, client, agent = _free_ports(4)
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    base["PATH"] = f"{Path(ray).parent}{os.pathsep}{base.get('PATH', '')}"
    env = {**base, "RAY_TMPDIR": str(tmp_root), "NUM_CPUS": "2", "GCS_PORT": str(gcs), "DASHBOARD_PORT": str(dash),
           "CLIENT_PORT": str(client), "DASHBOARD_AGENT_PORT": str(agent)}

    def sh(cmd: str, timeout: float = 60, **extra) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", cmd], env={**env, **extra}, cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout, check=False)

    try:
        started = sh("cluster/start_local.sh")
        assert started.returncode == 0, started.stdout + started.stderr
        assert "started" in started.stdout and "export RAY_AUTH_MODE=token" in started.stdout
        assert f"http://127.0.0.1:{dash}" in started.stdout
        again = sh("cluster/start_local.sh")
        assert again.returncode == 0 and "already running" in again.stdout, again.stdout + again.stderr

        # Token auth is on: no RAY_AUTH_MODE -> refused; with env.sh -> the 2 CPUs we asked for.
        refused = sh(f"{ray} status --address 127.0.0.1:{gcs}", timeout=30)
        assert refused.returncode != 0
        assert "InvalidAuthToken" in refused.stderr + refused.stdout or "Authentication" in refused.stderr
        for _ in range(10):  # the autoscaler's view is published a few seconds after start
            status = sh(f'source cluster/env.sh && {ray} status --address "$MEDVQA_RAY_GCS_ADDRESS"', timeout=30)
            assert status.returncode == 0, status.stdout + status.stderr
            if "/2.0 CPU" in status.stdout:
                break
            time.sleep(1)
        assert "/2.0 CPU" in status.stdout, status.stdout

        # A tiny job through env.sh + runtime_env.yaml; excluded files must not reach the cluster.
        job_dir = tmp_root / "job"
        for rel, text in {"probe.py": PROBE, "pkg/keep.py": "", ".git/HEAD": "ref", "runs/r/metrics.jsonl": "",
                          "big.safetensors": "x" * 1000, "__pycache__/a.pyc": ""}.items():
            (job_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            (job_dir / rel).write_text(text)
        job = sh(f"source cluster/env.sh && {ray} job submit --working-dir {job_dir} "
                 f"--runtime-env {RUNTIME_ENV} -- python probe.py", timeout=90)
        out = job.stdout + job.stderr
        assert job.returncode == 0 and "succeeded" in out, out
        assert "CPUS 2.0" in out
        assert f"RUNS_BASE {ROOT}" in out  # start_local.sh points relative run dirs at the checkout
        assert "FILES ['pkg/keep.py', 'probe.py']" in out, out
    finally:
        stopped = sh("cluster/stop_local.sh", timeout=60)
        left = subprocess.run([sys.executable, str(CLUSTER / "_procs.py"), "list", str(tmp_root / "ray")],
                              capture_output=True, text=True, check=False)
        shutil.rmtree(tmp_root, ignore_errors=True)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stdout + stopped.stderr
    assert left.stdout.strip() == "", left.stdout
