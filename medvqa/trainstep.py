"""One optimizer step and the state that makes a resumed run exact, without Ray.

The Ray Train worker loop (``medvqa.train``) and the GPU benchmark (no Ray on that machine) call the same functions:

* ``epoch_geometry`` / ``total_steps``: records, micro-batches and optimizer steps per epoch on each worker. The last
  step of an epoch accumulates whatever micro-batches are left (fewer than ``grad_accum`` when they do not divide).
* ``build_optimizer`` / ``build_scheduler``: AdamW over the trainable parameters, the stage's schedule over the
  stage's steps.
* ``optimizer_step``: forward and backward of one step's micro-batches, each loss scaled by 1/n for the n micro-batches
  actually accumulated (a mean, also for a short last step), gradients all-reduced on the last micro-batch only (DDP
  ``no_sync`` on the others), clipping, optimizer and scheduler step.
* ``seed_everything`` / ``rng_state`` / ``set_rng_state``: python, numpy, torch CPU and CUDA generators, as tensors.
* ``save_checkpoint`` / ``load_checkpoint``: a checkpoint folder -- the trainable adapter (safetensors) and
  ``train_state.pt`` (optimizer, scheduler, progress) from rank 0, ``rng_rank<r>.pt`` from every rank -- read back
  with ``torch.load(weights_only=True)``: a checkpoint holding anything but tensors and plain containers is refused
  (``CheckpointError``), since unpickling it could run code.

Progress is ``{"step", "epoch", "micro_in_epoch"}``: optimizer steps taken, the epoch under way and the micro-batches of
it already trained on (a checkpoint at an epoch's end records the next epoch at 0). With the data order a pure function
of the seed and the epoch (``medvqa.data.pipeline.rank_plan``), that position says exactly which records are done.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import math
import pickle
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from medvqa.config import StageConfig

STATE_FILE = "train_state.pt"  # optimizer, scheduler, progress (rank 0); the adapter sits beside it in adapter/
ADAPTER_DIR = "adapter"
STATE_FORMAT = 2  # bumped when the state's layout changes; an older checkpoint is refused with a clear error


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be (safely) resumed from; the message says why and what to do."""


# ------------------------------------------------------------------------------------------------ epochs


@dataclass(frozen=True)
class EpochGeometry:
    """One worker's epoch: ``records`` (every worker gets the same number), ``micro_batches`` of ``batch_size`` (the
    last may be short) and ``steps`` optimizer steps of ``grad_accum`` micro-batches (the last may have fewer)."""

    records: int
    batch_size: int
    grad_accum: int

    @property
    def micro_batches(self) -> int:
        return math.ceil(self.records / self.batch_size)

    @property
    def steps(self) -> int:
        return math.ceil(self.micro_batches / self.grad_accum)

    def micro_in_step(self, micro_done: int) -> int:
        """Micro-batches in the step that starts after ``micro_done`` of this epoch."""
        return min(self.grad_accum, self.micro_batches - micro_done)


def epoch_geometry(num_records: int, world_size: int, batch_size: int, grad_accum: int) -> EpochGeometry:
    """Each of ``world_size`` workers trains on ``num_records // world_size`` records per epoch (the epoch's last
    ``num_records % world_size`` records in its shuffled order sit out; a different few each epoch)."""
    per_worker = num_records // world_size
    if per_worker < 1:
        raise ValueError(f"{num_records} training records cannot be shared by {world_size} workers")
    return EpochGeometry(per_worker, batch_size, grad_accum)


def total_steps(geometry: EpochGeometry, epochs: float, max_steps: int | None = None) -> int:
    """Optimizer steps of a stage: ``ceil(steps per epoch x epochs)``, capped by ``max_steps``."""
    steps = max(1, math.ceil(geometry.steps * epochs))
    return min(steps, max_steps) if max_steps else steps


# ------------------------------------------------------------------------------------------------ step


def build_optimizer(model, stage: StageConfig):
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay)


def build_scheduler(optimizer, stage: StageConfig, num_steps: int):
    from transformers import get_scheduler

    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[stage.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=min(stage.warmup_steps, num_steps),
                         num_training_steps=num_steps)


def optimizer_step(model, batches: Iterable[dict], n_micro: int, optimizer, scheduler, max_grad_norm: float,
                   device, autocast_dtype=None) -> dict:
    """Train on the next ``n_micro`` micro-batches of ``batches`` (an iterator; exactly that many are taken) and step.

    ``model`` may be wrapped in DistributedDataParallel: the backward passes of all but the last micro-batch run under
    its ``no_sync`` (gradients accumulate locally; one all-reduce per step). Returns the step's mean loss, samples and
    (attended) tokens on this worker."""
    import torch

    if n_micro < 1:
        raise ValueError(f"a step needs at least one micro-batch, got {n_micro}")
    no_sync = getattr(model, "no_sync", None)
    loss_sum, samples, tokens, seen = 0.0, 0, 0, 0
    for i, batch in enumerate(itertools.islice(batches, n_micro)):
        seen += 1
        batch = {k: v.to(device) for k, v in batch.items()}
        with (no_sync() if no_sync is not None and i < n_micro - 1 else contextlib.nullcontext()):
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss = model(**batch).loss
            (loss / n_micro).backward()  # the mean over the micro-batches of this step
        loss_sum += loss.item()
        samples += batch["input_ids"].shape[0]
        tokens += int(batch["attention_mask"].sum())
    if seen != n_micro:
        raise RuntimeError(f"this optimizer step needs {n_micro} micro-batches; the data ran out after {seen}")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss_sum / n_micro, "samples": samples, "tokens": tokens}


# ------------------------------------------------------------------------------------------------ random state


def derived_seed(*parts) -> int:
    """A 32-bit seed from ``parts`` (e.g. the run seed and a worker rank), stable across processes and versions."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "big")


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also every CUDA device


def rng_state() -> dict:
    """This process's generators (python, numpy, torch CPU, every CUDA device once initialised) as tensors and plain
    values, so ``torch.load(weights_only=True)`` reads them back."""
    import torch

    version, py_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": torch.tensor(py_state, dtype=torch.int64), "python_version": version, "python_gauss": gauss,
             "numpy": torch.from_numpy(keys.astype(np.int64)), "numpy_kind": kind, "numpy_pos": int(pos),
             "numpy_has_gauss": int(has_gauss), "numpy_gauss": float(cached), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import torch

    random.setstate((state["python_version"], tuple(state["python"].tolist()), state["python_gauss"]))
    np.random.set_state((state["numpy_kind"], state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------ checkpoints


def load_safely(path: Path) -> dict:
    """``torch.load(path, weights_only=True)``: tensors, numbers, strings and containers only; anything that needs
    pickle to rebuild is a ``CheckpointError``."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: refusing to load: it holds Python objects that only pickle can rebuild, and unpickling can run "
            f"arbitrary code. medvqa's checkpoints hold tensors and plain values only, so this file was written by "
            f"other code or altered. Delete the checkpoint folder to train from the previous one. ({first})") from None


def save_checkpoint(folder: Path, model, optimizer, scheduler, progress: dict, rank: int) -> None:
    """Write this worker's part of a checkpoint into ``folder``: rank 0 the adapter and the train state (``progress``
    plus optimizer and scheduler), every rank its random-number state."""
    import torch

    from medvqa.model import save_adapter

    folder = Path(folder)
    if rank == 0:
        save_adapter(model, folder / ADAPTER_DIR)
        torch.save({"format": STATE_FORMAT, **progress, "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict()}, folder / STATE_FILE)
    torch.save(rng_state(), folder / f"rng_rank{rank}.pt")


def load_checkpoint(folder: Path, model, optimizer, scheduler, rank: int, expect: dict | None = None) -> dict:
    """Restore the trainable adapter, optimizer, scheduler and this rank's random state from ``folder``; return the
    state's progress and metadata (everything but optimizer and scheduler). ``expect``: keys the state must match
    (e.g. world size, records), else a ``CheckpointError`` naming them."""
    folder = Path(folder)
    state = load_safely(folder / STATE_FILE)
    if state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{folder}: train state format {state.get('format')!r}, this code reads "
                              f"{STATE_FORMAT}; resume it with the code that wrote it or start the stage afresh")
    wrong = {k: (state.get(k), v) for k, v in (expect or {}).items() if state.get(k) != v}
    if wrong:
        raise CheckpointError(f"{folder}: written for a different setup: " + ", ".join(
            f"{k}={was!r} there, {now!r} here" for k, (was, now) in wrong.items()))
    rng_file = folder / f"rng_rank{rank}.pt"
    if not rng_file.exists():
        raise CheckpointError(f"{folder}: no random state for worker {rank} ({rng_file.name})")
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from medvqa.model import trainable_adapter

    weights = load_file(str(folder / ADAPTER_DIR / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights, adapter_name=trainable_adapter(model))
    if getattr(result, "unexpected_keys", None):
        raise CheckpointError(f"{folder}: adapter weights that this model lacks: {result.unexpected_keys[:5]}")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(load_safely(rng_file))
    return {k: v for k, v in state.items() if k not in ("optimizer", "scheduler")}


def adapter_max_abs_diff(a: dict, b: dict) -> float:
    """max |a - b| over two adapters' tensors (``safetensors.torch.load_file`` outputs) with the same keys."""
    if a.keys() != b.keys():
        raise ValueError(f"adapters differ in keys: {sorted(set(a) ^ set(b))[:5]}")
    return max((float((a[k].double() - b[k].double()).abs().max()) for k in a), default=0.0)
