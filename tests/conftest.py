"""Shared fixtures."""

import tempfile

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
