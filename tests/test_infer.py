"""Batch prediction: left padding, batch-invariant greedy answers, new tokens only, base and adapter models through
one function, and Predictor actors on a local Ray giving the in-process answers."""


import numpy as np
import pytest
import torch

from medvqa.config import load_config, to_dict
from medvqa.data.phantoms import phantom_records
from medvqa.data.pipeline import collate_fn_for, decode_image, encode_example
from medvqa.data.records import validate_record
from medvqa.infer import (
    FeatureCache,
    Predictor,
    feature_scope,
    generate_answers,
    image_key,
    left_pad_collate,
    predict_dataset,
)
from medvqa.metrics import extract_answer

INSTRUCTION = "Answer briefly."
# Three prompts of clearly different lengths (the phantom questions are all about the same length).
QUESTIONS = ("Is this an X-ray?",
             "Is there a lesion in the left lung of this patient, seen on the axial image?",
             "Which side of the brain shows the large mass on this contrast enhanced MRI scan of the head?")


@pytest.fixture(scope="module")
def cfg(tiny_model_dir):
    return load_config("tiny", [f"model.name_or_path={tiny_model_dir}"])


@pytest.fixture(scope="module")
def processor(cfg):
    from medvqa.model import load_processor

    return load_processor(cfg.model)


@pytest.fixture(scope="module")
def base_model(cfg):
    from medvqa.model import load_inference_model

    return load_inference_model(cfg)


@pytest.fixture(scope="module")
def rows():
    recs = phantom_records("vqa", len(QUESTIONS), seed=3, split="test")
    return [{"id": r["id"], "image": r["image"], "prompt": q} for r, q in zip(recs, QUESTIONS)]


def _encode(processor, rows):
    return [encode_example(processor, decode_image(r["image"]), INSTRUCTION, r["prompt"], None, 512) for r in rows]


# ------------------------------------------------------------------------------------------------- unit


def test_left_pad_collate_pads_left_and_normalises_like_training(processor, rows):
    encoded = _encode(processor, rows)
    lengths = [len(e["input_ids"]) for e in encoded]
    assert len(set(lengths)) == 3  # the check below is only meaningful with different lengths
    batch = left_pad_collate(encoded, processor)
    right = collate_fn_for(processor)({k: [e[k] for e in encoded] for k in encoded[0]})
    pad, width = processor.tokenizer.pad_token_id, max(lengths)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, width)
    for i, (e, n) in enumerate(zip(encoded, lengths)):
        assert batch["input_ids"][i, width - n:].tolist() == e["input_ids"].tolist()  # tokens at the right end
        assert (batch["input_ids"][i, : width - n] == pad).all()
        assert batch["attention_mask"][i, : width - n].sum() == 0 and (batch["attention_mask"][i, width - n:] == 1).all()
    assert (batch["attention_mask"].sum(1) == right["attention_mask"].sum(1)).all()
    torch.testing.assert_close(batch["pixel_values"], right["pixel_values"], rtol=0, atol=0)
    assert torch.equal(batch["pixel_attention_mask"], right["pixel_attention_mask"])
    assert batch["pixel_values"].dtype == torch.float32 and batch["pixel_values"].min() < 0  # normalised, not 0..255


def test_batched_greedy_answers_equal_one_at_a_time(base_model, processor, rows):
    batched = generate_answers(base_model, processor, rows, INSTRUCTION, max_new_tokens=12)
    alone = [generate_answers(base_model, processor, [r], INSTRUCTION, max_new_tokens=12)[0] for r in rows]
    assert batched == alone
    assert all(len(p["raw"]) > 0 for p in batched)  # a random tiny model rambles: a strong check, not empty strings
    # Not vacuous: RIGHT padding (the training collate) changes the shorter prompts' continuations.
    encoded = _encode(processor, rows)
    right = collate_fn_for(processor)({k: [e[k] for e in encoded] for k in encoded[0]})
    with torch.inference_mode():
        out = base_model.generate(**right, do_sample=False, max_new_tokens=12,
                                  pad_token_id=processor.tokenizer.pad_token_id)
    raws = processor.tokenizer.batch_decode(out[:, right["input_ids"].shape[1]:], skip_special_tokens=True)
    assert raws != [p["raw"] for p in alone]


def test_only_new_tokens_are_decoded(base_model, processor, rows):
    (pred,) = generate_answers(base_model, processor, rows[:1], INSTRUCTION, max_new_tokens=8)
    batch = left_pad_collate(_encode(processor, rows[:1]), processor)
    with torch.inference_mode():
        full = base_model.generate(**batch, do_sample=False, max_new_tokens=8,
                                   pad_token_id=processor.tokenizer.pad_token_id)
    full_text = processor.tokenizer.decode(full[0], skip_special_tokens=True)
    assert "User:" in full_text and QUESTIONS[0] in full_text  # the prompt is there in the full sequence ...
    assert "User:" not in pred["raw"] and QUESTIONS[0] not in pred["raw"] and INSTRUCTION not in pred["raw"]
    assert pred["raw"] == processor.tokenizer.decode(full[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert pred["answer"] == extract_answer(pred["raw"])


@pytest.fixture(scope="module")
def trained_adapter(cfg, processor, tmp_path_factory):
    """A LoRA trained for a few steps on phantom answers and saved like a run's adapters/stage2."""
    from conftest import train_tiny_adapter

    from medvqa.model import save_adapter

    model, losses = train_tiny_adapter(cfg, processor, steps=6)
    assert losses[-1] < losses[0]
    return save_adapter(model, tmp_path_factory.mktemp("adapters") / "stage2")


def test_base_and_adapter_models_run_through_the_same_function(cfg, base_model, processor, rows, trained_adapter):
    from medvqa.model import load_inference_model

    tuned = load_inference_model(cfg, {"stage2": str(trained_adapter)})
    assert not tuned.training
    base_preds = generate_answers(base_model, processor, rows, INSTRUCTION)
    tuned_preds = generate_answers(tuned, processor, rows, INSTRUCTION)
    assert len(base_preds) == len(tuned_preds) == len(rows)
    assert all(set(p) == {"raw", "answer"} for p in base_preds + tuned_preds)
    assert [p["raw"] for p in base_preds] != [p["raw"] for p in tuned_preds]  # the adapter is in effect
    # batch-invariant with adapters too
    assert tuned_preds == [generate_answers(tuned, processor, [r], INSTRUCTION)[0] for r in rows]


def test_predictor_call_passes_columns_through(cfg, rows):
    predictor = Predictor(to_dict(cfg), adapters=[], instruction=INSTRUCTION, max_new_tokens=8)
    batch = {"id": np.array([r["id"] for r in rows], dtype=object),
             "image": np.array([r["image"] for r in rows], dtype=object),
             "prompt": np.array([r["prompt"] for r in rows], dtype=object),
             "target": np.array(["yes", "no", "left"], dtype=object)}
    out = predictor(batch)
    assert set(out) == {"id", "prompt", "target", "raw_prediction", "predicted_answer"}
    assert list(out["id"]) == list(batch["id"]) and list(out["target"]) == ["yes", "no", "left"]
    expected = generate_answers(predictor.model, predictor.processor, rows, INSTRUCTION, max_new_tokens=8)
    assert list(out["raw_prediction"]) == [p["raw"] for p in expected]
    assert list(out["predicted_answer"]) == [p["answer"] for p in expected]


def _vision_counter(model):
    """Counts images through the vision encoder (a forward hook on ``vision_model``); returns (counts, handle)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    counts = []

    def hook(module, args, kwargs, output):
        counts.append(int((kwargs.get("pixel_values") if "pixel_values" in kwargs else args[0]).shape[0]))

    return counts, inner.model.vision_model.register_forward_hook(hook, with_kwargs=True)


@pytest.fixture(scope="module")
def shared_image_rows(rows):
    """Five questions on three images: rows 0/2 and 1/4 share an image (as true/expert/swapped cells do)."""
    extra = [{"id": "x0", "image": rows[0]["image"], "prompt": "Is the image normal?"},
             {"id": "x1", "image": rows[1]["image"], "prompt": "Where is the abnormality?"}]
    return [rows[0], rows[1], extra[0], rows[2], extra[1]]


def test_feature_cache_unit():
    t = torch.zeros(256)  # 1 KiB of float32
    cache = FeatureCache(max_mb=3 / 1024)  # room for three
    for k in "abc":
        cache.put(k, t.clone())
    assert cache.get("a") is not None  # a is now the most recent: b is evicted next
    cache.put("d", t.clone())
    assert cache.get("b") is None and len(cache) == 3 and cache.bytes == 3 * 1024
    cache.put("huge", torch.zeros(4096))  # larger than the whole budget: not cached, nothing evicted
    assert cache.get("huge") is None and len(cache) == 3
    assert image_key(b"abc") == image_key(bytearray(b"abc")) != image_key(b"abd") and len(image_key(b"")) == 32


def test_feature_cache_gives_the_same_answers_and_encodes_each_image_once(base_model, processor, shared_image_rows):
    rows = shared_image_rows
    counts, handle = _vision_counter(base_model)
    try:
        plain = generate_answers(base_model, processor, rows, INSTRUCTION, max_new_tokens=12)
        assert sum(counts) == 5  # the pixel path encodes every row's image
        counts.clear()
        cache = FeatureCache()
        cached = generate_answers(base_model, processor, rows, INSTRUCTION, max_new_tokens=12, feature_cache=cache)
        assert cached == plain  # greedy answers identical, token for token
        assert sum(counts) == 3 and (cache.misses, cache.hits, len(cache)) == (3, 2, 3)  # one pass per distinct image
        counts.clear()
        # another batch (another instruction, the expert cell) on the same images: no encoding at all
        again = generate_answers(base_model, processor, rows[::-1], "Be brief.", max_new_tokens=12, feature_cache=cache)
        assert counts == [] and cache.hits == 7
        assert again == generate_answers(base_model, processor, rows[::-1], "Be brief.", max_new_tokens=12)
    finally:
        handle.remove()


def test_feature_cache_is_per_adapter_set(cfg, base_model, processor, shared_image_rows, trained_adapter):
    """A LoRA on the connector changes the features: one cache shared by the base and the tuned model must not
    serve one's features to the other."""
    from medvqa.model import load_inference_model

    tuned = load_inference_model(cfg, {"stage2": str(trained_adapter)})
    assert any("connector" in n and "lora_" in n for n, _ in tuned.named_parameters())  # the check is meaningful
    assert feature_scope(tuned) != feature_scope(base_model)
    scope = feature_scope(tuned)
    with tuned.disable_adapter():  # the same object running as the base model: another scope
        assert feature_scope(tuned) != scope
    assert feature_scope(tuned) == scope
    rows = shared_image_rows
    cache = FeatureCache()
    base_cached = generate_answers(base_model, processor, rows, INSTRUCTION, feature_cache=cache)
    counts, handle = _vision_counter(tuned)
    try:
        tuned_cached = generate_answers(tuned, processor, rows, INSTRUCTION, feature_cache=cache)
        assert sum(counts) == 3  # the tuned model encodes the images itself
    finally:
        handle.remove()
    assert tuned_cached == generate_answers(tuned, processor, rows, INSTRUCTION)
    assert base_cached == generate_answers(base_model, processor, rows, INSTRUCTION)
    assert tuned_cached != base_cached


def test_predictor_caches_features_by_default(cfg, shared_image_rows):
    rows = shared_image_rows
    batch = {"id": np.array([r["id"] for r in rows], dtype=object),
             "image": np.array([r["image"] for r in rows], dtype=object),
             "prompt": np.array([r["prompt"] for r in rows], dtype=object),
             "instruction": np.array([INSTRUCTION, INSTRUCTION, "Be brief.", INSTRUCTION, "Be brief."], dtype=object)}
    cached = Predictor(to_dict(cfg), instruction=INSTRUCTION, max_new_tokens=8)
    plain = Predictor(to_dict(cfg), instruction=INSTRUCTION, max_new_tokens=8, feature_cache_mb=0)
    assert cached.feature_cache is not None and plain.feature_cache is None
    out, ref = cached(batch), plain(batch)
    assert list(out["raw_prediction"]) == list(ref["raw_prediction"])
    assert cached.feature_cache.misses == 3  # two instructions -> two generate calls, still one encoding per image


def test_one_predictor_serves_every_model_with_their_own_answers(cfg, base_model, processor, shared_image_rows,
                                                                 trained_adapter):
    """Base loaded once, adapters switched per row: each row gets exactly the answer of its own model loaded alone
    (base: adapters disabled), with the feature cache shared across models."""
    from medvqa.model import load_inference_model

    rows = shared_image_rows
    names = ["base", "tuned", "tuned", "base", "tuned", "base", "base", "tuned", "base", "tuned"]
    batch = {"model": np.array(names, dtype=object),
             "image": np.array([r["image"] for r in rows * 2], dtype=object),
             "prompt": np.array([r["prompt"] for r in rows * 2], dtype=object)}
    predictor = Predictor(to_dict(cfg), instruction=INSTRUCTION, max_new_tokens=10,
                          models={"base": {}, "tuned": {"stage2": str(trained_adapter)}})
    out = predictor(batch)
    tuned = load_inference_model(cfg, {"stage2": str(trained_adapter)})
    alone = {"base": generate_answers(base_model, processor, rows * 2, INSTRUCTION, max_new_tokens=10),
             "tuned": generate_answers(tuned, processor, rows * 2, INSTRUCTION, max_new_tokens=10)}
    assert list(out["raw_prediction"]) == [alone[m][i]["raw"] for i, m in enumerate(names)]
    assert alone["base"] != alone["tuned"]  # not vacuous
    assert predictor.feature_cache.misses == 5  # base rows show 3 images, tuned rows 2: per model (LoRA changes them)
    with pytest.raises(KeyError):
        predictor({**{k: v[:1] for k, v in batch.items()}, "model": np.array(["other"], dtype=object)})


# ------------------------------------------------------------------------------------------------- integration


@pytest.mark.integration
def test_predictor_actors_on_ray_match_in_process(ray_local, cfg, base_model, processor):
    import ray

    records = [validate_record(r) for r in phantom_records("vqa", 16, seed=2, split="test")]
    assert not any(r["reject_reason"] for r in records)
    ds = ray.data.from_items(records, override_num_blocks=4)  # several blocks: both actors get work
    preds = predict_dataset(ds, cfg, adapters={}, instruction=INSTRUCTION, max_new_tokens=8, concurrency=2,
                            cpus_per_actor=0.25, batch_size=4).take_all()

    assert len(preds) == 16
    by_id = {p["id"]: p for p in preds}
    assert sorted(by_id) == sorted(r["id"] for r in records)  # ids preserved, one prediction per row
    assert "image" not in preds[0] and {"prompt", "target", "raw_prediction", "predicted_answer"} <= set(preds[0])
    expected = generate_answers(base_model, processor, records, INSTRUCTION, max_new_tokens=8)
    for record, exp in zip(records, expected):
        got = by_id[record["id"]]
        assert (got["raw_prediction"], got["predicted_answer"]) == (exp["raw"], exp["answer"]), record["id"]
        assert got["target"] == record["target"] and got["prompt"] == record["prompt"]
