"""The GPU path, measured: stage-1 training of the ``paper`` configuration, batched inference and trials packed on one
GPU, on an offline Idefics2-8B-shaped model (``medvqa.shapes``, random weights). No Ray: the library's model, data and
inference code run in-process, and packed trials are concurrent processes sharing the GPU, as Ray places trials with
fractional GPUs (``resources.gpus_per_worker``).

    python bench/gpu.py                      # a GPU: the full 8B shape, 980-px images, within --budget-s (400 s)
    python bench/gpu.py --smoke              # reduced depth (1 text/vision/perceiver layer), 378-px images, any device
    python bench/gpu.py --smoke --shape tiny # the tiny model: the same code in under a minute

Sized for ~7 minutes on an H200 (budget 400 s plus start-up) but not yet run on any GPU: the first run's timings per
part are the plan's check. On this project's 2-core CPU machine ``--smoke`` took 5.5 minutes (model built before).

Prints figures as it goes and ends with one JSON line (also written to ``--out``): ``device``,
``stage1_samples_per_s``, ``stage1_tokens_per_s``, ``peak_memory_gib`` (the paper variant's peak reserved),
``infer_questions_per_s`` (batched, feature cache on), ``packed_samples_per_s`` per number of trials, and every variant.

Parts, in the order they run (the issue's two targets first); each is capped in time and the whole run by
``--budget-s``: a part keeps a reserve for those after it, and one that would not fit is skipped and says so:
1. environment: CUDA visible, bitsandbytes' CUDA 4-bit kernels, transformers with ``mm_encoder_outputs`` (the feature
   cache), versions; what is wrong in one line, exit 2;
2. model: ``medvqa.shapes.build`` into ``--model-dir`` (reused when already built with the same layers), weights
   initialised on the GPU;
3. stage 1, the paper variant (4-bit NF4, bf16 compute, LoRA r=8 on the study's targets, batch 2 x accumulation 8,
   sdpa attention, gradient checkpointing; captions on synthetic phantom images upscaled to 980 px): samples/s,
   tokens/s, peak allocated/reserved memory, ratio to the study's 6.5 samples/s on one A100;
4. packed trials: 1, 2 and 4 processes each training its own 4-bit model on the one GPU for the same window:
   aggregate samples/s and the speed-up over one;
5. inference (the base model as the evaluation matrix loads it): several questions per image, ``generate_answers``
   at batch 1 without cache (the study's way) vs batched without and with the image-feature cache;
6. the other stage-1 variants on the model of part 3, while time lasts: without checkpointing, eager attention with
   and without, flash_attention_2 when flash-attn is installed.

On the device machine (no ray/bitsandbytes and no package index there; transformers 5.17 there predates
``mm_encoder_outputs``), carry wheels. Once, here, in the repository root (``.whl/`` is git-ignored):

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
        -d .whl bitsandbytes==0.50.2 transformers==5.24.0 peft==0.21.2

then run with ``carry: [".whl"]``:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
        .whl/*.whl && export PYTHONPATH=/tmp/site || exit; set -o pipefail; nvidia-smi -L; PYTHONUNBUFFERED=1 \\
        timeout 480 python3 bench/gpu.py --budget-s 400 --out $OUT/gpu.json 2>&1 | tee $OUT/gpu.log
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import io
import itertools
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the device machine runs from a checkout, without `pip install -e`

STUDY_SAMPLES_PER_S = 6.5  # the study's stage 1 on one A100 at the paper configuration
TARGETS = {"stage1_samples_per_s": 26.0, "peak_memory_gib": 24.0, "packed4_speedup": 2.5}  # issue 11, on an H200
VARIANTS = [("sdpa", True), ("sdpa", False), ("eager", True), ("eager", False), ("flash_attention_2", True)]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Budget:
    """The run's deadline; ``cap(want, reserve)``: seconds a part may take, keeping ``reserve`` for later parts."""

    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()

    def cap(self, want: float, reserve: float = 0.0) -> float:
        return max(0.0, min(want, self.left() - reserve))


def settings(args) -> dict:
    """Sizes of this run: the full shape on a GPU; reduced depth, smaller images and shorter windows for --smoke."""
    smoke = args.smoke
    layers = {"text_layers": 1, "vision_layers": 1, "perceiver_depth": 1} if smoke and args.shape != "tiny" else {}
    layers.update({k: getattr(args, k) for k in ("text_layers", "vision_layers", "perceiver_depth")
                   if getattr(args, k) is not None})
    image_px = args.image_px or (64 if args.shape == "tiny" else 378 if smoke else 980)
    return {"smoke": smoke, "shape": args.shape, "layers": layers, "image_px": image_px,
            "grad_accum": 1 if smoke else None,  # None: the paper's 8
            # --smoke: the paper variant and the one that differs from it in both switches
            "variants": [VARIANTS[0], VARIANTS[3]] if smoke else VARIANTS,
            "train_window_s": 0.0 if smoke else 20.0,  # the paper variant; others get half (0: one timed step)
            "train_max_steps": 1 if smoke else 50,
            "warmup_steps": 0 if smoke else 1,  # a GPU's first step pays for kernel selection; a CPU's does not
            "images": 1 if smoke else 6, "questions_per_image": 2 if smoke else 4,
            "max_new_tokens": 2 if smoke else 16, "infer_cap_s": 120.0 if smoke else 45.0,
            "packed": [1, 2] if smoke else [1, 2, 4], "packed_window_s": 0.0 if smoke else 15.0,
            "packed_load_cap_s": 300.0 if smoke else 150.0}


# ------------------------------------------------------------------------------------------------- environment


def check_environment(need_cuda: bool) -> dict:
    """Versions and the first problem found (None when all is well)."""
    import torch

    env: dict = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                 "cuda_available": torch.cuda.is_available(), "cpus": os.cpu_count()}
    problems = []
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, device_memory_gib=round(props.total_memory / 2**30, 1),
                   capability=f"{props.major}.{props.minor}", bf16=torch.cuda.is_bf16_supported())
    else:
        env["device"] = "cpu"
        if need_cuda:
            problems.append("CUDA is not visible to torch (a CPU build, no driver, or CUDA_VISIBLE_DEVICES empty); "
                            "use --smoke to run on the CPU")
    for name in ("transformers", "peft", "accelerate", "bitsandbytes", "flash_attn"):
        try:
            env[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - ImportError, or a binary built for another torch (OSError, undefined symbol)
            env[name] = None
            if name in ("transformers", "peft", "accelerate", "bitsandbytes"):
                problems.append(f"{name} is not installed (on the device machine carry its wheel: see this "
                                f"script's docstring)")
    if env["transformers"]:
        from transformers import Idefics2ForConditionalGeneration

        if "mm_encoder_outputs" not in inspect.signature(Idefics2ForConditionalGeneration.forward).parameters:
            problems.append(f"transformers {env['transformers']} predates `mm_encoder_outputs`, which the image-"
                            f"feature cache passes to generate; install the version medvqa is tested with (5.24)")
    if env["bitsandbytes"] and torch.cuda.is_available():
        try:  # the CUDA 4-bit kernels, not only the Python package
            import bitsandbytes.functional as F

            w = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
            q, state = F.quantize_4bit(w, quant_type="nf4")
            err = (F.dequantize_4bit(q, state) - w).abs().mean().item()
            if not err < 0.2:
                problems.append(f"bitsandbytes' NF4 round trip on CUDA is off (mean error {err:.3f})")
        except Exception as e:  # noqa: BLE001 - any failure here means no usable CUDA kernels
            problems.append(f"bitsandbytes {env['bitsandbytes']} has no working CUDA 4-bit kernels: "
                            f"{type(e).__name__}: {e}".splitlines()[0])
    env["problem"] = problems[0] if problems else None
    return env


# ------------------------------------------------------------------------------------------------- model and data


def ensure_model(model_dir: Path, shape: str, layers: dict, device: str) -> dict:
    """``shapes.build`` into ``model_dir``, or the folder as it is when a build with the same shape and layers is
    there (``bench_build.json``)."""
    from medvqa.shapes import build

    marker = model_dir / "bench_build.json"
    want = {"shape": shape, **layers}
    if marker.exists() and json.loads(marker.read_text()).get("want") == want:
        info = json.loads(marker.read_text())["info"]
        return {**info, "reused": True, "seconds": 0.0}
    info = build(shape, model_dir, device=device, **layers)
    marker.write_text(json.dumps({"want": want, "info": info}))
    return {**info, "reused": False}


def bench_config(model_dir: Path, use_gpu: bool, grad_accum: int | None):
    """The ``paper`` preset on the offline model (4-bit NF4, bf16 compute on a GPU, LoRA r=8, batch 2 x 8)."""
    from medvqa.config import load_config

    overrides = [f"model.name_or_path={model_dir}", f"resources.use_gpu={str(use_gpu).lower()}"]
    if grad_accum:  # the global batch is what the config states; grad_accum follows from it
        overrides.append(f"stage1.global_batch_size={2 * grad_accum}")
    return load_config("paper", overrides)


def stage1_accum(cfg) -> int:
    from medvqa.config import grad_accum_steps

    return grad_accum_steps(cfg.stage1, cfg.resources, "stage1")


def phantom_images(n: int, px: int, task: str = "caption", seed: int = 0) -> list[dict]:
    """Phantom records whose image is upscaled from 64 px to ``px`` x ``px`` (PNG bytes): the work of a ``px``-pixel
    image (980: 70 x 70 = 4,900 SigLIP patches), not its content."""
    from PIL import Image

    from medvqa.data.phantoms import phantom_record

    out = []
    for i in range(n):
        rec = phantom_record(i, task, seed, "train")
        img = Image.open(io.BytesIO(rec["image"])).convert("RGB").resize((px, px), Image.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append({**rec, "image": buf.getvalue()})
    return out


def stage1_batches(cfg, processor, px: int, n_batches: int) -> list[dict]:
    """Collated stage-1 micro-batches (caption after the stage-1 prompt, labels on the caption only)."""
    from medvqa.data.pipeline import collate_fn_for, decode_image, encode_example

    stage = cfg.stage1
    recs = phantom_images(n_batches * stage.batch_size, px, "caption")
    enc = [encode_example(processor, decode_image(r["image"]), stage.prompt, "", r["target"], stage.max_length)
           for r in recs]
    collate = collate_fn_for(processor)
    return [collate({k: [e[k] for e in enc[i:i + stage.batch_size]] for k in enc[0]})
            for i in range(0, len(enc), stage.batch_size)]


def train_window(model, batches: list[dict], stage, grad_accum: int, device, seconds: float, max_steps: int,
                 warmup_steps: int = 1) -> dict:
    """Optimizer steps of ``grad_accum`` micro-batches (cycling ``batches``) for ``seconds`` (at least one timed
    step, at most ``max_steps``) after ``warmup_steps`` untimed ones: samples/s, tokens/s, peak memory."""
    import torch

    from medvqa import trainstep
    from medvqa.model import gpu_memory

    # The training step of medvqa.train.train_fn_per_worker (medvqa.trainstep: bf16 autocast on CUDA, the mean over
    # grad_accum micro-batches, clipping, AdamW with the stage's lr and weight decay); a constant learning rate.
    optimizer = trainstep.build_optimizer(model, stage)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    cycle = itertools.cycle(batches)

    def step() -> tuple[int, int, float]:
        r = trainstep.optimizer_step(model, cycle, grad_accum, optimizer, scheduler, stage.max_grad_norm, device,
                                     autocast_dtype)
        return r["samples"], r["tokens"], r["loss"]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    model.train()
    for _ in range(warmup_steps):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # blocks cached while loading or by another variant are not this window's
    gpu_memory(device)  # resets the peaks: the window's own
    samples = tokens = steps = 0
    t0 = time.perf_counter()
    while True:
        s, t, loss = step()
        samples, tokens, steps = samples + s, tokens + t, steps + 1
        sync()
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds or steps >= max_steps:
            break
    mem = gpu_memory(device)
    return {"samples_per_s": samples / elapsed, "tokens_per_s": tokens / elapsed, "steps": steps,
            "samples": samples, "seconds": round(elapsed, 2), "loss": round(loss, 4),
            "tokens_per_sample": round(tokens / max(samples, 1), 1),
            "peak_allocated_gib": mem.get("gpu_peak_allocated_gib"),
            "peak_reserved_gib": mem.get("gpu_peak_reserved_gib")}


# ------------------------------------------------------------------------------------------------- parts


class Stage1:
    """The stage-1 training model, loaded once and kept while the other parts run; ``variant`` trains one attention
    x checkpointing variant for its window."""

    def __init__(self, cfg, s: dict):
        import torch

        from medvqa.model import load_model, load_processor, worker_device

        self.cfg, self.s = cfg, s
        self.device = worker_device(cfg.resources.use_gpu)
        t0 = time.perf_counter()
        torch.manual_seed(0)
        self.model = load_model(cfg, use_gpu=cfg.resources.use_gpu)
        self.load_seconds = round(time.perf_counter() - t0, 1)
        log(f"stage 1: model loaded in {self.load_seconds} s on {self.device}")
        self.accum = stage1_accum(cfg)
        self.batches = stage1_batches(cfg, load_processor(cfg.model), s["image_px"], min(self.accum, 8))
        self.flash = importlib.util.find_spec("flash_attn") is not None and self.device.type == "cuda"
        self.result = {"load_seconds": self.load_seconds, "batch_size": cfg.stage1.batch_size,
                       "grad_accum": self.accum, "image_px": s["image_px"], "variants": []}

    def variant(self, attn: str, ckpt: bool, window: float) -> dict:
        import torch

        from medvqa.model import set_activation_checkpointing

        name, accum = f"{attn}{' + checkpointing' if ckpt else ''}", self.accum
        if attn == "flash_attention_2" and not self.flash:
            r = {"skipped": "flash-attn not installed or no CUDA"}
        else:
            base = self.model.get_base_model()
            try:
                base.set_attn_implementation(attn)
                set_activation_checkpointing(base, ckpt)
                r = train_window(self.model, self.batches, self.cfg.stage1, accum, self.device, window, self.s["train_max_steps"],
                                 self.s["warmup_steps"])
            except Exception as e:  # noqa: BLE001 - out of memory, a kernel missing: the next variant still runs
                r = {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        if "samples_per_s" in r:
            log(f"stage 1 {name}: {r['samples_per_s']:.2f} samples/s, {r['tokens_per_s']:.0f} tokens/s "
                f"({r['steps']} steps of {self.cfg.stage1.batch_size} x {accum}, {r['tokens_per_sample']} "
                f"tokens/sample), peak {r['peak_allocated_gib']} GiB allocated / {r['peak_reserved_gib']} GiB "
                f"reserved")
        else:
            log(f"stage 1 {name}: {r.get('error') or r.get('skipped')}")
        self.result["variants"].append({"attn": attn, "checkpointing": ckpt, **r})
        return r


def part_infer(cfg, s: dict, budget: Budget, reserve: float = 0.0) -> dict:
    """The base model as the matrix loads it; questions grouped by image, answered at batch 1 without the feature
    cache (the study's way) and batched without and with it."""
    from medvqa.infer import FeatureCache, generate_answers
    from medvqa.model import load_inference_model, load_processor

    t0 = time.perf_counter()
    model = load_inference_model(cfg, use_gpu=cfg.resources.use_gpu)
    processor = load_processor(cfg.model)
    load_s = time.perf_counter() - t0
    log(f"inference: model loaded in {load_s:.1f} s")
    k, n_img = s["questions_per_image"], s["images"]
    questions = phantom_images(n_img * k, s["image_px"], "vqa", seed=1)
    rows = [{"image": questions[i // k * k]["image"], "prompt": q["prompt"]}  # k questions on each image
            for i, q in enumerate(questions)]
    instruction, new = cfg.stage2.prompt, s["max_new_tokens"]
    out = {"load_seconds": round(load_s, 1), "questions": len(rows), "images": n_img, "max_new_tokens": new}
    answers = {}
    for mode, size, cached in (("batch1", 1, False), ("batched", len(rows), False), ("batched_cache", len(rows), True)):
        cap = budget.cap(s["infer_cap_s"] / 3, reserve)
        cache = FeatureCache() if cached else None
        done, t1 = [], time.perf_counter()
        for i in range(0, len(rows), size):
            if done and time.perf_counter() - t1 > cap:
                break
            done += generate_answers(model, processor, rows[i:i + size], instruction, new, cache)
        elapsed = time.perf_counter() - t1
        answers[mode] = [a["raw"] for a in done]
        out[mode] = {"questions_per_s": len(done) / elapsed, "questions": len(done), "seconds": round(elapsed, 2),
                     **({"images_encoded": cache.misses} if cache else {})}
        log(f"inference {mode}: {out[mode]['questions_per_s']:.2f} questions/s ({len(done)} in {elapsed:.1f} s)")
    n = min(len(a) for a in answers.values())
    out["batched_equals_batch1"] = sum(answers["batch1"][i] == answers["batched"][i] for i in range(n))
    out["cache_equals_no_cache"] = sum(answers["batched"][i] == answers["batched_cache"][i] for i in range(n))
    out["compared"] = n
    del model
    _free()
    return out


def packed_worker(index: int, model_dir: str, use_gpu: bool, s: dict, threads: int, commands, results) -> None:
    """One trial's process: load its own 4-bit model, warm up, then train for each window it is told to."""
    try:
        import torch

        torch.set_num_threads(threads)
        from medvqa.model import load_model, load_processor, worker_device

        cfg = bench_config(Path(model_dir), use_gpu, s["grad_accum"])
        torch.manual_seed(index)
        model = load_model(cfg, use_gpu=use_gpu)
        accum = stage1_accum(cfg)
        batches = stage1_batches(cfg, load_processor(cfg.model), s["image_px"], min(accum, 8))
        device = worker_device(use_gpu)
        if s["warmup_steps"]:
            train_window(model, batches, cfg.stage1, accum, device, 0.0, 1, warmup_steps=0)
        results.put(("ready", index, None))
        while (cmd := commands.get())[0] == "run":
            results.put(("done", index, train_window(model, batches, cfg.stage1, accum, device, cmd[1],
                                                     s["train_max_steps"], warmup_steps=0)))
    except Exception:  # noqa: BLE001 - reported to the parent, which prints it
        results.put(("error", index, traceback.format_exc()))


def part_packed(model_dir: Path, use_gpu: bool, s: dict, budget: Budget, reserve: float = 0.0) -> dict:
    """1, 2, 4 ... concurrent trial processes on the one device, same window each round: aggregate samples/s.
    ``reserve``: seconds of the budget left for the parts after this one."""
    import multiprocessing as mp
    import queue

    if budget.cap(s["packed_load_cap_s"], reserve) < s["packed_load_cap_s"] / 4:
        return {"skipped": f"out of time budget ({budget.left():.0f} s left)"}
    ctx = mp.get_context("spawn")  # CUDA cannot be forked
    n = max(s["packed"])
    threads = max(1, (os.cpu_count() or 1) // n)
    results = ctx.Queue()
    commands = [ctx.Queue() for _ in range(n)]
    procs = [ctx.Process(target=packed_worker, args=(i, str(model_dir), use_gpu, s, threads, commands[i], results),
                         daemon=True) for i in range(n)]
    out: dict = {"processes": n, "rounds": {}}
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    try:
        ready = set()
        while len(ready) < n:
            kind, i, payload = results.get(timeout=max(1.0, budget.cap(s["packed_load_cap_s"], reserve)))
            if kind == "error":
                raise RuntimeError(f"trial process {i} failed:\n{payload}")
            ready.add(i)
        out["load_seconds"] = round(time.perf_counter() - t0, 1)
        log(f"packed: {n} trial processes loaded and warmed up in {out['load_seconds']} s")
        for k in s["packed"]:
            window = s["packed_window_s"]
            if budget.cap(window + 30, reserve) < window + 30:
                out["rounds"][str(k)] = {"skipped": "out of time budget"}
                continue
            for i in range(k):
                commands[i].put(("run", window))
            got = []
            while len(got) < k:
                kind, i, payload = results.get(timeout=window + 300)
                if kind == "error":
                    raise RuntimeError(f"trial process {i} failed:\n{payload}")
                got.append(payload)
            total = sum(r["samples_per_s"] for r in got)
            out["rounds"][str(k)] = {"samples_per_s": total, "per_trial": [round(r["samples_per_s"], 3) for r in got],
                                     "peak_reserved_gib": [r["peak_reserved_gib"] for r in got]}
            each = ", ".join(f"{r['samples_per_s']:.2f}" for r in got)
            log(f"packed {k} trial(s): {total:.2f} samples/s together ({each})")
    except (queue.Empty, RuntimeError) as e:
        out["error"] = (f"timed out waiting for the trial processes ({time.perf_counter() - t0:.0f} s in)"
                        if isinstance(e, queue.Empty) else str(e))
        log(f"packed: {out['error']}")
    finally:
        for q in commands:
            q.put(("stop",))
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    one = out["rounds"].get("1", {}).get("samples_per_s")
    out["speedup"] = {k: round(r["samples_per_s"] / one, 3) for k, r in out["rounds"].items()
                      if one and "samples_per_s" in r}
    return out


def _free() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------- main


def summary(result: dict) -> dict:
    """The headline figures and whether the issue's targets are met (None: not measured)."""
    variants = result.get("train", {}).get("variants", [])
    paper = variants[0] if variants and "samples_per_s" in variants[0] else {}
    infer = result.get("inference", {}).get("batched_cache", {})
    packed = result.get("packed", {})
    sps = paper.get("samples_per_s")
    full = result["environment"].get("device") != "cpu" and not result["settings"]["smoke"]
    out = {"stage1_samples_per_s": sps, "stage1_tokens_per_s": paper.get("tokens_per_s"),
           "peak_memory_gib": paper.get("peak_reserved_gib"), "peak_allocated_gib": paper.get("peak_allocated_gib"),
           "ratio_to_study": sps / STUDY_SAMPLES_PER_S if sps and full else None,  # only the full shape compares
           "infer_questions_per_s": infer.get("questions_per_s"),
           "packed_samples_per_s": {k: r.get("samples_per_s") for k, r in packed.get("rounds", {}).items()},
           "packed_speedup": packed.get("speedup", {})}
    speedup4 = out["packed_speedup"].get("4")
    out["targets_met"] = None if not full else {
        "stage1_samples_per_s": sps is not None and sps >= TARGETS["stage1_samples_per_s"],
        "peak_memory_gib": out["peak_memory_gib"] is not None and out["peak_memory_gib"] <= TARGETS["peak_memory_gib"],
        "packed4_speedup": speedup4 is not None and speedup4 >= TARGETS["packed4_speedup"]}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="reduced depth and sizes, any device (CPU: a few minutes)")
    ap.add_argument("--shape", default="idefics2-8b", choices=["idefics2-8b", "tiny"])
    ap.add_argument("--text-layers", dest="text_layers", type=int)
    ap.add_argument("--vision-layers", dest="vision_layers", type=int)
    ap.add_argument("--perceiver-depth", dest="perceiver_depth", type=int)
    ap.add_argument("--image-px", type=int, help="synthetic image size (default: 980; --smoke 378; tiny 64)")
    ap.add_argument("--model-dir", type=Path, help="where the offline model is built (default: under /tmp)")
    ap.add_argument("--budget-s", type=float, help="time for the whole run (default: 400 on a GPU, 900 --smoke)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "gpu.json")
    args = ap.parse_args()
    s = settings(args)
    t_start = time.perf_counter()
    budget = Budget(args.budget_s or (900 if args.smoke else 400))
    result: dict = {"settings": s}

    def finish(code: int) -> int:
        result["seconds_total"] = round(time.perf_counter() - t_start, 1)
        env = result["environment"]
        line = {"device": env.get("device"), "smoke": s["smoke"], "problem": env.get("problem"),
                **(summary(result) if not env.get("problem") else {}), **result}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(line, indent=2, default=str) + "\n")
        print(json.dumps(line, default=str), flush=True)
        return code

    env = result["environment"] = check_environment(need_cuda=not args.smoke)
    if env["problem"]:
        print(f"environment: NOT OK: {env['problem']}", flush=True)
        return finish(2)
    use_gpu = env["cuda_available"]
    log(f"environment: OK: {env['device']} | torch {env['torch']} (CUDA {env['torch_cuda']}) | transformers "
        f"{env['transformers']} | peft {env['peft']} | bitsandbytes {env['bitsandbytes']} | flash-attn "
        f"{env['flash_attn']}")

    tag = "-".join(f"{k[0]}{v}" for k, v in sorted(s["layers"].items())) or "full"
    model_dir = args.model_dir or Path("/tmp/medvqa-bench") / f"{s['shape']}-{tag}"
    t0 = time.perf_counter()
    result["model"] = ensure_model(model_dir, s["shape"], s["layers"], "cuda" if use_gpu else "cpu")
    log(f"model: {s['shape']} {s['layers'] or 'full depth'}: {result['model']['parameters']:,} parameters (full "
        f"shape {result['model']['full_shape_parameters']:,}), {'reused' if result['model']['reused'] else 'built'} "
        f"in {time.perf_counter() - t0:.1f} s at {model_dir}")

    cfg = bench_config(model_dir, use_gpu, s["grad_accum"])

    def part(name: str, run) -> None:  # one failed part must not lose the others' figures
        t0 = time.perf_counter()
        try:
            result[name] = run()
        except Exception as e:  # noqa: BLE001
            result[name] = {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
            traceback.print_exc()
            _free()
        result[name]["part_seconds"] = round(time.perf_counter() - t0, 1)
        log(f"{name}: {result[name]['part_seconds']} s; {budget.left():.0f} s of the budget left")

    # The targets first (the paper variant, packed trials), then inference, then the other variants while time lasts.
    stage1: Stage1 | None = None

    def paper_variant() -> dict:
        nonlocal stage1
        stage1 = Stage1(cfg, s)
        stage1.variant(*s["variants"][0], s["train_window_s"])
        return stage1.result

    part("train", paper_variant)
    part("packed", lambda: part_packed(model_dir, use_gpu, s, budget, reserve=s["infer_cap_s"] + 30))
    part("inference", lambda: part_infer(cfg, s, budget))
    if stage1 is not None:
        cost = result["train"]["part_seconds"] - stage1.load_seconds  # the paper variant, batches included
        for attn, ckpt in s["variants"][1:]:
            if budget.left() < cost:
                stage1.result["variants"].append({"attn": attn, "checkpointing": ckpt, "skipped": "out of time budget"})
                continue
            t0 = time.perf_counter()
            stage1.variant(attn, ckpt, s["train_window_s"] / 2)
            cost = time.perf_counter() - t0
        result["train"] = {**stage1.result, "part_seconds": result["train"]["part_seconds"]}
    return finish(0)


if __name__ == "__main__":
    sys.exit(main())
