"""Ray start-up, shared by training, sweeps and evaluation: join the cluster a job was submitted to, or start a local
Ray on loopback."""

from __future__ import annotations

import logging
import os

from medvqa.config import Config

log = logging.getLogger(__name__)


def init_ray(cfg: Config, temp_dir: str | None = None) -> None:
    """Connect to the cluster when submitted with ``ray job submit`` (RAY_ADDRESS is set), otherwise start a local
    Ray bound to 127.0.0.1 with the dashboard on loopback. Does nothing when Ray is already initialised."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        # Submitted job: the job's runtime env (cluster/runtime_env.yaml) applies; passing env vars here as well
        # fails the job when both define one ("Failed to merge the Job's runtime env").
        ray.init(log_to_driver=True)
    else:
        env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore::FutureWarning"}}
        ray.init(address="local", num_cpus=cfg.resources.num_cpus, _node_ip_address="127.0.0.1",
                 include_dashboard=True, dashboard_host="127.0.0.1", _temp_dir=temp_dir, runtime_env=env)
    log.info("Ray %s: %s", ray.__version__, ray.cluster_resources())
