"""Ray Train: the per-worker training loop, one ``TorchTrainer`` per stage, and the two-stage driver.

Stage 1 (captioning) and stage 2 (VQA) are the same loop with different data, prompt and hyper-parameters
(``StageConfig``). The hand-off decides what stage 2 starts from (``run.handoff``):
- ``continue``: the stage-1 adapter is loaded trainable and keeps training (the study);
- ``merge``: the stage-1 adapter is frozen and a fresh adapter is trained on top (equivalent to merging stage 1 into
  the base, which for 4-bit weights would be lossy; GUIDE §5).

Fault tolerance: resuming is exact. A checkpoint (``medvqa.trainstep.save_checkpoint``, every
``run.checkpoint_every_n_steps``, at every epoch's end, at validation rounds and at the end) holds the adapter,
optimizer, scheduler, step, epoch, the position in the epoch's seeded data order and every worker's random state, under
``checkpoints/<stage>/``. A worker failure restarts the workers from it (``FailureConfig``); a killed and re-submitted
job finds the same run dir (deterministic run id), skips finished stages and resumes the unfinished one from its
latest checkpoint (Ray Train V2 restores by run name + storage path). Each worker builds its own dataset per epoch
from the checkpoint's position (``medvqa.data.pipeline.training_dataset``), so a restart neither re-reads nor
re-preprocesses the records already trained on. Faults can be injected at exact steps (``medvqa.faults``).

What Ray Train V2 restores: the latest checkpoint in ``checkpoint_manager_snapshot.json``, which its controller writes
when it registers a report, at its next poll of the workers (every 2 s; ``ray.train.report`` returns once the result
is queued, and the queue holds one). A job killed in between restores the checkpoint before, and the step folder of
the unregistered one is left on disk and overwritten when the resumed run reports that step again. Either way the
steps after the restored checkpoint are trained again, identically, and metrics.jsonl rows of the lost attempt are
superseded (``medvqa.runs.read_metrics``).

Storage: the run directory may be a bucket (``run.output_dir=s3://…``, ``medvqa.storage``); checkpoints go there
(``storage_path`` is its URI), and no worker reads a path only the driver has: the carved validation set reaches the
rank-0 worker as a Ray object, the stage-1 adapter and the prepared records are read from the run directory's
storage, and the finished adapter is uploaded there (``adapter_config.json`` last, the mark of a finished stage).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import tempfile
import time
from pathlib import Path

from medvqa.config import Config, ResourcesConfig, StageConfig, from_dict, grad_accum_steps, node_resources, to_dict
from medvqa.ray_init import init_ray
from medvqa.runs import RunDir
from medvqa.storage import StoragePath, staged

log = logging.getLogger("medvqa.train")

def build_model_for_stage(cfg: Config, stage_name: str, run_dir: RunDir, use_gpu: bool):
    """The trainable model for a stage, following the hand-off policy."""
    from medvqa.model import load_model

    stage1_adapter = run_dir.adapter("stage1")
    if stage_name == "stage2" and cfg.stage1.enabled:
        if not (stage1_adapter / "adapter_config.json").exists():
            raise FileNotFoundError(f"stage 2 needs the stage-1 adapter at {stage1_adapter}")
        # From the run directory's storage (a bucket on a cluster), never a path only the driver has.
        return load_model(cfg, use_gpu=use_gpu, stage1_adapter=str(stage1_adapter), handoff=cfg.run.handoff)
    return load_model(cfg, use_gpu=use_gpu)



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


def _read_records(folder: StoragePath) -> list[dict]:
    import pyarrow.parquet as pq

    return [row for f in folder.glob("*.parquet") for row in pq.read_table(f.path, filesystem=f.fs).to_pylist()]


def train_fn_per_worker(config: dict) -> None:
    """Ray Train worker loop. ``config``: ``cfg`` (Config as dict), ``stage``, ``run_dir`` (a path or URI),
    ``model_path``, ``num_records``, ``faults`` and ``pgid`` (``medvqa.faults.faults_from_env``) and, when the stage
    carves a validation set, ``validation`` (an object ref of its records, put by the driver: workers on any node get
    it through Ray) and ``num_validation``."""
    import torch
    import ray.train

    from medvqa import observe, trainstep
    from medvqa.data.pipeline import collate_fn_for, record_index, training_dataset
    from medvqa.faults import fire, parse_faults
    from medvqa.model import gpu_memory, load_processor, require_cuda, save_adapter
    from medvqa.runs import record_workers, worker_facts

    cfg: Config = from_dict(config["cfg"])
    use_gpu = cfg.resources.use_gpu
    if use_gpu:
        require_cuda("this Train worker")  # a GPU run never trains on CPU in silence
    stage_name: str = config["stage"]
    stage: StageConfig = getattr(cfg, stage_name)
    run_dir = RunDir(config["run_dir"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
    workers = gather_from_workers(worker_facts(device, rank))
    if rank == 0:
        record_workers(run_dir, stage_name, workers)  # every worker's GPU and CUDA, not only the driver's
    geometry = trainstep.epoch_geometry(config["num_records"], world, stage.batch_size,
                                        grad_accum_steps(stage, cfg.resources, stage_name))
    num_steps = trainstep.total_steps(geometry, stage.epochs, stage.max_steps)

    trainstep.seed_everything(cfg.run.seed)  # the same LoRA init on every rank (DDP also broadcasts rank 0's)
    model = build_model_for_stage(cfg, stage_name, run_dir, use_gpu)
    trainstep.seed_everything(trainstep.derived_seed(cfg.run.seed, stage_name, rank))  # dropout: per rank
    processor = load_processor(cfg.model)
    collate_fn = collate_fn_for(processor)
    optimizer = trainstep.build_optimizer(model, stage)
    scheduler = trainstep.build_scheduler(optimizer, stage, num_steps)
    setup = {"num_records": config["num_records"], "world_size": world, "batch_size": stage.batch_size,
             "grad_accum": geometry.grad_accum, "seed": cfg.run.seed}
    progress = {"step": 0, "epoch": 0, "micro_in_epoch": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            state = trainstep.load_checkpoint(Path(ckpt_dir), model, optimizer, scheduler, rank, expect=setup)
        progress = {k: state[k] for k in progress}
    if rank == 0:
        # Supersedes the rows an interrupted attempt logged past this step (medvqa.runs.read_metrics).
        observe.record(run_dir, {"stage": stage_name, "event": "train_start", **progress, "total_steps": num_steps,
                                "checkpoint": Path(checkpoint.path).name if checkpoint else None})
        log.info("[%s] %s at step %d/%d (epoch %d, %d of %d micro-batches in); %d steps per epoch of %d x %d "
                 "micro-batches x %d workers", stage_name, "resuming" if checkpoint else "starting", progress["step"],
                 num_steps, progress["epoch"], progress["micro_in_epoch"], geometry.micro_batches, geometry.steps,
                 stage.batch_size, geometry.grad_accum, world)

    # The model is already on its device (load_model's device_map places 4-bit weights; .to() must not move them).
    ddp_model = ray.train.torch.prepare_model(model, move_to_device=False,
                                              parallel_strategy="ddp" if world > 1 else None)
    autocast_dtype = torch.bfloat16 if use_gpu else None  # bf16 autocast on GPU; CPU trains in fp32
    records_dir = run_dir.data(stage_name)
    index = record_index(records_dir)
    if sum(g.rows for g in index) != config["num_records"]:
        raise RuntimeError(f"[{stage_name}] {records_dir} holds {sum(g.rows for g in index)} records, its manifest "
                           f"{config['num_records']}")
    validation_rows = ray.get(config["validation"]) if config.get("validation") is not None else []
    if len(validation_rows) != config.get("num_validation", 0):  # never a silently missing metric
        raise RuntimeError(f"[{stage_name}] {len(validation_rows)} validation records arrived, the driver prepared "
                           f"{config.get('num_validation', 0)}")
    # Validation rounds are numbered from the step, so a resumed stage continues the count (Tune's ASHA compares
    # trials at equal rounds); by default they fall on epoch ends.
    validate_every = stage.validate_every_n_steps or geometry.steps
    faults = parse_faults(config.get("faults", ""))
    last_checkpoint = Path(checkpoint.path).name if checkpoint else None
    model.train()

    def save_checkpoint(metrics: dict) -> str:
        name = f"step_{progress['step']:06d}"
        with tempfile.TemporaryDirectory() as tmp:
            trainstep.save_checkpoint(Path(tmp), model, optimizer, scheduler, {**progress, **setup}, rank)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
        if rank == 0:
            observe.record(run_dir, {"stage": stage_name, "event": "checkpoint", **progress})
        return name

    t_window, samples_window, tokens_window, loss_window, steps_window = time.perf_counter(), 0, 0, 0.0, 0
    last = {}
    while progress["step"] < num_steps:
        epoch = progress["epoch"]
        ds = training_dataset(records_dir, stage, config["model_path"], cfg.resources, cfg.model.do_image_splitting,
                              cfg.model.longest_edge, seed=cfg.run.seed, epoch=epoch, rank=rank, world=world,
                              start=progress["micro_in_epoch"] * stage.batch_size, index=index)
        batches = iter(ds.iter_torch_batches(batch_size=stage.batch_size, collate_fn=collate_fn, device="cpu",
                                             prefetch_batches=4))
        while progress["epoch"] == epoch and progress["step"] < num_steps:
            n_micro = geometry.micro_in_step(progress["micro_in_epoch"])
            stats = trainstep.optimizer_step(ddp_model, batches, n_micro, optimizer, scheduler, stage.max_grad_norm,
                                             device, autocast_dtype)
            progress["step"] += 1
            progress["micro_in_epoch"] += n_micro
            end_of_epoch = progress["micro_in_epoch"] == geometry.micro_batches
            if end_of_epoch:  # a checkpoint here resumes at the next epoch's first record
                progress.update(epoch=epoch + 1, micro_in_epoch=0)
                if next(batches, None) is not None:
                    raise RuntimeError(f"[{stage_name}] worker {rank}: epoch {epoch} has more than "
                                       f"{geometry.micro_batches} micro-batches")
            step = progress["step"]
            loss_window += stats["loss"]
            steps_window += 1
            samples_window += stats["samples"]
            tokens_window += stats["tokens"]
            if step % cfg.run.log_every_n_steps == 0 or step == num_steps:
                elapsed = time.perf_counter() - t_window
                last = {"stage": stage_name, "step": step, "total_steps": num_steps, "epoch": epoch,
                        "loss": loss_window / steps_window, "lr": scheduler.get_last_lr()[0],
                        "samples_per_s": samples_window * world / elapsed,
                        "tokens_per_s": tokens_window * world / elapsed, **gpu_memory(device)}
                if rank == 0:
                    observe.record(run_dir, last)
                    log.info("[%s] step %d/%d (%.0f%%) loss %.4f lr %.2e %.1f samples/s %.0f tokens/s%s", stage_name,
                             step, num_steps, 100 * step / num_steps, last["loss"], last["lr"],
                             last["samples_per_s"], last["tokens_per_s"],
                             f" GPU peak {last['gpu_peak_reserved_gib']:.1f} GiB" if use_gpu else "")
                t_window, samples_window, tokens_window, loss_window, steps_window = time.perf_counter(), 0, 0, 0.0, 0
            # ray.train.report blocks until the Train controller polls the worker (every 2 s by default), so metrics
            # go to Ray (the dashboard's Train view) only with checkpoints; every logged step goes to the job log and
            # metrics.jsonl.
            val_round = None
            if validation_rows and (step % validate_every == 0 or step == num_steps):
                val_round = math.ceil(step / validate_every)
                val = {}
                if rank == 0:
                    t_val = time.perf_counter()
                    val = validation_metrics(model, processor, validation_rows, stage.prompt, seed=cfg.run.seed)
                    val.update({"stage": stage_name, "step": step, "total_steps": num_steps, "event": "validation",
                                "val_round": val_round, "val_final": step == num_steps,
                                "val_seconds": round(time.perf_counter() - t_val, 2)})
                    observe.record(run_dir, val)
                    log.info("[%s] step %d validation (%d questions, %.1f s): normalized EM %.3f, F1 %.3f",
                             stage_name, step, val["val_n"], val["val_seconds"], val["val_normalized_em"],
                             val["val_normalized_f1"])
                t_window = time.perf_counter()  # generation time is not training throughput
                last_checkpoint = save_checkpoint({**last, **val})
            elif step % cfg.run.checkpoint_every_n_steps == 0 or end_of_epoch or step == num_steps:
                last_checkpoint = save_checkpoint(last or {"stage": stage_name, "step": step})
            if faults and rank == 0:
                fire(faults, stage_name, run_dir, config["pgid"], step=step, val_round=val_round,
                     wait=functools.partial(_wait_until_registered, last_checkpoint))

    if rank == 0:
        # adapter_config.json goes last: its presence marks the stage finished (run_two_stage skips it on resume).
        with staged(run_dir.adapter(stage_name), last=("adapter_config.json",)) as local:
            save_adapter(model, local)
        log.info("[%s] finished at step %d; adapter saved to %s", stage_name, progress["step"],
                 run_dir.adapter(stage_name))


def _wait_until_registered(checkpoint_dir_name: str | None, timeout_s: float = 300) -> None:
    """Block until Ray Train's checkpoint manager lists ``checkpoint_dir_name`` as the latest checkpoint (its snapshot
    in storage), so a fault injected now restores exactly that checkpoint."""
    import ray.train

    if checkpoint_dir_name is None:
        return
    storage = ray.train.get_context().get_storage()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with storage.storage_filesystem.open_input_stream(storage.checkpoint_manager_snapshot_path) as f:
                snapshot = json.loads(f.read())
            if (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name") == checkpoint_dir_name:
                return
        except (OSError, ValueError):  # not written yet, or caught mid-write
            pass
        time.sleep(0.1)
    raise TimeoutError(f"Ray Train did not register checkpoint {checkpoint_dir_name} within {timeout_s:.0f} s")


def gather_from_workers(obj) -> list:
    """``obj`` of every Train worker, in rank order (``[obj]`` without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ------------------------------------------------------------------------------------------------- driver


def worker_resources(resources: ResourcesConfig) -> dict:
    """Ray resources of one Train worker: its CPUs, with ``use_gpu`` ``gpus_per_worker`` GPUs (a fraction lets
    several trials' workers share one GPU), and a sliver of ``worker_resource`` when set (only nodes that carry it)."""
    return {"CPU": resources.cpus_per_worker, **({"GPU": resources.gpus_per_worker} if resources.use_gpu else {}),
            **node_resources(resources)}


def fit_stage(cfg: Config, stage_name: str, run_dir: RunDir, model_path: str, callbacks: list | None = None) -> dict:
    """Prepare a stage's data (and its carved validation set) and train it with a TorchTrainer; returns the stage
    summary. ``callbacks``: Ray Train ``UserCallback``s (a sweep passes one that forwards reports to Tune)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from medvqa import observe
    from medvqa.data.pipeline import prepare_records
    from medvqa.faults import faults_from_env, parse_faults

    stage: StageConfig = getattr(cfg, stage_name)
    manifest = prepare_records(stage.data, run_dir.data(stage_name), run_dir.rejects(stage_name),
                               cfg.resources, cfg.run.max_reject_fraction)
    log.info("[%s] data: %d valid, %d rejected (%s)", stage_name, manifest["valid"], manifest["rejected"],
             manifest["reject_reasons"] or "no rejects")
    observe.record(run_dir, {"stage": stage_name, "event": "data", "records": manifest["valid"],
                             "rejected": manifest["rejected"], "reject_reasons": manifest["reject_reasons"]})
    fault_config = faults_from_env()
    parse_faults(fault_config["faults"])  # a malformed spec fails here, not in a worker
    # No datasets go to the trainer: each worker builds its part of each epoch itself, from its checkpoint's position
    # (medvqa.data.pipeline.training_dataset), which a dataset fixed at submission could not follow across restarts.
    loop_config = {"cfg": to_dict(cfg), "stage": stage_name, "run_dir": str(run_dir.path), "model_path": model_path,
                   "num_records": manifest["valid"], **fault_config}
    if stage.data.validation_fraction:
        val_name = validation_stage_name(stage_name)
        val_manifest = prepare_records(stage.data, run_dir.data(val_name), run_dir.rejects(val_name), cfg.resources,
                                       cfg.run.max_reject_fraction, part="validation")
        if not val_manifest["valid"]:
            raise ValueError(f"[{stage_name}] data.validation_fraction={stage.data.validation_fraction} carved no "
                             f"validation images out of {manifest['unique_images']}; raise the fraction")
        log.info("[%s] validation: %d questions on %d images, image-disjoint from the %d training records",
                 stage_name, val_manifest["valid"], val_manifest["unique_images"], manifest["valid"])
        loop_config["validation"] = ray.put(_read_records(run_dir.data(val_name)))
        loop_config["num_validation"] = val_manifest["valid"]
    r = cfg.resources
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu,
                                               resources_per_worker=worker_resources(r)),
        run_config=ray.train.RunConfig(
            name=stage_name, storage_path=str(run_dir.checkpoints()),  # a folder or a URI (s3://…)
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2), callbacks=callbacks))
    t0 = time.perf_counter()
    result = trainer.fit()
    summary = {"stage": stage_name, "records": manifest["valid"], "rejected": manifest["rejected"],
               "seconds": round(time.perf_counter() - t0, 1), "final_metrics": result.metrics,
               "checkpoint": result.checkpoint.path if result.checkpoint else None}
    return summary


def run_two_stage(cfg: Config, ray_temp_dir: str | None = None, callbacks: list | None = None) -> StoragePath:
    """The main job: both stages (or the enabled one), ending in a self-describing run directory. ``callbacks`` go
    to every stage's TorchTrainer."""
    from medvqa.faults import export_driver_pgid, faults_from_env, fire, parse_faults
    from medvqa.model import resolve_model_path
    from medvqa import observe
    from medvqa.runs import prepare_run_dir, read_json, write_json

    rd = prepare_run_dir(cfg)
    log.info("run dir: %s", rd.path)
    model_path = resolve_model_path(cfg.model)  # builds the tiny model once, before workers race for it
    export_driver_pgid()
    init_ray(cfg, ray_temp_dir)
    fault_env = faults_from_env()
    faults = parse_faults(fault_env["faults"])
    summaries = []
    for stage_name, _ in cfg.stages():
        if (rd.adapter(stage_name) / "adapter_config.json").exists():
            log.info("[%s] already finished (%s): skipping", stage_name, rd.adapter(stage_name))
            continue
        observe.record(rd, {"stage": stage_name, "event": "start"})
        summary = fit_stage(cfg, stage_name, rd, model_path, callbacks)
        observe.record(rd, {"stage": stage_name, "event": "end", "seconds": summary["seconds"]})
        summaries.append(summary)
        fire(faults, stage_name, rd, fault_env["pgid"], end=None)
    write_json(rd.stages_summary, read_json(rd.stages_summary, []) + summaries)
    # One data manifest for the run: per stage, what was read, kept and rejected (and where the rejects are).
    write_json(rd.manifest, {name: read_json(rd.data(name) / "manifest.json") for name, _ in cfg.stages()})
    log.info("done: %s", rd.path)
    return rd.path
