"""Evaluation-matrix throughput: the study's way (one process, ``model.generate`` per question, batch size 1) vs our
job (``evaluate.run_matrix``: Ray Data, fractional-CPU actors, batched, rows grouped by image), with and without the
image-feature cache (each image through the vision encoder + connector once per actor), on the same tiny model,
adapter, questions and decoding (target >= 5x questions/s).

    python bench/eval_matrix.py [--questions 160] [--max-new-tokens 16] [--batch-size 8] [--torch-threads 1]

Questions: ``--questions`` phantom test questions (``heldout_records`` of the tiny preset's stage-2 source) x the
conditions true / swapped / expert, answered by two models: ``base`` and ``two_stage`` (base + a LoRA adapter
trained in-process for a few steps and saved with ``model.save_adapter``). Decoding is ``generate_answers``' greedy
decoding on both sides; the sequential side calls it with one row at a time and no cache, as the study did. Each
phantom image is shown three times per model (true, expert, and as another question's swapped image).

Also measured in-process (no Ray, one model, the same rows grouped by image, ``--batch-size``): batched generate with
and without the cache, and how many images the vision encoder saw; this isolates the cache's effect from Ray's
scheduling noise. On the tiny model the vision tower is a small share of the work (64 px images, 16 patches); on
Idefics2-8b (SigLIP-400M over 980 px, 4,900 patches per sub-image) it is the largest part of a short answer's cost.

Threads: ``--torch-threads`` sets torch's intra-op threads in this process (the study loop and the in-process A/B);
Ray's fractional-CPU actors run 1 thread each. On a shared, oversubscribed 2-core machine 2 spinning threads per
process slow the tiny model's small matmuls down by an order of magnitude, so 1 is the fair setting there.

Start-up: sequential = loading each model (4-bit) and the processor; Ray = ``ray.init`` plus the job's start (one
job for both models: each actor loads the base once with both models' adapters) and Ray Data scheduling. The Ray
steady-state rate is read off the stream: ``run_matrix`` hands each batch to the driver as it is produced
(``progress``), so steady state = rows after the first batch / (last batch time - first batch time). Both sides are
printed with start-up excluded and included.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from common import start_ray

CONDITIONS = ("true", "swapped", "expert")


def train_adapter(cfg, run_dir: Path, steps: int = 4) -> Path:
    """A LoRA trained for a few steps on 8 phantom training questions, saved as run_dir/adapters/stage2."""
    import torch

    from medvqa.data.phantoms import phantom_records
    from medvqa.data.pipeline import collate_fn_for, decode_image, encode_example
    from medvqa.model import load_model, load_processor, save_adapter
    from medvqa.runs import RunDir

    RunDir(run_dir).write_config(cfg)
    processor = load_processor(cfg.model)
    torch.manual_seed(0)
    model = load_model(cfg)
    recs = phantom_records("vqa", 8, seed=cfg.stage2.data.seed)
    encoded = [encode_example(processor, decode_image(r["image"]), cfg.stage2.prompt, r["prompt"], r["target"], 160)
               for r in recs]
    batch = collate_fn_for(processor)({k: [e[k] for e in encoded] for k in encoded[0]})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    for _ in range(steps):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    return save_adapter(model, RunDir(run_dir).adapters("stage2"))


def sequential(cfg, models: dict, cells: dict, max_new_tokens: int) -> tuple[int, float, float, dict]:
    """The study's loop: per model, load it, then one ``generate`` per question. Returns (questions, generate
    seconds, start-up seconds, answers keyed by (model, condition, question_id))."""
    from medvqa.infer import generate_answers
    from medvqa.model import load_inference_model, load_processor

    n, gen_s, startup_s, answers = 0, 0.0, 0.0, {}
    for name, adapters in models.items():
        t0 = time.perf_counter()
        model = load_inference_model(cfg, adapters)
        model.eval()
        processor = load_processor(cfg.model)
        t1 = time.perf_counter()
        startup_s += t1 - t0
        for c in CONDITIONS:
            for row in cells[c]:
                (p,) = generate_answers(model, processor, [row], row["instruction"], max_new_tokens)
                answers[name, c, row["question_id"]] = p["raw"]
                n += 1
        gen_s += time.perf_counter() - t1
        del model
    return n, gen_s, startup_s, answers


def in_process(cfg, adapters: dict, rows: list, max_new_tokens: int, batch_size: int) -> dict:
    """Batched ``generate_answers`` over ``rows`` (grouped by image) in this process, cache off and on, alternating
    batch by batch (an A/B under the same background load): seconds, answers, and images through the vision encoder
    (counted with a forward hook)."""
    from medvqa.infer import FeatureCache, generate_answers
    from medvqa.model import load_inference_model, load_processor

    model = load_inference_model(cfg, adapters)
    model.eval()
    processor = load_processor(cfg.model)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    encoded = []
    handle = inner.model.vision_model.register_forward_hook(
        lambda m, args, kwargs, out: encoded.append(kwargs["pixel_values"].shape[0]), with_kwargs=True)
    res = {label: {"s": 0.0, "answers": [], "encoded": 0} for label in ("off", "on")}
    caches = {"off": None, "on": FeatureCache()}
    try:
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            for label, cache in caches.items():
                encoded.clear()
                t0 = time.perf_counter()
                for instruction in sorted({r["instruction"] for r in chunk}):  # as Predictor does
                    part = [r for r in chunk if r["instruction"] == instruction]
                    preds = generate_answers(model, processor, part, instruction, max_new_tokens, cache)
                    res[label]["answers"] += [(r["condition"], r["question_id"], p["raw"]) for r, p in zip(part, preds)]
                res[label]["s"] += time.perf_counter() - t0
                res[label]["encoded"] += sum(encoded)
    finally:
        handle.remove()
    for r in res.values():
        r["answers"].sort()
    return res


def ray_matrix(cfg, models: dict, test: list, out: Path, args, feature_cache_mb: float) -> dict:
    """``run_matrix`` wall time, its steady-state rate from the streamed batches' arrival times, and its cells."""
    import dataclasses

    from medvqa.evaluate import run_matrix

    settings = dict(conditions=list(CONDITIONS), seed=0, max_new_tokens=args.max_new_tokens, n_boot=50,
                    concurrency=args.concurrency, cpus_per_actor=args.cpus_per_actor, batch_size=args.batch_size,
                    feature_cache_mb=feature_cache_mb)
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, **settings))
    arrivals = []  # (seconds since start, rows)
    t0 = time.perf_counter()
    res = run_matrix(cfg, models, test, out, progress=lambda model, n: arrivals.append((time.perf_counter() - t0, n)))
    wall = time.perf_counter() - t0
    first, last = arrivals[0][0], arrivals[-1][0]
    steady_rows = sum(n for _, n in arrivals) - arrivals[0][1]
    cells = {(m, c): out / rel for m, cs in res["metrics"]["settings"]["cells"].items() for c, rel in cs.items()}
    return {"wall_s": wall, "first_s": first, "steady": steady_rows / max(last - first, 1e-9), "batches": len(arrivals),
            "cells": cells}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=160)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--cpus-per-actor", type=float, default=0.5)
    ap.add_argument("--torch-threads", type=int, default=None, help="intra-op threads here (default: torch's)")
    args = ap.parse_args()
    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    import pandas as pd

    from medvqa.conditions import build_cells
    from medvqa.config import load_config
    from medvqa.evaluate import group_by_image, heldout_records
    from medvqa.model import resolve_model_path

    work = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    try:
        cfg = load_config("tiny", ["resources.num_cpus=2", f"run.output_dir={work}"])
        resolve_model_path(cfg.model)
        run_dir = work / "run"
        run_dir.mkdir()
        adapter = train_adapter(cfg, run_dir)
        test = heldout_records(cfg.stage2.data, limit=args.questions)
        cells = build_cells(test, CONDITIONS, cfg.stage2.prompt, seed=0)
        two_stage = {"stage2": str(adapter)}

        seq_n, seq_gen, seq_start, seq_answers = sequential(cfg, {"base": {}, "two_stage": two_stage}, cells,
                                                            args.max_new_tokens)
        rows = group_by_image([r for c in CONDITIONS for r in cells[c]])
        proc = in_process(cfg, two_stage, rows, args.max_new_tokens, args.batch_size)

        t0 = time.perf_counter()
        start_ray()
        ray_init = time.perf_counter() - t0
        matrix_models = {"base": None, "two_stage": run_dir}
        ray_n = len(matrix_models) * len(CONDITIONS) * len(test)
        t0 = time.perf_counter()  # a cold start (Ray workers, imports) would otherwise fall on the first variant
        ray_matrix(cfg, matrix_models, test[:2], work / "warmup", args, 512.0)
        warmup_s = time.perf_counter() - t0
        ray = {}
        for label, mb in (("cache on", 512.0), ("cache off", 0.0)):
            out = work / f"full_{label.replace(' ', '_')}"
            r = ray_matrix(cfg, matrix_models, test, out, args, mb)
            r["same"] = r["total"] = 0
            for m in matrix_models:
                for c in CONDITIONS:
                    df = pd.read_parquet(r["cells"][m, c])
                    for q, raw in zip(df["question_id"], df["raw_prediction"]):
                        r["total"] += 1
                        r["same"] += seq_answers[m, c, q] == raw
            ray[label] = r
    finally:
        import ray as ray_module

        if ray_module.is_initialized():
            ray_module.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    seq_steady = seq_n / seq_gen
    seq_incl = seq_n / (seq_gen + seq_start)
    print(f"questions: {len(test)} x conditions {'/'.join(CONDITIONS)} x models base/two_stage = {ray_n} answers "
          f"({len({r['image_id_shown'] for r in rows})} distinct images); greedy, max_new_tokens "
          f"{args.max_new_tokens}; 4-bit tiny Idefics2 on CPU; torch threads here {torch.get_num_threads()}; "
          f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"study (1 process, batch 1, no cache): {seq_steady:6.2f} q/s start-up excluded | {seq_incl:6.2f} q/s "
          f"included (start-up {seq_start:5.1f} s: 2 model loads; generate {seq_gen:5.1f} s)")
    n_rows = len(rows)
    off, on = proc["off"], proc["on"]
    print(f"in-process batched (two_stage, batch {args.batch_size}, {n_rows} rows): cache off {n_rows / off['s']:6.2f} "
          f"q/s ({off['encoded']} images encoded) | cache on {n_rows / on['s']:6.2f} q/s ({on['encoded']} images "
          f"encoded) | cache speed-up {off['s'] / on['s']:4.2f}x | identical answers: "
          f"{off['answers'] == on['answers']}")
    for label, r in ray.items():
        steady, incl, incl_init = r["steady"], ray_n / r["wall_s"], ray_n / (r["wall_s"] + ray_init)
        print(f"run_matrix {label:9s} (1 Ray Data job, {args.concurrency} actors x {args.cpus_per_actor} CPU, batch "
              f"{args.batch_size}): {steady:6.2f} q/s steady state | {incl:6.2f} q/s start-up included | "
              f"{incl_init:6.2f} q/s incl. ray.init  [wall {r['wall_s']:5.1f} s, first batch at {r['first_s']:4.1f} s, "
              f"{r['batches']} batches streamed]")
        print(f"    vs study: {steady / seq_steady:5.2f}x steady state (target >= 5x) | {incl / seq_incl:5.2f}x "
              f"start-up included ({incl_init / seq_incl:5.2f}x counting ray.init {ray_init:4.1f} s) | identical raw "
              f"answers (batched vs batch 1): {r['same']}/{r['total']}")
    print(f"    (a 2-question warm-up matrix ran first, not counted: {warmup_s:4.1f} s, the cold start)")
    on_r, off_r = ray["cache on"], ray["cache off"]
    print(f"run_matrix cache on vs off: {on_r['steady'] / off_r['steady']:4.2f}x steady state, "
          f"{off_r['wall_s'] / on_r['wall_s']:4.2f}x wall")

if __name__ == "__main__":
    main()
