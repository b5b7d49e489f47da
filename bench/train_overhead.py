"""Ray Train steps/s vs a plain PyTorch loop on the same tiny model, data and hyper-parameters (target overhead
<= 10%).

    python bench/train_overhead.py [--records 128] [--epochs 2]

Both sides train stage 2 of the ``tiny_single_stage`` preset from the same phantom records, preprocessing on the
fly. Plain: one process, per-sample preprocessing inside the loop. Ray: the real job (``fit_stage``: Ray Data
streaming into one TorchTrainer worker). Steps/s is measured between the first and last logged optimizer step, so
start-up (Ray, model load) is excluded from both; it is printed separately.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from common import phantom_examples, start_ray


def plain_loop(cfg, model_path: str, examples: list[dict]) -> tuple[float, float]:
    import torch

    from medvqa.data.pipeline import cached_processor, collate_fn_for, decode_image, encode_example
    from medvqa.config import grad_accum_steps
    from medvqa.runs import run_dir_for
    from medvqa.train import build_model_for_stage
    from medvqa.trainstep import build_scheduler, epoch_geometry, total_steps

    stage = cfg.stage2
    t_start = time.perf_counter()
    torch.manual_seed(cfg.run.seed)
    model = build_model_for_stage(cfg, "stage2", run_dir_for(cfg), use_gpu=False)  # stage 2 from the base
    processor = cached_processor(model_path, False, None)
    collate = collate_fn_for(processor)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=stage.lr, weight_decay=stage.weight_decay)
    accum = grad_accum_steps(stage, cfg.resources)
    n_steps = total_steps(epoch_geometry(len(examples), 1, stage.batch_size, accum), stage.epochs)
    sched = build_scheduler(opt, stage, n_steps)
    model.train()
    step, times = 0, []
    startup = time.perf_counter() - t_start
    while step < n_steps:
        for i in range(0, len(examples), stage.batch_size):
            rows = [encode_example(processor, decode_image(r["image"]), stage.prompt, r["prompt"], r["target"],
                                   stage.max_length) for r in examples[i: i + stage.batch_size]]
            batch = collate({k: [r[k] for r in rows] for k in rows[0]})
            (model(**batch).loss / accum).backward()
            if (i // stage.batch_size + 1) % accum:
                continue
            torch.nn.utils.clip_grad_norm_(trainable, stage.max_grad_norm)
            opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
            step += 1
            times.append(time.perf_counter())
            if step >= n_steps:
                break
    return (len(times) - 1) / (times[-1] - times[0]), startup


def ray_train(cfg, model_path: str) -> tuple[float, float]:
    from medvqa.runs import prepare_run_dir, read_metrics
    from medvqa.train import fit_stage

    t0 = time.perf_counter()
    run_dir = prepare_run_dir(cfg)
    fit_stage(cfg, "stage2", run_dir, model_path)
    total = time.perf_counter() - t0
    steps = [m for m in read_metrics(run_dir) if m.get("stage") == "stage2" and "loss" in m]
    span = steps[-1]["time"] - steps[0]["time"]
    return (steps[-1]["step"] - steps[0]["step"]) / span, total - span


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()

    from medvqa.config import load_config
    from medvqa.model import resolve_model_path

    out = Path(tempfile.mkdtemp())
    cfg = load_config("tiny_single_stage", [f"stage2.data.num_records={args.records}", f"stage2.epochs={args.epochs}",
                                            "run.log_every_n_steps=1", "run.checkpoint_every_n_steps=100000",
                                            f"run.output_dir={out}"])
    model_path = resolve_model_path(cfg.model)
    examples = phantom_examples(args.records)
    plain, plain_startup = plain_loop(cfg, model_path, examples)
    start_ray()
    try:
        ray_sps, ray_startup = ray_train(cfg, model_path)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(f"records: {args.records}  epochs: {args.epochs}  global batch {cfg.stage2.global_batch_size} = "
          f"{cfg.stage2.batch_size} per micro-batch  4-bit tiny Idefics2 on CPU")
    print(f"plain PyTorch loop : {plain:6.2f} steps/s   (start-up {plain_startup:5.1f} s)")
    print(f"Ray Train + Data   : {ray_sps:6.2f} steps/s   (start-up, data prep, checkpoints {ray_startup:5.1f} s)")
    print(f"Ray overhead in steady state: {(plain / ray_sps - 1) * 100:+.1f}%  (target <= 10%)")


if __name__ == "__main__":
    main()
