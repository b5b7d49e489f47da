"""Shared fixtures."""

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The tiny Idefics2 (seed 0), built once per session into a temporary cache through the same cache/rename code
    path that Ray workers use, loadable with ``from_pretrained``."""
    from medvqa.tiny import tiny_model_path

    return tiny_model_path(str(tmp_path_factory.mktemp("model_cache")), seed=0)
