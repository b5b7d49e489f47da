"""Exact resume without Ray: the optimizer step (accumulation scale, DDP no_sync), the seeded data order and its
resume position, checkpoint state (RNG, weights_only loading) and the fault-injection knob."""

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from medvqa import trainstep
from medvqa.config import load_config
from medvqa.data import pipeline
from medvqa.faults import parse_faults


# ------------------------------------------------------------------------------------------------- the step


class _Out:
    def __init__(self, loss):
        self.loss = loss


class _Regression(torch.nn.Module):
    """A model with the call signature of the VLM (``model(**batch).loss``): mean squared error of a linear map."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(4, 1)

    def forward(self, input_ids, attention_mask, labels):
        return _Out(((self.linear(input_ids) - labels) ** 2).mean())


def _micro_batches(n, rows=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randn(rows, 4, generator=g), "attention_mask": torch.ones(rows, 2, dtype=torch.long),
             "labels": torch.randn(rows, 1, generator=g)} for _ in range(n)]


def _sgd(model):
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def test_epoch_geometry_steps_the_partial_accumulation():
    # Paper stage 2: 1,797 VQA-RAD records, micro-batch 2, 8 accumulated: 899 micro-batches, 113 steps (not 112).
    g = trainstep.epoch_geometry(1797, 1, 2, 8)
    assert (g.micro_batches, g.steps) == (899, 113)
    assert g.micro_in_step(8 * 112) == 3  # the last step of the epoch accumulates the 3 left
    assert trainstep.total_steps(g, epochs=2) == 226 and trainstep.total_steps(g, 2, max_steps=100) == 100
    assert trainstep.epoch_geometry(1797, 2, 2, 4).records == 898  # per worker; one record sits out per epoch


def test_a_short_step_is_the_mean_over_the_micro_batches_it_has():
    """3 micro-batches in a step of up to 8: the update is the mean of their gradients (not their sum / 8)."""
    batches = _micro_batches(3)
    model = _Regression()
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    for b in batches:
        grads = torch.autograd.grad(model(**b).loss, list(model.parameters()))
        for (n, _), g in zip(model.named_parameters(), grads):
            expected[n] -= g / 3  # SGD, lr 1
    optimizer, scheduler = _sgd(model)
    stats = trainstep.optimizer_step(model, iter(batches), 3, optimizer, scheduler, 0.0, torch.device("cpu"))
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n])
    assert stats["samples"] == 9 and scheduler.last_epoch == 1 and all(p.grad is None for p in model.parameters())
    with pytest.raises(RuntimeError, match="needs 2 micro-batches; the data ran out after 1"):
        trainstep.optimizer_step(model, iter(batches[:1]), 2, optimizer, scheduler, 0.0, torch.device("cpu"))


def _ddp_worker(rank, world, init_file, out_dir):
    """One of two gloo ranks: an optimizer step of 3 micro-batches through DDP, counting gradient all-reduces."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = torch.nn.parallel.DistributedDataParallel(_Regression())
    calls = []

    def counting_allreduce(state, bucket):
        calls.append(1)
        return allreduce_hook(state, bucket)

    model.register_comm_hook(None, counting_allreduce)
    optimizer, scheduler = _sgd(model)
    trainstep.optimizer_step(model, iter(_micro_batches(3, seed=rank)), 3, optimizer, scheduler, 0.0,
                             torch.device("cpu"))
    torch.save({"calls": len(calls), "weight": model.module.linear.weight.detach()}, Path(out_dir) / f"{rank}.pt")
    dist.destroy_process_group()


def test_ddp_all_reduces_once_per_optimizer_step(tmp_path):
    """Two gloo workers: the gradients of 3 accumulated micro-batches are all-reduced once (no_sync on the first two),
    and both workers end with the update of the mean over all 6 micro-batches."""
    torch.multiprocessing.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                                          start_method="fork")  # CPU only: forking skips re-importing torch
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    assert [r["calls"] for r in results] == [1, 1]  # one bucket, synced on the last micro-batch only
    model = _Regression()
    optimizer, scheduler = _sgd(model)
    trainstep.optimizer_step(model, iter(_micro_batches(3, seed=0) + _micro_batches(3, seed=1)), 6, optimizer,
                             scheduler, 0.0, torch.device("cpu"))
    for r in results:
        torch.testing.assert_close(r["weight"], model.linear.weight.detach())


# ------------------------------------------------------------------------------------------------- random state


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    import random

    trainstep.seed_everything(3)
    torch.save(trainstep.rng_state(), tmp_path / "rng.pt")
    first = (random.random(), np.random.rand(), torch.rand(2), torch.nn.functional.dropout(torch.ones(8), 0.5))
    trainstep.seed_everything(99)
    trainstep.set_rng_state(trainstep.load_safely(tmp_path / "rng.pt"))
    again = (random.random(), np.random.rand(), torch.rand(2), torch.nn.functional.dropout(torch.ones(8), 0.5))
    assert first[:2] == again[:2] and all(torch.equal(a, b) for a, b in zip(first[2:], again[2:]))


class Payload:
    """Stands for anything a tampered checkpoint could make pickle build (and run)."""


def test_a_checkpoint_holding_a_pickled_object_is_refused(tmp_path):
    torch.save({"format": trainstep.STATE_FORMAT, "step": 1, "extra": Payload()}, tmp_path / trainstep.STATE_FILE)
    with pytest.raises(trainstep.CheckpointError, match=r"refusing to load: .*only pickle can rebuild"):
        trainstep.load_checkpoint(tmp_path, None, None, None, rank=0)


# ------------------------------------------------------------------------------------------------- checkpoints


def _encoded_batches(processor, n, seed):
    from medvqa.data.phantoms import phantom_records
    from medvqa.data.pipeline import collate_fn_for, decode_image, encode_example

    collate = collate_fn_for(processor)
    rows = [encode_example(processor, decode_image(r["image"]), "Answer briefly.", r["prompt"], r["target"], 160)
            for r in phantom_records("vqa", 2 * n, seed=seed)]
    return [collate({k: [e[k] for e in rows[i:i + 2]] for k in rows[0]}) for i in range(0, 2 * n, 2)]


def test_a_resumed_step_sequence_equals_an_uninterrupted_one(tiny_model_dir, tmp_path):
    """4-bit tiny Idefics2 with LoRA dropout 0.1: 3 steps straight vs 1 step, checkpoint, a fresh model (other random
    state) restored from it, 2 steps. Adapter, optimizer moments and dropout masks must all come back: the adapters
    are bitwise equal."""
    from medvqa.data.pipeline import cached_processor
    from medvqa.model import load_model

    cfg = load_config("tiny", [f"model.name_or_path={tiny_model_dir}", "lora.dropout=0.1"])
    batches = _encoded_batches(cached_processor(str(tiny_model_dir), False, None), 6, seed=4)
    cpu = torch.device("cpu")

    def fresh(seed):
        trainstep.seed_everything(seed)
        model = load_model(cfg)
        optimizer = trainstep.build_optimizer(model, cfg.stage2)
        return model, optimizer, trainstep.build_scheduler(optimizer, cfg.stage2, 3)

    def lora(model):
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    model, optimizer, scheduler = fresh(0)
    it = iter(batches)
    trainstep.optimizer_step(model, it, 2, optimizer, scheduler, 1.0, cpu)
    trainstep.save_checkpoint(tmp_path, model, optimizer, scheduler, {"step": 1, "epoch": 0, "micro_in_epoch": 2},
                              rank=0)
    for _ in range(2):
        trainstep.optimizer_step(model, it, 2, optimizer, scheduler, 1.0, cpu)
    straight = lora(model)

    model, optimizer, scheduler = fresh(1)  # another LoRA init and random state, all to be overwritten
    state = trainstep.load_checkpoint(tmp_path, model, optimizer, scheduler, rank=0, expect={"step": 1})
    assert (state["epoch"], state["micro_in_epoch"]) == (0, 2)
    it = iter(batches[2:])
    for _ in range(2):
        trainstep.optimizer_step(model, it, 2, optimizer, scheduler, 1.0, cpu)
    resumed = lora(model)
    assert trainstep.adapter_max_abs_diff(straight, resumed) == 0.0
    with pytest.raises(trainstep.CheckpointError, match="world_size=None there, 2 here"):
        trainstep.load_checkpoint(tmp_path, model, optimizer, scheduler, rank=0, expect={"world_size": 2})


# ------------------------------------------------------------------------------------------------- data order


def _records(folder: Path, n: int, group: int, per_file: int, name=lambda i: f"part-{i}") -> Path:
    """Prepared-record parquet files: ``n`` records, row groups of ``group``, ``per_file`` records per file."""
    folder.mkdir(parents=True, exist_ok=True)
    for f, lo in enumerate(range(0, n, per_file)):
        ids = [f"r{i:04d}" for i in range(lo, min(lo + per_file, n))]
        table = pa.table({"id": ids, "image": [i.encode() for i in ids], "prompt": ids, "target": ids})
        pq.write_table(table, folder / f"{name(f)}.parquet", row_group_size=group)
    return folder


def _read_ids(plan) -> list[str]:
    return [i for task in plan for i in pipeline._read_planned(pa.Table.from_pylist([task]))["id"].to_pylist()]


@pytest.fixture(scope="module")
def records(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setattr(pipeline, "SHUFFLE_WINDOW", 40)
    return _records(tmp_path_factory.mktemp("records"), n=203, group=16, per_file=64)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_every_epoch_is_a_seeded_permutation(records):
    index = pipeline.record_index(records)
    epoch0 = _read_ids(pipeline.rank_plan(index, seed=0, epoch=0))
    assert sorted(epoch0) == [f"r{i:04d}" for i in range(203)]  # every record once
    assert epoch0 == _read_ids(pipeline.rank_plan(index, seed=0, epoch=0))  # reproducible
    assert epoch0 != _read_ids(pipeline.rank_plan(index, seed=0, epoch=1))  # reshuffled per epoch ...
    assert epoch0 != _read_ids(pipeline.rank_plan(index, seed=1, epoch=0))  # ... and per seed
    # Shuffled across the whole set, not only within files: the first 40 span most of the 4 files' id ranges.
    assert len({int(i[1:]) // 64 for i in epoch0[:40]}) >= 3


def test_workers_split_an_epoch_evenly_and_resume_mid_epoch(records):
    index = pipeline.record_index(records)
    full = _read_ids(pipeline.rank_plan(index, 0, 2))
    ranks = [_read_ids(pipeline.rank_plan(index, 0, 2, rank=r, world=2)) for r in range(2)]
    assert [len(r) for r in ranks] == [101, 101] and not set(ranks[0]) & set(ranks[1])
    assert ranks[0] == full[0:202:2] and ranks[1] == full[1:202:2]  # positions i % world == rank
    for start in (1, 37, 100):  # a resumed worker reads exactly the rest of its order, nothing before it
        plan = pipeline.rank_plan(index, 0, 2, rank=1, world=2, start=start)
        assert _read_ids(plan) == ranks[1][start:]
        assert sum(len(t["rows"]) for t in plan) == 101 - start
    assert pipeline.rank_plan(index, 0, 2, rank=1, world=2, start=101) == []
    # Every resume point of one worker, including those that leave a window's last record or two (most of its row
    # groups then go unread).
    for start in range(203):
        assert _read_ids(pipeline.rank_plan(index, 0, 2, start=start)) == full[start:], start


def test_the_order_does_not_depend_on_file_names(records, tmp_path):
    """Ray names the parquet files it writes with a random id: a re-prepared stage must order the same."""
    renamed = _records(tmp_path / "again", n=203, group=16, per_file=64, name=lambda i: f"{'zyxw'[i]}-{os.getpid()}")
    a, b = pipeline.record_index(records), pipeline.record_index(renamed)
    assert _read_ids(pipeline.rank_plan(a, 5, 3)) == _read_ids(pipeline.rank_plan(b, 5, 3))


# ------------------------------------------------------------------------------------------------- faults


def test_fault_specs_parse_or_fail_loudly():
    faults = parse_faults("stage1:step=3:driver, stage2:val_round=1:worker,stage1:end:driver")
    assert [(f.stage, f.point, f.value, f.target) for f in faults] == [
        ("stage1", "step", 3, "driver"), ("stage2", "val_round", 1, "worker"), ("stage1", "end", None, "driver")]
    assert [(f.stage, f.point, f.value, f.target) for f in parse_faults("stage2:step=7:hold,eval:batch=3:hold")] == [
        ("stage2", "step", 7, "hold"), ("eval", "batch", 3, "hold")]
    assert parse_faults("") == []
    for bad in ("stage3:step=1:driver", "stage1:step=x:driver", "stage1:epoch=1:driver", "stage1:step=1",
                "stage1:end:worker", "stage1:end:hold", "eval:step=1:hold", "stage2:batch=1:worker",
                "eval:batch=1:node"):
        with pytest.raises(ValueError, match="MEDVQA_FAULT: bad spec"):
            parse_faults(bad)


def test_a_fired_fault_does_not_fire_again(tmp_path, monkeypatch):
    """Firing records the fault in metrics.jsonl before the kill; the same spec on a re-run is skipped."""
    from medvqa import faults
    from medvqa.runs import read_metrics

    exits = []
    monkeypatch.setattr(os, "_exit", lambda code: exits.append(code))
    spec = parse_faults("stage2:step=5:worker")
    faults.fire(spec, "stage2", tmp_path, pgid=0, step=4)
    assert exits == []
    waited = []
    faults.fire(spec, "stage2", tmp_path, pgid=0, step=5, wait=lambda: waited.append(1))
    assert exits == [1] and waited == [1]
    assert [r["fault"] for r in read_metrics(tmp_path) if r.get("event") == "fault"] == ["stage2:step=5:worker"]
    faults.fire(spec, "stage2", tmp_path, pgid=0, step=5)
    assert exits == [1]


def test_a_held_process_waits_to_be_removed_and_fails_if_it_is_not(tmp_path, monkeypatch):
    """``hold`` records the fault, then blocks so that a test can remove the process's node; left alone it raises
    instead of hanging."""
    from medvqa import faults
    from medvqa.runs import read_metrics

    slept = []
    monkeypatch.setattr(faults.time, "sleep", slept.append)
    monkeypatch.setattr(os, "_exit", lambda code: pytest.fail("a held process must not exit by itself"))
    with pytest.raises(RuntimeError, match="nobody removed this node"):
        faults.fire(parse_faults("eval:batch=2:hold"), "eval", tmp_path, pgid=0, batch=2)
    assert slept == [faults.HOLD_TIMEOUT_S]
    assert [r["fault"] for r in read_metrics(tmp_path) if r.get("event") == "fault"] == ["eval:batch=2:hold"]
