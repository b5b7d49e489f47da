"""The GPU path: the 8B-shaped offline model, device placement, fractional GPUs, the workers' GPU facts, and what must
run without Ray (unmarked, on CPU); 4-bit NF4 training, checkpoint resume and generation on CUDA (``-m gpu``, skipped
without CUDA); one step of each stage of the ``paper`` configuration on the reduced-depth 8B shape on CPU (``-m slow``).

The GPU machine this project may borrow has no ray, optuna, datasets or nltk: the ``gpu`` tests import ray only in the
one test about Ray Train (skipped there), and a test here checks that the benchmark's and these tests' code paths
import none of them.
"""

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from medvqa.config import ConfigError, load_config
from medvqa.data.phantoms import phantom_records
from medvqa.data.pipeline import collate_fn_for, decode_image, encode_example
from medvqa.model import cuda_index, gpu_memory

ROOT = Path(__file__).resolve().parents[1]


def _cuda_ready() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import bitsandbytes  # noqa: F401 - 4-bit on CUDA needs it
    except ImportError:
        return False
    return True


gpu = pytest.mark.skipif(not _cuda_ready(), reason="needs CUDA and bitsandbytes")


# ------------------------------------------------------------------------------------------------- 8B shape (CPU)


@pytest.fixture(scope="module")
def processor_8b():
    from medvqa.shapes import build_processor

    return build_processor(seed=0)


def test_8b_shape_tokenizer_and_processor_are_laid_out_like_idefics2_8b(processor_8b):
    from PIL import Image

    from medvqa.tiny import CHAT_TEMPLATE

    tok = processor_8b.tokenizer
    assert len(tok) == 32003
    assert [tok.convert_tokens_to_ids(t) for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    assert [tok.convert_tokens_to_ids(t) for t in ("<fake_token_around_image>", "<image>", "<end_of_utterance>")] \
        == [32000, 32001, 32002]
    assert tok.pad_token_id == 0 and tok.image_token_id == 32001
    ids = tok("Is there a lesion in the left lung?")["input_ids"]
    assert ids[0] == 1 and max(ids) < 32000  # bos first, like Mistral; plain text never hits a filler or special
    assert tok.decode(tok("a mass in the liver", add_special_tokens=False)["input_ids"]) == "a mass in the liver"
    ip = processor_8b.image_processor
    assert processor_8b.image_seq_len == 64 and ip.do_image_splitting is False
    assert (ip.size.longest_edge, ip.size.shortest_edge) == (980, 378)
    assert processor_8b.chat_template == CHAT_TEMPLATE
    big = Image.fromarray(np.zeros((1200, 1500, 3), np.uint8))
    enc = encode_example(processor_8b, big, "Answer briefly.", "Is this normal?", "yes", 1024)
    assert enc["pixel_values"].shape == (1, 3, 784, 980)  # longest edge 980, aspect kept
    assert (enc["input_ids"] == 32001).sum() == 64
    small = encode_example(processor_8b, big.resize((100, 60)), "Answer briefly.", "Is this normal?", None, 1024)
    assert small["pixel_values"].shape == (1, 3, 378, 378)  # shortest edge 378


def test_8b_shape_config_and_the_full_shapes_parameter_count(processor_8b):
    from medvqa.shapes import idefics2_8b_config, parameter_count

    tok = processor_8b.tokenizer
    full = idefics2_8b_config(tok)
    t, v, p = full.text_config, full.vision_config, full.perceiver_config
    assert (t.vocab_size, t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads,
            t.num_key_value_heads) == (32003, 4096, 14336, 32, 32, 8)
    assert (v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads, v.patch_size,
            v.image_size) == (1152, 4304, 27, 16, 14, 980)
    assert (p.resampler_n_latents, p.resampler_depth, p.resampler_n_heads, p.resampler_head_dim,
            p.num_key_value_heads, p.hidden_size) == (64, 3, 16, 96, 4, 4096)
    assert full.image_token_id == 32001 and t.pad_token_id == 0
    assert parameter_count(full) == 8_402_768_112  # on the meta device; HF lists idefics2-8b as 8.4B
    small = idefics2_8b_config(tok, text_layers=1, vision_layers=1, perceiver_depth=1)
    assert (small.text_config.num_hidden_layers, small.vision_config.num_hidden_layers,
            small.perceiver_config.resampler_depth) == (1, 1, 1)
    assert small.text_config.hidden_size == 4096 and small.vision_config.image_size == 980
    assert parameter_count(small) == 810_933_968
    with pytest.raises(ValueError, match="layer counts"):
        idefics2_8b_config(tok, text_layers=0)


def test_model_build_command_writes_a_loadable_model(tmp_path):
    from transformers import AutoProcessor, Idefics2ForConditionalGeneration
    from typer.testing import CliRunner

    from medvqa.cli import app

    result = CliRunner().invoke(app, ["model", "build", "--shape", "tiny", "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output.strip().splitlines()[-1])
    assert info["parameters"] == info["full_shape_parameters"] > 0
    model = Idefics2ForConditionalGeneration.from_pretrained(tmp_path / "m")
    assert sum(p.numel() for p in model.parameters()) == info["parameters"]
    assert AutoProcessor.from_pretrained(tmp_path / "m").image_seq_len == 8
    bad = CliRunner().invoke(app, ["model", "build", "--shape", "tiny", "--text-layers", "2", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "fixed layer counts" in bad.output


# ------------------------------------------------------------------------------------------------- devices (CPU)


def test_cuda_index_follows_ray_then_local_rank_then_the_current_device():
    assert cuda_index({}, device_count=2, current=1) == 1
    assert cuda_index({"LOCAL_RANK": "1"}, device_count=2, current=0) == 1
    # Ray Train's assignment wins over LOCAL_RANK (its GPU's position in CUDA_VISIBLE_DEVICES)
    assert cuda_index({"ACCELERATE_TORCH_DEVICE": "cuda:0", "LOCAL_RANK": "1"}, device_count=2, current=1) == 0
    assert cuda_index({"ACCELERATE_TORCH_DEVICE": "cpu", "LOCAL_RANK": "1"}, device_count=2, current=0) == 1
    with pytest.raises(RuntimeError, match="LOCAL_RANK selects GPU 2, but this process sees 2 GPU"):
        cuda_index({"LOCAL_RANK": "2", "CUDA_VISIBLE_DEVICES": "4,5"}, device_count=2, current=0)
    assert gpu_memory("cpu") == {}


def test_fractional_gpus_pack_trials_and_do_not_change_the_run():
    from medvqa.runs import run_id
    from medvqa.sweep import load_space, max_concurrent_trials
    from medvqa.train import worker_resources

    whole = load_config("paper")
    quarter = load_config("paper", ["resources.gpus_per_worker=0.25"])
    assert worker_resources(quarter.resources) == {"CPU": 4.0, "GPU": 0.25}
    assert worker_resources(load_config("tiny").resources) == {"CPU": 0.5}  # no GPU key on a CPU run
    assert worker_resources(load_config("tiny", ["resources.worker_resource=w"]).resources) == {"CPU": 0.5, "w": 0.001}
    assert run_id(whole) == run_id(quarter)  # scheduling, not the experiment
    space = load_space("paper", {"max_concurrent": None})
    packed = load_space("paper", {"max_concurrent": None,
                                  "overrides": space.overrides + ["resources.gpus_per_worker=0.25"]})
    # tune/paper.yaml: a trial trains 2 replicate runs at once, one worker each
    assert max_concurrent_trials(space, {"GPU": 2.0}) == 1
    assert max_concurrent_trials(packed, {"GPU": 1.0}) == 2
    assert max_concurrent_trials(packed, {"GPU": 2.0}) == 4
    for bad in ("0", "1.5", "-1"):
        with pytest.raises(ConfigError, match="gpus_per_worker"):
            load_config("paper", [f"resources.gpus_per_worker={bad}"])
    with pytest.raises(ConfigError, match="flash_attention_2 needs resources.use_gpu"):
        load_config("tiny", ["model.attn_implementation=flash_attention_2"])
    assert load_config("paper", ["model.attn_implementation=eager"]).model.attn_implementation == "eager"


def test_workers_gpu_facts_go_into_environment_json_and_survive_a_resume(tmp_path):
    from medvqa.runs import prepare_run_dir, read_json, record_workers, worker_facts

    cfg = load_config("tiny", [f"run.output_dir={tmp_path}"])
    rd = prepare_run_dir(cfg)
    facts = worker_facts(torch.device("cpu"), rank=0)
    assert facts["torch"] == torch.__version__ and facts["device"] == "cpu" and "gpu" not in facts
    record_workers(rd, "stage1", [facts, {**facts, "rank": 1}])
    env = read_json(rd.environment)
    assert [w["rank"] for w in env["workers"]["stage1"]] == [0, 1] and env["packages"]
    prepare_run_dir(cfg)  # a resumed run rewrites environment.json: earlier stages' workers stay
    env = read_json(rd.environment)
    assert env["workers"]["stage1"][0] == facts and "previous" not in env


# ------------------------------------------------------------------------------------------------- no Ray needed


BLOCKER = """
import importlib.machinery, sys
BLOCKED = {"ray", "optuna", "datasets", "nltk"}
class _Hidden(importlib.machinery.PathFinder):  # as if not installed: find_spec says so, import raises
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.partition(".")[0] in BLOCKED else super().find_spec(name, path, target)
sys.meta_path = [_Hidden if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
"""


def test_gpu_benchmark_and_gpu_tests_need_no_ray_optuna_datasets_or_nltk(tmp_path):
    """The device machine lacks these packages: import the benchmark and this test module, then run the benchmark's
    environment check, model build, one training variant and the inference part on the tiny model, with the four
    packages hidden. A lazily imported ``ray`` on these paths fails here."""
    script = BLOCKER + textwrap.dedent(f"""
        import argparse, importlib.util, json, pathlib, sys
        sys.path.insert(0, {str(ROOT)!r})
        for name, path in (("bench_gpu", "bench/gpu.py"), ("test_gpu_module", "tests/test_gpu.py")):
            spec = importlib.util.spec_from_file_location(name, pathlib.Path({str(ROOT)!r}) / path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            sys.modules[name] = module
        g = sys.modules["bench_gpu"]
        from medvqa.shapes import build_tokenizer, idefics2_8b_config, parameter_count
        assert parameter_count(idefics2_8b_config(build_tokenizer(), 1, 1, 1)) > 0
        s = g.settings(argparse.Namespace(smoke=True, shape="tiny", text_layers=None, vision_layers=None,
                                          perceiver_depth=None, image_px=None))
        env = g.check_environment(need_cuda=False)
        assert env["problem"] is None, env["problem"]
        model_dir = pathlib.Path({str(tmp_path)!r}) / "tiny"
        g.ensure_model(model_dir, "tiny", {{}}, "cpu")
        cfg = g.bench_config(model_dir, False, 1)
        train = g.Stage1(cfg, s)
        train.variant(*s["variants"][-1], 0.0)
        infer = g.part_infer(cfg, s, g.Budget(600))
        loaded = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
        print(json.dumps({{"train": train.result["variants"][0], "infer": infer["batched_cache"], "loaded": loaded}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["loaded"] == []
    assert result["train"]["samples_per_s"] > 0
    assert result["infer"]["questions"] == 2 and result["infer"]["images_encoded"] == 1  # 2 questions on 1 image


# ------------------------------------------------------------------------------------------------- CUDA


def _gpu_cfg(model_dir, *overrides):
    # dropout 0: deterministic steps, so resumed and uninterrupted runs can be compared exactly
    return load_config("tiny", [f"model.name_or_path={model_dir}", "resources.use_gpu=true", "lora.dropout=0.0",
                                *overrides])


def _batches(processor, n_batches: int = 2, batch_size: int = 4) -> list[dict]:
    recs = phantom_records("vqa", n_batches * batch_size, seed=1)
    enc = [encode_example(processor, decode_image(r["image"]), "Answer briefly.", r["prompt"], r["target"], 160)
           for r in recs]
    collate = collate_fn_for(processor)
    return [collate({k: [e[k] for e in enc[i:i + batch_size]] for k in enc[0]})
            for i in range(0, len(enc), batch_size)]


def _step(model, optimizer, batch, device) -> float:
    """One optimizer step of medvqa.train's worker loop (medvqa.trainstep: bf16 autocast on CUDA, clip 1.0)."""
    from medvqa import trainstep

    optimizer, scheduler = optimizer
    return trainstep.optimizer_step(model, iter([batch]), 1, optimizer, scheduler, 1.0, device, torch.bfloat16)["loss"]


def _fresh(cfg):
    """A freshly loaded model and its (AdamW, constant schedule) at lr 3e-3."""
    from medvqa import trainstep
    from medvqa.model import load_model

    torch.manual_seed(0)
    model = load_model(cfg, use_gpu=True)
    optimizer = trainstep.build_optimizer(model, dataclasses.replace(cfg.stage1, lr=3e-3, weight_decay=0.01))
    return model, (optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0))


@pytest.fixture(scope="module")
def gpu_processor(tiny_model_dir):
    from medvqa.model import load_processor

    return load_processor(_gpu_cfg(tiny_model_dir).model)


@pytest.mark.gpu
@gpu
def test_4bit_nf4_layers_on_cuda_compute_in_bf16(tiny_model_dir, gpu_processor):
    import bitsandbytes as bnb

    from medvqa.model import describe_trainable

    model, _ = _fresh(_gpu_cfg(tiny_model_dir))
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers
    for m in layers:
        assert m.weight.device.type == "cuda" and m.weight.quant_type == "nf4"
        assert m.compute_dtype == torch.bfloat16 and m.weight.quant_state.nested  # double quant
    assert "4-bit NF4 (double quant), compute bfloat16" in describe_trainable(model)
    batch = {k: v.cuda() for k, v in _batches(gpu_processor, 1)[0].items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(**batch)
    assert torch.isfinite(out.loss) and out.logits.device.type == "cuda"


@pytest.mark.gpu
@gpu
def test_a_gpu_step_changes_only_lora_weights(tiny_model_dir, gpu_processor):
    model, optimizer = _fresh(_gpu_cfg(tiny_model_dir))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _step(model, optimizer, _batches(gpu_processor, 1)[0], torch.device("cuda"))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    lora = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed and changed <= lora and all("lora_" in n for n in lora)
    assert any("lora_B" in n for n in changed)


@pytest.mark.gpu
@gpu
def test_checkpoint_save_and_resume_on_gpu_continues_exactly(tiny_model_dir, gpu_processor, tmp_path):
    """The worker loop's checkpoint (medvqa.trainstep: adapter, optimizer, scheduler, RNG incl. CUDA) taken after step
    1 and resumed into a fresh model gives the LoRA weights of an uninterrupted run after step 3."""
    from medvqa import trainstep

    cfg, device = _gpu_cfg(tiny_model_dir), torch.device("cuda")
    batches = _batches(gpu_processor, 3)
    model, optimizer = _fresh(cfg)
    for b in batches:
        _step(model, optimizer, b, device)
    straight = {n: p.detach().float().cpu() for n, p in model.named_parameters() if p.requires_grad}

    model, optimizer = _fresh(cfg)
    _step(model, optimizer, batches[0], device)
    trainstep.save_checkpoint(tmp_path, model, *optimizer, {"step": 1}, rank=0)
    del model, optimizer
    model, optimizer = _fresh(cfg)
    assert trainstep.load_checkpoint(tmp_path, model, *optimizer, rank=0)["step"] == 1
    assert next(iter(optimizer[0].state.values()))["exp_avg"].device.type == "cuda"  # state follows the params
    for b in batches[1:]:
        _step(model, optimizer, b, device)
    resumed = {n: p.detach().float().cpu() for n, p in model.named_parameters() if p.requires_grad}
    assert resumed.keys() == straight.keys()
    for n in straight:
        torch.testing.assert_close(resumed[n], straight[n], rtol=1e-4, atol=1e-5, msg=n)  # lr 3e-3: a lost
        # optimizer state or a skipped step moves weights by ~1e-3


@pytest.mark.gpu
@gpu
def test_model_goes_to_the_gpu_of_its_local_rank(tiny_model_dir, monkeypatch):
    from medvqa.model import load_base_model

    mcfg = _gpu_cfg(tiny_model_dir).model
    monkeypatch.delenv("ACCELERATE_TORCH_DEVICE", raising=False)
    last = torch.cuda.device_count() - 1
    monkeypatch.setenv("LOCAL_RANK", str(last))
    model = load_base_model(mcfg, use_gpu=True, training=False)
    assert {p.device for p in model.parameters()} == {torch.device("cuda", last)}
    monkeypatch.setenv("LOCAL_RANK", str(last + 1))
    with pytest.raises(RuntimeError, match=f"LOCAL_RANK selects GPU {last + 1}"):
        load_base_model(mcfg, use_gpu=True, training=False)


@pytest.fixture(scope="module")
def gpu_inference_model(tiny_model_dir):
    from medvqa.model import load_inference_model

    # float32 compute without TF32: the comparisons below are about padding and caching, not bf16 rounding
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield load_inference_model(_gpu_cfg(tiny_model_dir, "model.compute_dtype=float32"), use_gpu=True)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def _questions(n_images: int = 3, per_image: int = 2) -> list[dict]:
    recs = phantom_records("vqa", n_images * per_image, seed=4, split="test")
    return [{"image": recs[i // per_image * per_image]["image"], "prompt": r["prompt"]} for i, r in enumerate(recs)]


@pytest.mark.gpu
@gpu
def test_batched_generation_equals_batch1_on_gpu(gpu_inference_model, gpu_processor):
    from medvqa.infer import generate_answers

    rows = _questions()
    assert next(gpu_inference_model.parameters()).device.type == "cuda"
    batched = generate_answers(gpu_inference_model, gpu_processor, rows, "Answer briefly.", max_new_tokens=8)
    alone = [generate_answers(gpu_inference_model, gpu_processor, [r], "Answer briefly.", max_new_tokens=8)[0]
             for r in rows]
    assert [a["raw"] for a in batched] == [a["raw"] for a in alone]


@pytest.mark.gpu
@gpu
def test_cached_image_features_equal_uncached_on_gpu(gpu_inference_model, gpu_processor):
    from medvqa.infer import FeatureCache, generate_answers

    rows, cache = _questions(), FeatureCache()
    plain = generate_answers(gpu_inference_model, gpu_processor, rows, "Answer briefly.", max_new_tokens=8)
    cached = generate_answers(gpu_inference_model, gpu_processor, rows, "Answer briefly.", max_new_tokens=8,
                              feature_cache=cache)
    assert [a["raw"] for a in cached] == [a["raw"] for a in plain]
    assert cache.misses == 3 and all(f.device.type == "cuda" for f in cache._items.values())


@pytest.mark.gpu
@gpu
def test_one_worker_torchtrainer_stage_on_a_fraction_of_the_gpu(tiny_model_dir, tmp_path):
    """A real Ray Train stage where ray is installed (the borrowed GPU machine has none: skipped there)."""
    pytest.importorskip("ray")
    import tempfile

    import ray

    from medvqa.runs import read_json, read_metrics
    from medvqa.train import run_two_stage

    cfg = _gpu_cfg(tiny_model_dir, f"run.output_dir={tmp_path}", "stage1.enabled=false",
                   "stage2.data.num_records=16", "stage2.epochs=1", "resources.gpus_per_worker=0.5",
                   "run.log_every_n_steps=1")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    try:
        run_dir = run_two_stage(cfg)
    finally:
        ray.shutdown()
    assert (run_dir / "adapters" / "stage2" / "adapter_config.json").exists()
    steps = [m for m in read_metrics(run_dir) if m.get("stage") == "stage2" and "loss" in m]
    assert steps and all(m["gpu_peak_reserved_gib"] > 0 for m in steps)
    (worker,) = read_json(Path(run_dir) / "environment.json")["workers"]["stage2"]
    assert worker["device"].startswith("cuda") and worker["gpu"] and worker["cuda"] == torch.version.cuda


# ------------------------------------------------------------------------------------------------- slow: real shape


@pytest.mark.slow
def test_paper_configuration_on_the_8b_shape_one_step_per_stage_on_cpu(tmp_path):
    """``medvqa model build`` (1 text, 1 vision, 1 perceiver layer; widths, vocabulary and 980 px of the real shape),
    then the normal entry point (``run_two_stage``: Ray Data + one TorchTrainer per stage) on the ``paper``
    configuration -- 4-bit NF4, LoRA r=8 on the study's targets, batch 2, gradient checkpointing, hand-off
    'continue' -- for one optimizer step of each stage on 980-px phantoms (captions, then VQA) written as HF parquet.
    Accumulation is 2 micro-batches rather than 8: the same code path at a quarter of the CPU time."""
    import io
    import tempfile

    import pyarrow as pa
    import ray
    import pyarrow.parquet as pq
    from PIL import Image
    from typer.testing import CliRunner

    from medvqa.cli import app
    from medvqa.runs import read_json, read_metrics
    from medvqa.train import run_two_stage

    model_dir = tmp_path / "idefics2-8b-l1"
    built = CliRunner().invoke(app, ["model", "build", "--shape", "idefics2-8b", "--text-layers", "1",
                                     "--vision-layers", "1", "--perceiver-depth", "1", "--out", str(model_dir)])
    assert built.exit_code == 0, built.output
    assert "8,402,768,112" in built.output

    def parquet(task: str, path: Path, n: int = 4):
        rows = []
        for r in phantom_records(task, n, seed=0):
            img = Image.open(io.BytesIO(r["image"])).convert("RGB").resize((980, 980), Image.BILINEAR)
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            image = {"bytes": buf.getvalue(), "path": f"{r['id']}.png"}
            rows.append({"image": image, "caption": r["target"]} if task == "caption" else
                        {"image": image, "question": r["prompt"], "answer": r["target"]})
        pq.write_table(pa.Table.from_pylist(rows), path)
        return str(path)

    cfg = load_config("paper", [
        f"model.name_or_path={model_dir}", "resources.use_gpu=false", f"run.output_dir={tmp_path / 'runs'}",
        "stage1.data.kind=roco_hf", f"stage1.data.path={parquet('caption', tmp_path / 'roco.parquet')}",
        "stage2.data.kind=vqa_rad_hf", f"stage2.data.path={parquet('vqa', tmp_path / 'vqa_rad.parquet')}",
        "stage1.global_batch_size=4", "stage2.global_batch_size=4",
        "stage1.max_steps=1", "stage2.max_steps=1", "run.log_every_n_steps=1",
        "resources.cpus_per_worker=0.5", "resources.data_cpus_per_task=0.25", "resources.data_concurrency=2",
        "resources.num_cpus=2"])
    assert (cfg.model.quantization, cfg.lora.r, cfg.stage1.batch_size, cfg.model.gradient_checkpointing) == \
        ("4bit", 8, 2, True)
    try:
        run_dir = run_two_stage(cfg, ray_temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short socket paths
    finally:
        ray.shutdown()
    steps = {m["stage"]: m for m in read_metrics(run_dir) if "loss" in m}
    assert set(steps) == {"stage1", "stage2"} and all(np.isfinite(m["loss"]) for m in steps.values())
    for stage in ("stage1", "stage2"):
        assert (run_dir / "adapters" / stage / "adapter_model.safetensors").exists()
    assert set(read_json(run_dir / "environment.json")["workers"]) == {"stage1", "stage2"}
