"""Config: every preset loads and validates; overrides are typed; bad keys and values name the key."""

import re

import pytest
import yaml

from medvqa.config import (LORA_TARGET_REGEX, Config, ConfigError, dump_yaml, field_docs, from_dict, grad_accum_steps,
                           list_presets, load_config, parse_overrides, to_dict)


@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_loads_and_round_trips(preset):
    cfg = load_config(preset)
    assert cfg.stages(), preset
    assert from_dict(yaml.safe_load(dump_yaml(cfg))) == cfg


def test_presets_exist():
    assert {"tiny", "paper", "paper_single_stage", "tiny_single_stage"} <= set(list_presets())


def test_paper_preset_is_the_study():
    cfg = load_config("paper")
    assert cfg.model.name_or_path == "HuggingFaceM4/idefics2-8b"
    assert (cfg.model.quantization, cfg.model.compute_dtype, cfg.model.do_image_splitting) == ("4bit", "auto", False)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.init) == (8, 8, 0.1, "gaussian")
    assert cfg.lora.target_regex == LORA_TARGET_REGEX
    s1, s2 = cfg.stage1, cfg.stage2
    assert (s1.task, s1.lr, s1.epochs, s1.data.limit) == ("caption", 1e-5, 3, 55000)
    assert (s2.task, s2.lr, s2.epochs, s2.prompt) == ("vqa", 1e-4, 2, "Answer briefly.")
    for s in (s1, s2):
        assert (s.global_batch_size, s.batch_size, s.warmup_steps, s.weight_decay) == (16, 2, 50, 0.01)
        assert grad_accum_steps(s, cfg.resources) == 8  # 2 per GPU x 8 accumulated x 1 GPU
    assert cfg.run.handoff == "continue"


def test_global_batch_is_the_experiment_and_grad_accum_follows():
    # More workers: fewer micro-batches each, the same 16 examples per optimizer step.
    cfg = load_config("paper", ["resources.num_workers=2"])
    assert grad_accum_steps(cfg.stage2, cfg.resources) == 4
    # A batch the workers cannot share evenly, or an explicit grad_accum that disagrees: errors naming the keys.
    with pytest.raises(ConfigError, match=r"stage1\.global_batch_size=16 .* stage1\.batch_size x "
                                          r"resources\.num_workers = 2 x 3"):
        load_config("paper", ["resources.num_workers=3"])
    with pytest.raises(ConfigError, match=r"stage1\.grad_accum=8 disagrees .* = 4"):
        load_config("paper", ["resources.num_workers=2", "stage1.grad_accum=8"])
    assert load_config("paper", ["stage1.grad_accum=8"]).stage1.grad_accum == 8  # stated and consistent: fine
    # A config written before global_batch_size existed (batch x accum x workers) still loads.
    old = to_dict(load_config("tiny"))
    for name in ("stage1", "stage2"):
        old[name].pop("global_batch_size")
        old[name].update(batch_size=2, grad_accum=3)
    assert from_dict(old).stage2.global_batch_size == 6


def test_single_stage_baselines_share_the_stage2_budget():
    for two, one in (("paper", "paper_single_stage"), ("tiny", "tiny_single_stage")):
        a, b = load_config(two), load_config(one)
        assert not b.stage1.enabled and [n for n, _ in b.stages()] == ["stage2"]
        assert a.stage2 == b.stage2 and a.model == b.model and a.lora == b.lora


def test_target_regex_selects_text_and_connector_never_vision():
    pat = re.compile(LORA_TARGET_REGEX)
    yes = ["model.text_model.layers.0.self_attn.q_proj", "model.text_model.layers.1.mlp.down_proj",
           "model.connector.modality_projection.gate_proj",
           "model.connector.perceiver_resampler.layers.0.self_attn.o_proj"]
    no = ["model.vision_model.encoder.layers.0.self_attn.q_proj", "model.vision_model.encoder.layers.0.mlp.fc1",
          "lm_head", "model.text_model.layers.0.self_attn"]
    assert all(pat.fullmatch(n) for n in yes)
    assert not any(pat.fullmatch(n) for n in no)


def test_overrides_are_typed():
    cfg = load_config("tiny", ["stage2.lr=1e-4", "lora.r=16", "stage1.enabled=false", "stage2.data.limit=10",
                               "run.handoff=merge"])
    assert (cfg.stage2.lr, cfg.lora.r, cfg.stage1.enabled, cfg.stage2.data.limit) == (1e-4, 16, False, 10)
    assert cfg.run.handoff == "merge"
    assert parse_overrides(["a.b=1", "a.c=x"]) == {"a": {"b": 1, "c": "x"}}
    assert load_config("tiny", ["resources.worker_resource=medvqa_worker"]).resources.worker_resource == "medvqa_worker"


@pytest.mark.parametrize("override, message", [
    ("stage2.lrr=1", "stage2.lrr"),
    ("nope=1", "nope"),
    ("lora.r=eight", "lora.r"),
    ("lora.r=1.5", "lora.r"),
    ("stage1.enabled=maybe", "stage1.enabled"),
    ("run.handoff=fuse", "run.handoff"),
    ("stage2.data.kind=csv", "stage2.data.kind"),
    ("stage2.batch_size=0", "stage2.batch_size"),
    ("lora.dropout=1.5", "lora.dropout"),
    ("stage2.data.kind=vqa_rad", "stage2.data.path"),
    ("stage2", "key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("tiny", [override])


def test_nothing_to_train_is_an_error():
    with pytest.raises(ConfigError, match="nothing to train"):
        load_config("tiny", ["stage1.enabled=false", "stage2.enabled=false"])


def test_unknown_preset_lists_known():
    with pytest.raises(ConfigError, match="tiny"):
        load_config("does-not-exist")


def test_yaml_path_preset(tmp_path):
    path = tmp_path / "best.yaml"
    path.write_text(dump_yaml(load_config("tiny", ["lora.r=4"])))
    assert load_config(str(path)).lora.r == 4


def test_every_field_is_documented():
    missing = [key for key, _, text in field_docs(Config()) if not text]
    assert not missing, missing


def test_config_module_imports_no_heavy_libraries():
    import subprocess
    import sys

    code = "import sys, medvqa.config; print(any(m in sys.modules for m in ('torch', 'ray', 'transformers')))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_eval_section_is_typed_config():
    """`medvqa eval` settings are the eval.* section: documented, dotted overrides, conditions as a list or
    comma-separated (the condition 'true' survives YAML's boolean), bad values name the key."""
    keys = {key for key, _, _ in field_docs(Config()) if key.startswith("eval.")}
    assert {"eval.conditions", "eval.max_new_tokens", "eval.concurrency", "eval.cpus_per_actor", "eval.gpus_per_actor",
            "eval.batch_size", "eval.feature_cache_mb", "eval.medhalt_path", "eval.ood_path"} <= keys
    assert load_config("tiny").eval.conditions == ["true", "swapped", "blank", "expert", "few_shot", "medhalt", "ood"]
    assert load_config("tiny").eval.models == ["base", "single_stage", "two_stage"]
    assert load_config("tiny", ["eval.conditions=true"]).eval.conditions == ["true"]
    assert load_config("tiny", ["eval.conditions=true,ood"]).eval.conditions == ["true", "ood"]
    assert load_config("tiny", ["eval.conditions=[true, swapped]"]).eval.conditions == ["true", "swapped"]
    cfg = load_config("tiny", ["resources.use_gpu=true", "eval.gpus_per_actor=0.25", "eval.max_new_tokens=4"])
    assert (cfg.eval.gpus_per_actor, cfg.eval.max_new_tokens) == (0.25, 4)
    assert from_dict(yaml.safe_load(dump_yaml(cfg))) == cfg
    for bad, key in (("eval.conditions=true,nope", "eval.conditions[1]"), ("eval.conditions=true,true",
                     "eval.conditions"), ("eval.max_new_tokens=0", "eval.max_new_tokens"),
                     ("eval.gpus_per_actor=0.5", "eval.gpus_per_actor"), ("eval.cpus_per_actor=0", "eval.cpus_per_actor"),
                     ("eval.few_shot_k=0", "eval.few_shot_k"), ("eval.models=base,nope", "eval.models[1]"),
                     ("eval.protocol=clean", "eval.protocol")):
        with pytest.raises(ConfigError, match=re.escape(key)):
            load_config("tiny", [bad])


def test_phantom_anatomies_match_the_generator():
    import typing

    from medvqa.config import PhantomAnatomy
    from medvqa.data.phantoms import MODALITIES, OOD_MODALITIES, ORGANS

    assert set(typing.get_args(PhantomAnatomy)) == {""} | {f"{m}/{o}" for m in MODALITIES + OOD_MODALITIES
                                                                      for o in ORGANS}
