"""Ray start-up, shared by training, sweeps and evaluation: join the cluster a job was submitted to, or start a local
Ray on loopback -- safe by default.

Ray 2.60's ``ray.init`` turns token authentication on for a Ray it starts (unless ``RAY_AUTH_MODE`` says otherwise):
every gRPC and HTTP call, the job API and the dashboard included, needs the token. But it writes the token it
generates to ``~/.ray/auth_token`` readable by every user of the machine (0644), and GCS and the Ray Client port
listen on all interfaces, so the file is the only lock. Before starting Ray we therefore create the token file
ourselves, owner-only (0600), or make an existing one owner-only; ``RAY_AUTH_MODE=disabled`` gets a loud warning.
``resources.use_gpu=true`` on a machine without a visible CUDA device is an error before Ray starts
(``medvqa.model.require_cuda``); Train workers and predictor actors check again where they run, which on a cluster is
the only place that knows.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path

from medvqa.config import Config

log = logging.getLogger(__name__)

AUTH_DISABLED_WARNING = (
    "RAY_AUTH_MODE=disabled: this Ray starts WITHOUT token authentication. Its GCS and Ray Client ports listen on "
    "all network interfaces, so anyone who can reach this machine can run code as you and read your data. Unset "
    "RAY_AUTH_MODE to keep Ray's token authentication on (the default).")


def token_path() -> Path | None:
    """The token file Ray's token loader reads: ``$RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``; None when the
    token is in ``$RAY_AUTH_TOKEN`` (the loader's first choice: no file is read)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return None
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()


def secure_token_file() -> Path | None:
    """Make the token file owner-only: a missing one is created with mode 0600 holding a new token (256 random bits
    in hex, as Ray generates them), so Ray finds it and never writes a world-readable one; an existing one that
    others can read is chmod-ed to 0600 (its token is kept). Returns its path (None: the token is in
    ``$RAY_AUTH_TOKEN``)."""
    path = token_path()
    if path is None:
        return None
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others, not even briefly
    except FileExistsError:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            os.chmod(path, 0o600)
            log.warning("Ray's token file %s was readable by other users (mode %03o): made it owner-only (600)",
                        path, mode)
    else:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        log.info("new Ray authentication token in %s (owner-only)", path)
    return path


def init_ray(cfg: Config, temp_dir: str | None = None):
    """Connect to the cluster when submitted with ``ray job submit`` (RAY_ADDRESS is set), otherwise start a local
    Ray bound to 127.0.0.1 with the dashboard on loopback and token authentication on (see the module docstring).
    Does nothing when Ray is already initialised. Returns ``ray.init``'s context (None when Ray was running)."""
    import ray

    if ray.is_initialized():
        return None
    if os.environ.get("RAY_ADDRESS"):
        # Submitted job: the job's runtime env (cluster/runtime_env.yaml) applies; passing env vars here as well
        # fails the job when both define one ("Failed to merge the Job's runtime env"). The cluster's head may have
        # no GPU: the Train workers and predictor actors check CUDA where they land.
        context = ray.init(log_to_driver=True)
    else:
        if cfg.resources.use_gpu:
            from medvqa.model import require_cuda

            require_cuda("this machine (where the local Ray would run every worker)")
        if os.environ.get("RAY_AUTH_MODE", "").strip().lower() == "disabled":
            log.warning(AUTH_DISABLED_WARNING)
        else:
            secure_token_file()
        env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore::FutureWarning"}}
        context = ray.init(address="local", num_cpus=cfg.resources.num_cpus, _node_ip_address="127.0.0.1",
                           include_dashboard=True, dashboard_host="127.0.0.1", _temp_dir=temp_dir, runtime_env=env)
    log.info("Ray %s: %s", ray.__version__, ray.cluster_resources())
    return context
