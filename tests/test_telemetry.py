"""Which Ray metrics a record sets, with which tags (recorded by a stand-in for ray.util.metrics; the integration test
in test_observe.py reads the real ones from a node's metrics endpoint)."""

import sys
import types

import pytest

from medvqa import telemetry


@pytest.fixture
def recorded(monkeypatch):
    calls = []

    class Metric:
        def __init__(self, kind, name, tag_keys):
            self.kind, self.name, self.tag_keys = kind, name, tag_keys

        def set(self, value, tags):
            assert set(tags) == set(self.tag_keys)
            calls.append((self.name, value, tags))

        inc = set

    monkeypatch.setattr(telemetry, "active", lambda: True)
    monkeypatch.setattr(telemetry, "_metric", lambda kind, name, description, tag_keys=telemetry.TAGS:
                        Metric(kind, name, tag_keys))
    return calls


def test_a_step_record_sets_throughput_loss_and_gpu_memory(recorded, monkeypatch):
    fake_cuda = types.SimpleNamespace(is_available=lambda: True, device_count=lambda: 1,
                                      memory_allocated=lambda d: 3e9, max_memory_allocated=lambda d: 5e9)
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=fake_cuda))
    telemetry.record_training("tiny-abc", {"stage": "stage1", "step": 4, "total_steps": 9, "loss": 1.5, "lr": 1e-3,
                                           "samples_per_s": 20.0, "tokens_per_s": 800.0, "epoch": 0})
    tags = {"run": "tiny-abc", "stage": "stage1"}
    assert recorded == [
        ("medvqa_samples_per_s", 20.0, tags), ("medvqa_tokens_per_s", 800.0, tags), ("medvqa_loss", 1.5, tags),
        ("medvqa_lr", 1e-3, tags), ("medvqa_step", 4.0, tags),
        ("medvqa_gpu_memory_bytes", 3e9, {**tags, "device": "0", "kind": "allocated"}),
        ("medvqa_gpu_memory_bytes", 5e9, {**tags, "device": "0", "kind": "peak"})]


def test_validation_and_data_records(recorded, monkeypatch):
    monkeypatch.delitem(sys.modules, "torch", raising=False)  # a driver without torch: no GPU gauge
    telemetry.record_training("r", {"stage": "stage2", "event": "validation", "step": 3, "val_round": 1,
                                    "val_n": 12, "val_normalized_f1": 0.4, "val_normalized_f1_ci": [0.2, 0.6]})
    telemetry.record_training("r", {"stage": "stage2", "event": "data", "records": 20, "rejected": 1})
    tags = {"run": "r", "stage": "stage2"}
    assert recorded == [("medvqa_validation", 0.4, {**tags, "metric": "normalized_f1"}),
                        ("medvqa_records", 20.0, tags), ("medvqa_rejected_records", 1.0, tags)]


def test_evaluation_batches_count_answers_and_finished_cells(recorded):
    telemetry.record_evaluation("r", questions=24, seconds=2.0, cells_done=0)
    telemetry.record_evaluation("r", questions=8, seconds=0.5, cells_done=2)
    tags = {"run": "r", "stage": "eval"}
    assert recorded == [("medvqa_questions_per_s", 12.0, tags), ("medvqa_questions_answered", 24, tags),
                        ("medvqa_questions_per_s", 16.0, tags), ("medvqa_questions_answered", 8, tags),
                        ("medvqa_cells_done", 2, tags)]


def test_nothing_is_recorded_without_ray(monkeypatch):
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    monkeypatch.setattr(telemetry, "_metric", lambda *a, **k: pytest.fail("recorded without Ray"))
    assert not telemetry.active()
    telemetry.record_training("r", {"stage": "stage1", "loss": 1.0})
    telemetry.record_evaluation("r", questions=8, seconds=1.0, cells_done=1)
