"""Integration on a local Ray: a tiny two-stage run (conftest's ``reference_run``) learns, trains only LoRA,
checkpoints, and is not retrained when re-run; rejects; two DDP workers. Resume after faults: test_resume_faults.py."""

import json
from pathlib import Path

import pytest

from medvqa.config import load_config
from medvqa.runs import read_metrics, run_id

pytestmark = pytest.mark.integration


def _adapter_weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def test_run_dir_is_self_describing(reference_run):
    cfg, run_dir = reference_run
    assert run_dir.name == run_id(cfg)
    for name in ("config.yaml", "environment.json", "metrics.jsonl", "stages.json", "manifest.json"):
        assert (run_dir / name).exists(), name
    manifests = json.loads((run_dir / "manifest.json").read_text())
    for stage in ("stage1", "stage2"):
        manifest = manifests[stage]
        assert manifest["valid"] > 0 and manifest["rejected"] == 0
        assert (run_dir / "adapters" / stage / "adapter_config.json").exists()
        ckpts = sorted((run_dir / "checkpoints" / stage).glob("step_*"))
        assert ckpts and {"train_state.pt", "rng_rank0.pt", "adapter"} <= {p.name for p in ckpts[-1].iterdir()}


def test_loss_falls_in_both_stages(reference_run):
    _, run_dir = reference_run
    for stage in ("stage1", "stage2"):
        losses = [m["loss"] for m in read_metrics(run_dir) if m.get("stage") == stage and "loss" in m]
        assert len(losses) >= 3, stage
        first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
        assert last < 0.8 * first, (stage, losses)


def test_only_lora_parameters_are_trained_and_they_change(reference_run):
    _, run_dir = reference_run
    s1 = _adapter_weights(run_dir / "adapters" / "stage1")
    s2 = _adapter_weights(run_dir / "adapters" / "stage2")
    assert s1 and all("lora_" in k for k in s1), "adapters must hold LoRA weights only (base stays frozen)"
    assert not any("vision_model" in k for k in s1)
    # LoRA B starts at zero: non-zero means stage 1 trained; 'continue' hand-off: stage 2 kept training the same keys
    assert any(v.abs().sum() > 0 for k, v in s1.items() if "lora_B" in k)
    assert s1.keys() == s2.keys()
    assert any(not (s1[k] == s2[k]).all() for k in s1)


def test_adapters_load_with_plain_peft(reference_run):
    from peft import PeftModel
    from transformers import Idefics2ForConditionalGeneration

    from medvqa.model import resolve_model_path

    cfg, run_dir = reference_run
    base = Idefics2ForConditionalGeneration.from_pretrained(resolve_model_path(cfg.model))
    model = PeftModel.from_pretrained(base, str(run_dir / "adapters" / "stage2"))
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0


def test_rerun_skips_finished_stages(reference_run, ray_local):
    from medvqa.train import run_two_stage

    cfg, run_dir = reference_run
    before = len(read_metrics(run_dir))
    assert run_two_stage(cfg) == run_dir
    assert len(read_metrics(run_dir)) == before  # nothing retrained


def _roco_folder(root: Path, n_ok: int, n_missing: int, n_corrupt: int) -> Path:
    """ROCO's original layout with some images present, some missing and some corrupt."""
    from data_fixtures import image_bytes

    rad = root / "train" / "radiology"
    (rad / "images").mkdir(parents=True)
    lines = []
    for i in range(n_ok + n_missing + n_corrupt):
        name = f"ROCO_{i:05d}"
        lines.append(f"{name}\t Axial CT of the chest number {i}.")
        if i < n_ok:
            (rad / "images" / f"{name}.jpg").write_bytes(image_bytes(seed=i))
        elif i < n_ok + n_corrupt:
            (rad / "images" / f"{name}.jpg").write_bytes(b"not a jpeg")
    (rad / "captions.txt").write_text("\n".join(lines) + "\n")
    return root


def test_rejects_are_written_counted_and_stop_the_run(ray_local, tmp_path, monkeypatch):
    from medvqa.config import DataConfig, ResourcesConfig
    from medvqa.data import pipeline
    from medvqa.data.pipeline import TooManyRejects, prepare_records

    monkeypatch.setattr(pipeline, "_DRIVER_CHUNK", 8)  # the driver hands the source to Ray Data in 3 chunks

    folder = _roco_folder(tmp_path / "roco", n_ok=20, n_missing=2, n_corrupt=1)
    data = DataConfig(kind="roco", path=str(folder), split="train", task="caption")
    manifest = prepare_records(data, tmp_path / "d1", tmp_path / "r1", ResourcesConfig(), max_reject_fraction=0.5)
    assert (manifest["total"], manifest["valid"], manifest["rejected"]) == (23, 20, 3)
    assert manifest["reject_reasons"] == {"missing image": 2, "corrupt image": 1}
    rejects = [json.loads(line) for line in Path(manifest["rejects_file"]).read_text().splitlines()]
    assert len(rejects) == 3 and all(r["reject_reason"] and "image" not in r for r in rejects)
    import pyarrow.parquet as pq

    ids = [i for f in (tmp_path / "d1").glob("*.parquet") for i in pq.read_table(f, columns=["id"])["id"].to_pylist()]
    assert sorted(ids) == sorted({*ids}) and len(ids) == 20  # every valid record once, across chunks

    with pytest.raises(TooManyRejects, match=r"3 of 23 records .*max_reject_fraction"):
        prepare_records(data, tmp_path / "d2", tmp_path / "r2", ResourcesConfig(), max_reject_fraction=0.05)
    assert (tmp_path / "r2.jsonl").exists()  # the evidence is kept even when the run stops


def test_two_ddp_workers_share_the_data(ray_local, tmp_path):
    """Two Train workers (DDP over gloo on CPU), each on its half of every epoch: the global batch, and so the number
    of optimizer steps, is the same as with one worker; each worker checkpoints its own random state."""
    from medvqa.trainstep import epoch_geometry, total_steps
    from medvqa.train import run_two_stage

    cfg = load_config("tiny_single_stage", [f"run.output_dir={tmp_path}", "resources.num_workers=2",
                                            "stage2.batch_size=2", "stage2.data.num_records=32", "stage2.epochs=1",
                                            "run.log_every_n_steps=1"])
    run_dir = run_two_stage(cfg)
    steps = [m["step"] for m in read_metrics(run_dir) if "loss" in m]
    assert max(steps) == total_steps(epoch_geometry(32, 2, 2, 1), 1) == 32 // cfg.stage2.global_batch_size
    (last,) = sorted((run_dir / "checkpoints" / "stage2").glob("step_*"))[-1:]
    assert {"rng_rank0.pt", "rng_rank1.pt", "train_state.pt"} <= {p.name for p in last.iterdir()}
    assert (run_dir / "adapters" / "stage2" / "adapter_model.safetensors").exists()
