"""The tiny Idefics2, quantization, LoRA targets, the bitsandbytes CPU gradient guard, stage hand-offs and adapter
save/load, all offline on CPU with the real transformers/PEFT/bitsandbytes classes."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from medvqa.config import load_config
from medvqa.tiny import CHAT_TEMPLATE, build_tiny, make_tiny, tiny_model_path


# ------------------------------------------------------------------------------------------------- helpers


def _cfg(model_dir, *overrides):
    # dropout 0: forward passes in train mode are deterministic, so gradients and outputs can be compared exactly
    return load_config("tiny", [f"model.name_or_path={model_dir}", "lora.dropout=0.0", *overrides])


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def batch(processor):
    """Two training examples (prompt + answer), labels on every token: enough signal for every LoRA weight."""
    rng = np.random.default_rng(0)
    texts, images = [], []
    for question, answer in (("Is there a lesion in the left lung?", "yes"), ("Which organ is shown?", "liver")):
        texts.append(processor.apply_chat_template([
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]}]))
        images.append([Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))])
    enc = dict(processor(text=texts, images=images, return_tensors="pt", padding=True))
    enc["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return enc


def _perturb_lora_b(model, seed=1, scale=0.1):
    """LoRA B starts at zero, which makes A's gradient zero too; random B exercises every LoRA gradient."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name and p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def _lora_grads(model, batch):
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _logits(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def _load(cfg, **kw):
    from medvqa.model import load_model

    torch.manual_seed(0)
    return load_model(cfg, **kw)


# ------------------------------------------------------------------------------------------------- tiny model


def test_same_seed_builds_identical_model_and_tokenizer(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    again = build_tiny(tmp_path / "again", seed=0)
    other = build_tiny(tmp_path / "other", seed=1)
    ref = load_file(tiny_model_dir / "model.safetensors")
    same = load_file(again / "model.safetensors")
    assert ref.keys() == same.keys() and all(torch.equal(ref[k], same[k]) for k in ref)
    assert (tiny_model_dir / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()
    diff = load_file(other / "model.safetensors")
    assert not torch.equal(ref["lm_head.weight"], diff["lm_head.weight"])


def test_reload_gives_identical_logits(tiny_model_dir, batch):
    from transformers import Idefics2ForConditionalGeneration

    built, _ = make_tiny(seed=0)
    loaded = Idefics2ForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    assert sum(p.numel() for p in loaded.parameters()) < 1_000_000
    torch.testing.assert_close(_logits(loaded, batch), _logits(built, batch), rtol=0, atol=0)


def test_special_tokens_ids_and_chat_template(tiny_model_dir, processor):
    from transformers import Idefics2ForConditionalGeneration

    tok = processor.tokenizer
    config = Idefics2ForConditionalGeneration.from_pretrained(tiny_model_dir).config
    ids = {t: tok.convert_tokens_to_ids(t) for t in
           ("<image>", "<fake_token_around_image>", "<end_of_utterance>", "<pad>", "<s>", "</s>")}
    assert len(set(ids.values())) == 6 and tok.unk_token_id not in ids.values()
    assert config.image_token_id == ids["<image>"] == processor.image_token_id
    assert config.text_config.pad_token_id == tok.pad_token_id == ids["<pad>"]
    assert (config.text_config.bos_token_id, config.text_config.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    assert config.text_config.vocab_size == len(tok) and 1000 <= len(tok) <= 2000
    for word in ("lesion", "nodule", "radiograph", "abdomen", "modality"):  # radiology words are single tokens
        assert len(tok(" " + word, add_special_tokens=False)["input_ids"]) == 1
    assert processor.image_processor.do_image_splitting is False and processor.image_seq_len == 8
    assert processor.chat_template == CHAT_TEMPLATE
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a mass?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "no"}]}]
    assert processor.apply_chat_template(messages) == \
        "User:<image>Is there a mass?<end_of_utterance>\nAssistant: no<end_of_utterance>\n"
    assert processor.apply_chat_template(messages[:1], add_generation_prompt=True) == \
        "User:<image>Is there a mass?<end_of_utterance>\nAssistant:"
    image = Image.new("RGB", (80, 50))
    enc = processor(text=["User:<image>hi"], images=[[image]])
    assert enc["input_ids"][0][0] == tok.bos_token_id
    assert sum(i == ids["<image>"] for i in enc["input_ids"][0]) == 8
    assert "<image>" in tok.decode(enc["input_ids"][0])


def test_tiny_model_path_uses_the_winner_of_a_build_race(tmp_path, tiny_model_dir, monkeypatch):
    import shutil

    import medvqa.tiny as tiny

    final = tmp_path / f"tiny-idefics2-{tiny.VERSION}-seed0"

    def racing_build(out_dir, seed=0):  # another worker finishes first while this one builds
        shutil.copytree(tiny_model_dir, final)
        (final / "winner").touch()
        return shutil.copytree(tiny_model_dir, out_dir, dirs_exist_ok=True)

    monkeypatch.setattr(tiny, "build_tiny", racing_build)
    assert tiny_model_path(str(tmp_path), 0) == final and (final / "winner").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [final.name]  # the loser's temp folder is gone
    assert tiny_model_path(str(tmp_path), 0) == final  # cached: no rebuild


# ------------------------------------------------------------------------------------------------- LoRA, 4-bit


def test_lora_targets_text_and_connector_never_vision(tiny_model_dir):
    model = _load(_cfg(tiny_model_dir))
    wrapped = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert wrapped
    groups = ("text_model", "connector.modality_projection", "connector.perceiver_resampler")
    assert all(any(g in n for g in groups) for n in wrapped)
    assert not any("vision_model" in n for n in wrapped)
    for layer in range(2):
        for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            assert f"model.text_model.layers.{layer}.{proj}" in " ".join(wrapped)
    assert any("modality_projection" in n for n in wrapped) and any("perceiver_resampler" in n for n in wrapped)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_4bit_on_cpu_training_step_changes_only_lora(tiny_model_dir, batch):
    import bitsandbytes as bnb

    from medvqa.model import describe_trainable

    model = _load(_cfg(tiny_model_dir))
    quantized = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert any("vision_model" in n for n in quantized) and any("text_model" in n for n in quantized)
    assert not any(n.endswith("lm_head") for n in quantized)  # kept in compute dtype
    summary = describe_trainable(model)
    assert "4-bit NF4 (double quant), compute float32" in summary and "vision_model 0/" in summary
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model.train()
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed and all("lora_B" in n for n in changed)  # B starts at 0, so only B moves in step one
    assert changed == {n for n, p in after.items() if "lora_B" in n}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_guard_4bit_lora_grads_unchanged_by_an_eval_pass(tiny_model_dir, batch, checkpointing):
    """An eval forward must not change later LoRA gradients (bitsandbytes repacks 4-bit weights on CPU)."""
    cfg = _cfg(tiny_model_dir, f"model.gradient_checkpointing={str(checkpointing).lower()}")
    fresh = _load(cfg)
    _perturb_lora_b(fresh)
    fresh.train()
    expected = _lora_grads(fresh, batch)

    evaluated = _load(cfg)
    _perturb_lora_b(evaluated)
    evaluated.eval()
    _logits(evaluated, batch)
    evaluated.train()
    got = _lora_grads(evaluated, batch)
    assert expected.keys() == got.keys() and len(got) == 62
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], msg=name)


def test_guard_fails_without_the_fix(tiny_model_dir, batch):
    """The same comparison with bitsandbytes' default restored: gradients differ. This shows the fix is what makes
    the guard pass (and will flag when a bitsandbytes release fixes the bug, so the workaround can go)."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.xfail("this CPU lacks AVX512-BF16: bitsandbytes never repacks here, so the bug cannot reproduce")
    cfg = _cfg(tiny_model_dir)
    fresh = _load(cfg)
    _perturb_lora_b(fresh)
    expected = _lora_grads(fresh.train(), batch)

    model = _load(cfg)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = True  # bitsandbytes' default on this CPU
    _perturb_lora_b(model)
    model.eval()
    _logits(model, batch)
    got = _lora_grads(model.train(), batch)
    differ = [n for n in expected if not torch.allclose(got[n], expected[n])]
    assert len(differ) > len(expected) // 2, "bitsandbytes no longer corrupts gradients after eval: drop the fix?"


def test_full_precision_lora(tiny_model_dir, batch):
    import bitsandbytes as bnb

    from medvqa.model import describe_trainable

    model = _load(_cfg(tiny_model_dir, "model.quantization=none"))
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert "full precision float32" in describe_trainable(model)
    _perturb_lora_b(model)
    grads = _lora_grads(model.train(), batch)
    assert len(grads) == 62 and all(g.abs().sum() > 0 for g in grads.values())


# ------------------------------------------------------------------------------------------------- hand-off


@pytest.fixture(scope="module")
def stage1_adapter(tiny_model_dir, tmp_path_factory):
    """A 'trained' stage-1 adapter: random B so it changes the outputs, saved with save_adapter."""
    from medvqa.model import save_adapter

    model = _load(_cfg(tiny_model_dir, "lora.dropout=0.3"))  # dropout: the merge hand-off must switch it off
    _perturb_lora_b(model, seed=5, scale=0.5)
    return save_adapter(model, tmp_path_factory.mktemp("adapters") / "stage1")


def _params(model, adapter):
    return {n: p for n, p in model.named_parameters() if f".{adapter}." in n and "lora_" in n}


def test_handoff_continue_trains_the_stage1_adapter(tiny_model_dir, stage1_adapter, batch):
    from safetensors.torch import load_file

    model = _load(_cfg(tiny_model_dir), stage1_adapter=str(stage1_adapter), handoff="continue")
    assert list(model.peft_config) == ["default"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(_params(model, "default")) and len(trainable) == 62
    saved = load_file(stage1_adapter / "adapter_model.safetensors")
    b = next(n for n in saved if "lora_B" in n)
    assert saved[b].abs().sum() > 0  # the stage-1 weights, not a fresh init


def test_handoff_merge_freezes_stage1_and_adds_stage2(tiny_model_dir, stage1_adapter, batch):
    from medvqa.model import describe_trainable, load_inference_model

    cfg = _cfg(tiny_model_dir)
    model = _load(cfg, stage1_adapter=str(stage1_adapter), handoff="merge")
    assert list(model.peft_config) == ["stage1", "stage2"] and model.active_adapters == ["stage1", "stage2"]
    assert model.active_adapter == "stage2"  # PeftModel's current adapter: the trained one (for checkpoints)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(_params(model, "stage2")) and len(trainable) == 62
    assert not any(p.requires_grad for p in _params(model, "stage1").values())
    assert "stage1 (frozen), stage2 (trainable)" in describe_trainable(model)
    # stage 2 at init (B = 0) adds nothing: outputs equal stage 1 alone
    stage1_only = load_inference_model(cfg, {"stage1": str(stage1_adapter)})
    base = load_inference_model(cfg)
    torch.testing.assert_close(_logits(model.eval(), batch), _logits(stage1_only, batch))
    # ... in train mode too: frozen stage 1 has no dropout, like weights merged into the base
    torch.testing.assert_close(_logits(model.train(), batch), _logits(stage1_only, batch))
    assert not torch.allclose(_logits(base, batch), _logits(stage1_only, batch))  # stage 1 does change outputs
    # training moves stage 2 only
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(**batch).loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed and all(".stage2." in n for n in changed)


def test_saved_adapter_loads_with_plain_peft_and_reproduces_logits(tiny_model_dir, stage1_adapter, batch, tmp_path):
    from peft import PeftModel
    from transformers import Idefics2ForConditionalGeneration

    from medvqa.model import load_inference_model, run_adapters, save_adapter

    cfg = _cfg(tiny_model_dir, "model.quantization=none")
    model = _load(cfg, stage1_adapter=str(stage1_adapter), handoff="merge")
    _perturb_lora_b(model, seed=7, scale=0.5)  # "trained" stage 2
    out = save_adapter(model, tmp_path / "adapters" / "stage2")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((out / "adapter_config.json").read_text())["r"] == cfg.lora.r
    expected = _logits(model.eval(), batch)

    # plain PEFT: stage 1 then stage 2, both active
    base = Idefics2ForConditionalGeneration.from_pretrained(tiny_model_dir)
    plain = PeftModel.from_pretrained(base, str(stage1_adapter), adapter_name="stage1")
    plain.load_adapter(str(out), adapter_name="stage2")
    plain.base_model.set_adapter(["stage1", "stage2"])
    torch.testing.assert_close(_logits(plain.eval(), batch), expected)
    with plain.disable_adapter():  # sanity: the adapters matter, so the equality above is not vacuous
        assert not torch.allclose(_logits(plain, batch), expected)
    plain.base_model.set_adapter("stage1")
    assert not torch.allclose(_logits(plain, batch), expected)  # stage 2 matters too

    # equals merge-then-stage-2 (full precision: merging is exact up to float rounding)
    merged = PeftModel.from_pretrained(Idefics2ForConditionalGeneration.from_pretrained(tiny_model_dir),
                                       str(stage1_adapter)).merge_and_unload()
    on_merged = PeftModel.from_pretrained(merged, str(out)).eval()
    # float32 rounding of the merged weights grows with the logits and depth (v3 tiny init keeps activations at unit
    # scale; max |logit| ~7, measured misses up to 1.1e-4): tolerance 1e-4 of the logit scale. An unmerged base
    # misses by ~0.6 (GUIDE §5), ~1000x outside it.
    scale = expected.abs().max().item()
    torch.testing.assert_close(_logits(on_merged, batch), expected, rtol=1e-4, atol=1e-4 * scale)

    # the same through run_adapters + load_inference_model
    (tmp_path / "adapters" / "stage1").symlink_to(stage1_adapter, target_is_directory=True)
    merge_cfg = _cfg(tiny_model_dir, "model.quantization=none", "run.handoff=merge")
    adapters = run_adapters(merge_cfg, tmp_path / "adapters")
    assert list(adapters) == ["stage1", "stage2"]
    torch.testing.assert_close(_logits(load_inference_model(merge_cfg, adapters), batch), expected)
    assert list(run_adapters(_cfg(tiny_model_dir, "run.handoff=continue"), tmp_path / "adapters")) == ["stage2"]
