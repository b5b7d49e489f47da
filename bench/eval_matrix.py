"""Evaluation-matrix throughput: the study's way (one process, ``model.generate`` per question, batch size 1) vs our
job (``evaluate.run_matrix``: Ray Data, fractional-CPU actors, batched), on the same tiny model, adapter, questions
and decoding (target >= 5x questions/s).

    python bench/eval_matrix.py [--questions 160] [--max-new-tokens 16] [--batch-size 8]

Questions: ``--questions`` phantom test questions (``heldout_records`` of the tiny preset's stage-2 source) x the
conditions true / swapped / expert, answered by two models: ``base`` and ``two_stage`` (base + a LoRA adapter
trained in-process for a few steps and saved with ``model.save_adapter``). Decoding is ``generate_answers``' greedy
decoding on both sides; the sequential side calls it with one row at a time.

Start-up: sequential = loading each model (4-bit) and the processor; Ray = ``ray.init`` plus, per model job, the
actors' model loads and Ray Data scheduling. The Ray steady-state rate is the marginal one: the full matrix minus a
2-question matrix run the same way (same jobs, same actors), so the fixed cost per job cancels out. Both sides are
printed with start-up excluded and included.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from common import start_ray

CONDITIONS = ("true", "swapped", "expert")


def train_adapter(cfg, run_dir: Path, steps: int = 4) -> Path:
    """A LoRA trained for a few steps on 8 phantom training questions, saved as run_dir/adapters/stage2."""
    import torch

    from medvqa.config import dump_yaml
    from medvqa.data.phantoms import phantom_records
    from medvqa.data.pipeline import collate_fn_for, decode_image, encode_example
    from medvqa.model import load_model, load_processor, save_adapter

    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
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
    return save_adapter(model, run_dir / "adapters" / "stage2")


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


def ray_matrix(cfg, models: dict, test: list, out: Path, args) -> tuple[float, dict]:
    """``run_matrix`` wall time and its metrics/predictions folder."""
    from medvqa.evaluate import run_matrix

    t0 = time.perf_counter()
    res = run_matrix(cfg, models, test, out, conditions=CONDITIONS, seed=0, max_new_tokens=args.max_new_tokens,
                     concurrency=args.concurrency, cpus_per_actor=args.cpus_per_actor, batch_size=args.batch_size,
                     n_boot=50)
    return time.perf_counter() - t0, res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=160)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--cpus-per-actor", type=float, default=0.5)
    args = ap.parse_args()

    import pandas as pd

    from medvqa.config import load_config
    from medvqa.evaluate import build_cells, cell_path, heldout_records
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

        seq_n, seq_gen, seq_start, seq_answers = sequential(cfg, {"base": {}, "two_stage": {"stage2": str(adapter)}},
                                                            cells, args.max_new_tokens)

        t0 = time.perf_counter()
        start_ray()
        ray_init = time.perf_counter() - t0
        matrix_models = {"base": None, "two_stage": run_dir}
        small_s, _ = ray_matrix(cfg, matrix_models, test[:2], work / "small", args)
        full_s, _ = ray_matrix(cfg, matrix_models, test, work / "full", args)
        ray_n = len(matrix_models) * len(CONDITIONS) * len(test)
        small_n = len(matrix_models) * len(CONDITIONS) * 2

        same = total = 0
        for m in matrix_models:
            for c in CONDITIONS:
                df = pd.read_parquet(cell_path(work / "full", m, c))
                for q, raw in zip(df["question_id"], df["raw_prediction"]):
                    total += 1
                    same += seq_answers[m, c, q] == raw
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    seq_steady = seq_n / seq_gen
    seq_incl = seq_n / (seq_gen + seq_start)
    ray_steady = (ray_n - small_n) / max(full_s - small_s, 1e-9)
    ray_job_startup = max(full_s - (ray_n / ray_steady), 0.0)
    ray_incl = ray_n / full_s
    ray_incl_init = ray_n / (full_s + ray_init)
    print(f"questions: {len(test)} x conditions {'/'.join(CONDITIONS)} x models base/two_stage = {ray_n} answers; "
          f"greedy, max_new_tokens {args.max_new_tokens}; 4-bit tiny Idefics2 on CPU")
    print(f"study (1 process, batch 1)  : {seq_steady:6.2f} q/s start-up excluded | {seq_incl:6.2f} q/s included "
          f"(start-up {seq_start:5.1f} s: 2 model loads; generate {seq_gen:5.1f} s)")
    print(f"run_matrix (Ray Data, {args.concurrency} actors x {args.cpus_per_actor} CPU, batch {args.batch_size}): "
          f"{ray_steady:6.2f} q/s start-up excluded (marginal, full - 2-question matrix) | {ray_incl:6.2f} q/s "
          f"included | {ray_incl_init:6.2f} q/s incl. ray.init")
    print(f"    run_matrix wall {full_s:5.1f} s (of which ~{ray_job_startup:4.1f} s fixed per-job start-up for 2 model "
          f"jobs); 2-question matrix {small_s:5.1f} s; ray.init {ray_init:4.1f} s")
    print(f"speed-up start-up excluded: {ray_steady / seq_steady:5.2f}x  (target >= 5x)")
    print(f"speed-up start-up included: {ray_incl / seq_incl:5.2f}x  ({ray_incl_init / seq_incl:5.2f}x counting "
          f"ray.init)")
    print(f"identical raw answers (batched vs batch 1): {same}/{total}")


if __name__ == "__main__":
    main()
