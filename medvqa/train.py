"""Ray Train: the per-worker training loop, one ``TorchTrainer`` per stage, and the two-stage driver.

Stage 1 (captioning) and stage 2 (VQA) are the same loop with different data, prompt and hyper-parameters
(``StageConfig``). The hand-off decides what stage 2 starts from (``run.handoff``):
- ``continue``: the stage-1 adapter is loaded trainable and keeps training (the study);
- ``merge``: the stage-1 adapter is frozen and a fresh adapter is trained on top (equivalent to merging stage 1 into
  the base, which for 4-bit weights would be lossy; GUIDE §5).

Fault tolerance: every ``run.checkpoint_every_n_steps`` rank 0 writes adapter, optimizer, scheduler, step and data
position as a Ray Train checkpoint under ``checkpoints/<stage>/``. A worker failure restarts the workers from it
(``FailureConfig``); a killed and re-submitted job finds the same run dir (deterministic run id), skips finished
stages and resumes the unfinished one from its latest checkpoint (Ray Train V2 restores by run name + storage path).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path

from medvqa.config import Config, StageConfig, from_dict, to_dict
from medvqa.ray_init import init_ray
from medvqa.runs import RunDir

log = logging.getLogger("medvqa.train")

STATE_FILE = "train_state.pt"  # optimizer, scheduler, step, data position (the adapter sits beside it)


def steps_per_epoch(num_records: int, world_size: int, stage: StageConfig) -> int:
    """Optimizer steps per epoch on each worker (shards are equal-sized; a trailing partial accumulation steps)."""
    micro = math.ceil((num_records // world_size) / stage.batch_size)
    return max(1, math.ceil(micro / stage.grad_accum))


def total_steps(num_records: int, world_size: int, stage: StageConfig) -> int:
    steps = math.ceil(steps_per_epoch(num_records, world_size, stage) * stage.epochs)
    return min(steps, stage.max_steps) if stage.max_steps else steps


def build_model_for_stage(cfg: Config, stage_name: str, run_dir: RunDir, use_gpu: bool):
    """The trainable model for a stage, following the hand-off policy."""
    from medvqa.model import load_model

    stage1_adapter = run_dir.adapter("stage1")
    if stage_name == "stage2" and cfg.stage1.enabled:
        if not (stage1_adapter / "adapter_config.json").exists():
            raise FileNotFoundError(f"stage 2 needs the stage-1 adapter at {stage1_adapter}")
        return load_model(cfg, use_gpu=use_gpu, stage1_adapter=str(stage1_adapter), handoff=cfg.run.handoff)
    return load_model(cfg, use_gpu=use_gpu)


def _build_scheduler(optimizer, stage: StageConfig, num_steps: int):
    from transformers import get_scheduler

    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[stage.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=min(stage.warmup_steps, num_steps),
                         num_training_steps=num_steps)


def validation_stage_name(stage_name: str) -> str:
    """Folder name (under data/ and rejects/) of a stage's carved validation records."""
    return f"{stage_name}_validation"


def validation_metrics(model, processor, rows: list[dict], instruction: str, batch_size: int = 16,
                       seed: int = 0) -> dict:
    """Answer the validation ``rows`` (SCHEMA records) greedily and score them with the evaluation code
    (``medvqa.infer.generate_answers`` + ``medvqa.metrics``): ``val_<metric>`` means and their 95% bootstrap CIs
    (``val_<metric>_ci``), plus ``val_n``. The model is put back in train mode afterwards."""
    from medvqa.infer import generate_answers
    from medvqa.metrics import VALIDATION_MAX_NEW_TOKENS, VALIDATION_METRICS, aggregate, score_rows

    was_training = model.training
    model.eval()
    try:
        answers = [a for i in range(0, len(rows), batch_size)
                   for a in generate_answers(model, processor, rows[i:i + batch_size], instruction,
                                             max_new_tokens=VALIDATION_MAX_NEW_TOKENS)]
    finally:
        model.train(was_training)
    scored = score_rows([{"true_answer": r["target"], "predicted_answer": a["answer"],
                          "answer_type": r["answer_type"]} for r, a in zip(rows, answers)])
    summary = aggregate(scored, n_boot=500, seed=seed, by=())
    out: dict = {"val_n": summary["n"]}
    for m in VALIDATION_METRICS:
        out[f"val_{m}"] = summary[m]
        out[f"val_{m}_ci"] = summary["ci"][m]
    return out


def _read_records(folder: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return [row for f in sorted(folder.glob("*.parquet")) for row in pq.read_table(f).to_pylist()]


def train_fn_per_worker(config: dict) -> None:
    """Ray Train worker loop. ``config``: ``cfg`` (Config as dict), ``stage``, ``run_dir``, ``num_records`` and,
    when the stage carves a validation set, ``validation_dir`` (its prepared records)."""
    import torch
    import ray.train
    from ray.train import Checkpoint

    from medvqa.data.pipeline import collate_fn_for
    from medvqa.model import load_processor, save_adapter, trainable_adapter
    from medvqa.runs import append_metrics

    cfg: Config = from_dict(config["cfg"])
    stage_name: str = config["stage"]
    stage: StageConfig = getattr(cfg, stage_name)
    run_dir = RunDir(Path(config["run_dir"]))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = cfg.resources.use_gpu and torch.cuda.is_available()
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")

    torch.manual_seed(cfg.run.seed)  # same LoRA init on every rank (DDP also broadcasts rank 0's at wrap time)
    model = build_model_for_stage(cfg, stage_name, run_dir, use_gpu)
    processor = load_processor(cfg.model)
    collate_fn = collate_fn_for(processor)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=stage.lr, weight_decay=stage.weight_decay)
    num_steps = total_steps(config["num_records"], world, stage)
    scheduler = _build_scheduler(optimizer, stage, num_steps)

    step, epoch, skip_micro = 0, 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            state = torch.load(Path(ckpt_dir) / STATE_FILE, map_location="cpu", weights_only=False)
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            weights = load_file(str(Path(ckpt_dir) / "adapter" / "adapter_model.safetensors"))
            set_peft_model_state_dict(model, weights, adapter_name=trainable_adapter(model))
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            step, epoch, skip_micro = state["step"], state["epoch"], state["micro_in_epoch"]
            if skip_micro >= steps_per_epoch(config["num_records"], world, stage) * stage.grad_accum:
                epoch, skip_micro = epoch + 1, 0  # saved at the end of an epoch (a validation round): the next one
        if rank == 0:
            log.info("[%s] resuming from checkpoint at step %d (epoch %d, %d micro-batches in)", stage_name, step,
                     epoch, skip_micro)
            append_metrics(run_dir, {"stage": stage_name, "event": "resumed", "step": step})

    # The model is already on its device (load_model's device_map places 4-bit weights; .to() must not move them).
    ddp_model = ray.train.torch.prepare_model(model, move_to_device=False,
                                              parallel_strategy="ddp" if world > 1 else None)
    autocast_dtype = torch.bfloat16 if use_gpu else None  # bf16 autocast on GPU; CPU trains in fp32
    shard = ray.train.get_dataset_shard("train")
    steps_epoch = steps_per_epoch(config["num_records"], world, stage)
    validation_rows = _read_records(Path(config["validation_dir"])) if config.get("validation_dir") else []
    validate_every = stage.validate_every_n_steps or steps_epoch
    # Validation rounds are numbered from the step, so a resumed stage continues the count (Tune's ASHA compares
    # trials at equal rounds).
    model.train()

    def save_checkpoint(micro_in_epoch: int, metrics: dict) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                save_adapter(model, Path(tmp) / "adapter")
                torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                            "epoch": epoch, "micro_in_epoch": micro_in_epoch}, Path(tmp) / STATE_FILE)
                ckpt = Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"step_{step:06d}")
            if rank == 0:
                append_metrics(run_dir, {"stage": stage_name, "event": "checkpoint", "step": step})

    t_window, samples_window, tokens_window, loss_window, micro_window = time.perf_counter(), 0, 0, 0.0, 0
    last = {}
    while step < num_steps:
        micro = 0
        optimizer.zero_grad(set_to_none=True)
        for batch in shard.iter_torch_batches(batch_size=stage.batch_size,
                                              collate_fn=collate_fn, device="cpu",
                                              prefetch_batches=4):
            micro += 1
            if micro <= skip_micro:  # data position from the checkpoint: skip what was trained on
                continue
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss = ddp_model(**batch).loss / stage.grad_accum
            loss.backward()
            loss_window += loss.item() * stage.grad_accum
            micro_window += 1
            samples_window += batch["input_ids"].shape[0]
            tokens_window += int(batch["attention_mask"].sum())
            end_of_epoch = micro >= steps_epoch * stage.grad_accum
            if micro % stage.grad_accum and not end_of_epoch:
                continue
            if stage.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(trainable, stage.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % cfg.run.log_every_n_steps == 0 or step == num_steps:
                elapsed = time.perf_counter() - t_window
                last = {"stage": stage_name, "step": step, "total_steps": num_steps, "epoch": epoch,
                        "loss": loss_window / max(micro_window, 1), "lr": scheduler.get_last_lr()[0],
                        "samples_per_s": samples_window * world / elapsed,
                        "tokens_per_s": tokens_window * world / elapsed}
                if rank == 0:
                    append_metrics(run_dir, last)
                    log.info("[%s] step %d/%d (%.0f%%) loss %.4f lr %.2e %.1f samples/s %.0f tokens/s", stage_name,
                             step, num_steps, 100 * step / num_steps, last["loss"], last["lr"],
                             last["samples_per_s"], last["tokens_per_s"])
                t_window, samples_window, tokens_window, loss_window, micro_window = time.perf_counter(), 0, 0, 0.0, 0
            # ray.train.report blocks until the Train controller polls the worker (every 2 s by default), so metrics
            # go to Ray (the dashboard's Train view) only with checkpoints; every logged step goes to the job log and
            # metrics.jsonl.
            validate = validation_rows and (step % validate_every == 0 or step == num_steps)
            if validate:
                val = {}
                if rank == 0:
                    t_val = time.perf_counter()
                    val = validation_metrics(model, processor, validation_rows, stage.prompt, seed=cfg.run.seed)
                    val.update({"stage": stage_name, "step": step, "total_steps": num_steps, "event": "validation",
                                "val_round": math.ceil(step / validate_every), "val_final": step == num_steps,
                                "val_seconds": round(time.perf_counter() - t_val, 2)})
                    append_metrics(run_dir, val)
                    log.info("[%s] step %d validation (%d questions, %.1f s): normalized EM %.3f, F1 %.3f",
                             stage_name, step, val["val_n"], val["val_seconds"], val["val_normalized_em"],
                             val["val_normalized_f1"])
                t_window = time.perf_counter()  # generation time is not training throughput
                save_checkpoint(micro, {**last, **val})
            elif step % cfg.run.checkpoint_every_n_steps == 0 or step == num_steps:
                save_checkpoint(micro, last or {"stage": stage_name, "step": step})
            if step >= num_steps or end_of_epoch:
                break
        if micro <= skip_micro:
            raise RuntimeError(f"[{stage_name}] worker {rank} got no data in epoch {epoch} (shard of "
                               f"{config['num_records']} records over {world} workers)")
        epoch += 1
        skip_micro = 0

    if rank == 0:
        save_adapter(model, run_dir.adapter(stage_name))
        log.info("[%s] finished at step %d; adapter saved to %s", stage_name, step, run_dir.adapter(stage_name))


# ------------------------------------------------------------------------------------------------- driver


def fit_stage(cfg: Config, stage_name: str, run_dir: RunDir, model_path: str, callbacks: list | None = None) -> dict:
    """Prepare a stage's data (and its carved validation set) and train it with a TorchTrainer; returns the stage
    summary. ``callbacks``: Ray Train ``UserCallback``s (a sweep passes one that forwards reports to Tune)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from medvqa.data.pipeline import prepare_records, training_dataset

    stage: StageConfig = getattr(cfg, stage_name)
    manifest = prepare_records(stage.data, run_dir.data(stage_name), run_dir.rejects(stage_name),
                               cfg.resources, cfg.run.max_reject_fraction)
    log.info("[%s] data: %d valid, %d rejected (%s)", stage_name, manifest["valid"], manifest["rejected"],
             manifest["reject_reasons"] or "no rejects")
    loop_config = {"cfg": to_dict(cfg), "stage": stage_name, "run_dir": str(run_dir.path),
                   "num_records": manifest["valid"]}
    if stage.data.validation_fraction:
        val_name = validation_stage_name(stage_name)
        val_manifest = prepare_records(stage.data, run_dir.data(val_name), run_dir.rejects(val_name), cfg.resources,
                                       cfg.run.max_reject_fraction, part="validation")
        if not val_manifest["valid"]:
            raise ValueError(f"[{stage_name}] data.validation_fraction={stage.data.validation_fraction} carved no "
                             f"validation images out of {manifest['unique_images']}; raise the fraction")
        log.info("[%s] validation: %d questions on %d images, image-disjoint from the %d training records",
                 stage_name, val_manifest["valid"], val_manifest["unique_images"], manifest["valid"])
        loop_config["validation_dir"] = str(run_dir.data(val_name))
    ds = training_dataset(run_dir.data(stage_name), stage, model_path, cfg.resources,
                          cfg.model.do_image_splitting, cfg.model.longest_edge, cfg.run.seed)
    r = cfg.resources
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu,
                                               resources_per_worker={"CPU": r.cpus_per_worker,
                                                                     **({"GPU": 1} if r.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=stage_name, storage_path=str(run_dir.checkpoints()),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2), callbacks=callbacks),
        datasets={"train": ds})
    t0 = time.perf_counter()
    result = trainer.fit()
    summary = {"stage": stage_name, "records": manifest["valid"], "rejected": manifest["rejected"],
               "seconds": round(time.perf_counter() - t0, 1), "final_metrics": result.metrics,
               "checkpoint": result.checkpoint.path if result.checkpoint else None}
    return summary


def run_two_stage(cfg: Config, ray_temp_dir: str | None = None, callbacks: list | None = None) -> Path:
    """The main job: both stages (or the enabled one), ending in a self-describing run directory. ``callbacks`` go
    to every stage's TorchTrainer."""
    from medvqa.model import resolve_model_path
    from medvqa.runs import append_metrics, prepare_run_dir, write_json

    rd = prepare_run_dir(cfg)
    log.info("run dir: %s", rd.path)
    model_path = resolve_model_path(cfg.model)  # builds the tiny model once, before workers race for it
    init_ray(cfg, ray_temp_dir)
    summaries = []
    for stage_name, _ in cfg.stages():
        if (rd.adapter(stage_name) / "adapter_config.json").exists():
            log.info("[%s] already finished (%s): skipping", stage_name, rd.adapter(stage_name))
            continue
        append_metrics(rd, {"stage": stage_name, "event": "start"})
        summary = fit_stage(cfg, stage_name, rd, model_path, callbacks)
        append_metrics(rd, {"stage": stage_name, "event": "end", "seconds": summary["seconds"]})
        summaries.append(summary)
    previous = json.loads(rd.stages_summary.read_text()) if rd.stages_summary.exists() else []
    write_json(rd.stages_summary, previous + summaries)
    # One data manifest for the run: per stage, what was read, kept and rejected (and where the rejects are).
    write_json(rd.manifest, {name: json.loads((rd.data(name) / "manifest.json").read_text())
                             for name, _ in cfg.stages()})
    log.info("done: %s", rd.path)
    return rd.path
