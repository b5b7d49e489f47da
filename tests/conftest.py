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
