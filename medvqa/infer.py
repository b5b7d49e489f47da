"""Batch inference: greedy answers from the base model or base + adapters, in-process or as Ray Data actors.

One code path for every model (GUIDE §3, ablation hygiene): ``generate_answers`` is the only place a prediction is
made, so the baseline and every fine-tuned model get

* the **same precision**: ``load_inference_model`` loads the base exactly as training did (4-bit NF4 with the same
  compute dtype, or full precision), adapters or not;
* the **same prompt**: ``encode_example(target=None)`` -- the training chat template (``prompts.prompt_text``) up to
  "Assistant:", with the same image resize and pixel normalisation (``collate_fn_for``) as training;
* the **same decoding**: greedy (``do_sample=False``, one beam), ``max_new_tokens`` new tokens at most, stopping at
  ``<end_of_utterance>`` or the model's own EOS; only the new tokens are decoded (special tokens skipped), and the
  answer is cut out of that text by ``metrics.extract_answer``.

Prompts are LEFT-padded for generation (``left_pad_collate``): with right padding a shorter prompt's next token would
be predicted after its pad tokens. Greedy answers of a batch therefore equal those of generating each row alone
(``tests/test_infer.py`` checks this).

Encode each image once: with a ``FeatureCache`` (``Predictor`` keeps one per actor, on by default) the vision encoder
+ connector output of an image -- the embeddings that replace its ``<image>`` tokens -- is computed once and reused for
every question, condition and batch that shows the same image bytes; ``generate`` then gets ``mm_encoder_outputs``
(transformers 5's name for the old ``image_hidden_states``) instead of pixels. It is only used in the prefill step
(later steps read the KV cache), so answers are those of the pixel path exactly (``tests/test_infer.py``). Features
depend on the adapters (LoRA on the connector changes them), so entries are keyed by the model's feature scope too
(``feature_scope``).

Ray Data: ``ds.map_batches(Predictor, fn_constructor_kwargs=..., compute=ActorPoolStrategy(size=n), num_cpus=...)``
loads the model once per actor (``predict_dataset`` wraps this). On 2 local CPUs give actors fractional CPUs
(0.25-0.5): whole-CPU actors starve the read tasks and the pipeline hangs without an error (GUIDE §5). Feed rows
grouped by image (``image_key`` order) so a batch, and an actor, sees an image's questions together.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from medvqa.conditions import examples_of
from medvqa.config import Config, actor_gpus, from_dict, node_resources, to_dict
from medvqa.data.pipeline import collate_fn_for, decode_image, encode_example
from medvqa.metrics import extract_answer

log = logging.getLogger(__name__)

_PROMPT_MAX_LENGTH = 1 << 30  # encode_example's max_length only truncates answers; a prompt is never truncated
_MODEL_INPUTS = ("input_ids", "pixel_values", "pixel_attention_mask")


def left_pad_collate(rows: Sequence[Mapping[str, Any]] | Mapping[str, Sequence], processor) -> dict:
    """Encoded prompts (``encode_example(..., target=None)`` outputs; a list of rows or a dict of columns) -> a
    generation batch of tensors: ``input_ids`` and ``attention_mask`` padded on the LEFT (pad id, attention 0),
    ``pixel_values`` rescaled/normalised and ``pixel_attention_mask`` exactly as ``collate_fn_for(processor)`` does
    (it is called here; only the token rows are then shifted right). ``labels``, if any, are dropped."""
    import torch

    if isinstance(rows, Mapping):
        batch = {k: list(rows[k]) for k in _MODEL_INPUTS}
    else:
        batch = {k: [r[k] for r in rows] for k in _MODEL_INPUTS}
    out = collate_fn_for(processor)(batch)  # right-padded tokens, normalised + padded pixels
    ids, attention = out["input_ids"], out["attention_mask"]
    length = ids.shape[1]
    for i, n in enumerate(attention.sum(dim=1).tolist()):  # move each row's right pads to its left
        shift = length - int(n)
        if shift:
            ids[i] = torch.roll(ids[i], shift)
            attention[i] = torch.roll(attention[i], shift)
    return {"input_ids": ids, "attention_mask": attention, "pixel_values": out["pixel_values"],
            "pixel_attention_mask": out["pixel_attention_mask"]}


def stop_token_ids(model, processor) -> list[int]:
    """Token ids that end an answer: the model's EOS id(s) and ``<end_of_utterance>`` (Idefics2's end of turn), so a
    base model whose generation config lacks the latter stops where a fine-tuned one does."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    tok = processor.tokenizer
    for token_id in (tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_utterance>")):
        if token_id is not None and token_id != tok.unk_token_id and token_id not in ids:
            ids.append(token_id)
    return ids


def image_key(data: bytes) -> str:
    """Content hash of an image's encoded bytes (128-bit BLAKE2b, hex): the same picture under two ids shares one
    encoding, two pictures never do (collision odds ~2^-64 even at billions of images)."""
    return hashlib.blake2b(bytes(data), digest_size=16).hexdigest()


def feature_scope(model) -> tuple:
    """What an image's features depend on besides the image: the model object and, for a peft ``PeftModel``, its
    active adapters and whether adapter layers are disabled (``disable_adapter()``): LoRA on the modality projection
    or perceiver changes the features, so a cache shared across adapter settings keeps them apart."""
    if type(model).__module__.split(".")[0] != "peft":
        return (id(model),)
    # ``_adapters_disabled`` is the flag ``PeftModel.disable_adapter()`` sets (peft 0.21); the tuner's own
    # ``disable_adapters`` is not reliable here (LoraModel forwards the name to transformers' PeftAdapterMixin method)
    return (id(model), tuple(model.active_adapters), bool(getattr(model, "_adapters_disabled", False)))


class FeatureCache:
    """LRU of image features (one tensor per image: ``n_sub_images * image_seq_len`` x text hidden size, on the model's
    device) under a byte budget. ``max_mb``: 512 MB holds ~1,000 Idefics2-8b images (64 latents x 4096 x 2 bytes
    bf16 = 0.5 MB each; x5 with image splitting), i.e. a whole VQA-RAD test split; the tiny model needs 2 KB each.
    ``hits``/``misses`` count lookups (a miss is one image through the vision encoder)."""

    def __init__(self, max_mb: float = 512.0):
        self.max_bytes = int(max_mb * 2**20)
        self.bytes = self.hits = self.misses = 0
        self._items: OrderedDict[Hashable, Any] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable):
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: Hashable, value) -> None:
        size = value.element_size() * value.nelement()
        if key in self._items or size > self.max_bytes:
            return
        self._items[key] = value
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= old.element_size() * old.nelement()


def image_features(model, pixel_values, pixel_attention_mask, keys: Sequence[str], cache: FeatureCache) -> list:
    """Features of each row's image (``keys[i]``: its ``image_key``), from ``cache`` where present; the missing
    distinct images go through ``model.get_image_features`` (vision encoder + connector) once, as one batch, and are
    cached. Returns one tensor per row (rows sharing an image share the tensor)."""
    scope = feature_scope(model)
    found = {k: cache.get((scope, k)) for k in dict.fromkeys(keys)}
    missing = [k for k, v in found.items() if v is None]
    cache.hits += len(keys) - len(missing)  # a row whose image another row of this batch encodes is a hit too
    cache.misses += len(missing)
    if missing:
        first = [list(keys).index(k) for k in missing]
        device = _device(model)
        out = model.get_image_features(pixel_values[first].to(device), pixel_attention_mask[first].to(device))
        for k, f in zip(missing, out.pooler_output):
            found[k] = f.clone()  # a view would keep the whole batch's output alive and under-count the bytes
            cache.put((scope, k), found[k])
    return [found[k] for k in keys]


def _device(model):
    try:
        return next(p.device for p in model.parameters())
    except StopIteration:  # pragma: no cover - a model without parameters
        import torch

        return torch.device("cpu")


def generate_answers(model, processor, rows: Sequence[Mapping[str, Any]], instruction: str,
                     max_new_tokens: int = 16, feature_cache: FeatureCache | None = None) -> list[dict]:
    """Greedy answers for ``rows`` (each with ``image``: encoded bytes, and ``prompt``: the question; '' for a
    caption prompt; optionally ``examples``: few-shot (image bytes, question, answer) turns before it) in one
    left-padded ``generate`` call. Returns one dict per row, in order: ``raw`` (the decoded new tokens, special
    tokens skipped) and ``answer`` (``metrics.extract_answer(raw)``). The same function serves the base model and
    base + adapters (see the module docstring). ``feature_cache``: encode each distinct image once and reuse its
    features (``image_features``); None, or rows with examples (several images each): every row's pixels go through
    the vision encoder."""
    import torch
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    if not rows:
        return []
    encoded = [encode_example(processor, decode_image(bytes(r["image"])), instruction, str(r.get("prompt") or ""),
                              None, _PROMPT_MAX_LENGTH,
                              examples=[(decode_image(im), q, a) for im, q, a in r.get("examples") or ()])
               for r in rows]
    if any(r.get("examples") for r in rows):
        feature_cache = None  # the cache holds one image per row
    batch = left_pad_collate(encoded, processor)
    device = _device(model)
    with torch.inference_mode():
        if feature_cache is None:
            inputs = {k: v.to(device) for k, v in batch.items()}  # generate casts pixels to the model's dtype
        else:
            feats = image_features(model, batch["pixel_values"], batch["pixel_attention_mask"],
                                   [image_key(r["image"]) for r in rows], feature_cache)
            inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device),
                      "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=feats)}}
        out = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                             eos_token_id=stop_token_ids(model, processor),
                             pad_token_id=processor.tokenizer.pad_token_id)
    new_tokens = out[:, inputs["input_ids"].shape[1]:].cpu()  # left padding: every prompt ends at the same column
    raws = processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return [{"raw": raw, "answer": extract_answer(raw)} for raw in raws]


def _config(cfg: Config | Mapping) -> Config:
    return cfg if isinstance(cfg, Config) else from_dict(dict(cfg))


class Predictor:
    """Ray Data callable class: loads the model once per actor and answers each batch greedily.

    ``adapters``: one model's adapters (name -> folder, or folders in load order; empty: the base model). ``models``
    instead: model name -> its adapters, so one actor serves a whole matrix: every model's adapters sit on one base
    and each row's ``model`` column selects them (the base model runs with adapters disabled). The model goes to this
    actor's GPU with ``cfg.resources.use_gpu`` (no visible CUDA device is then an error). ``feature_cache_mb``: the
    actor's image-feature cache (``FeatureCache``; 0: off).
    """

    def __init__(self, cfg_dict: Config | Mapping, adapters: Mapping[str, str] | Sequence[str] = (),
                 instruction: str | None = None, max_new_tokens: int = 16, feature_cache_mb: float = 512.0,
                 models: Mapping[str, Mapping[str, str]] | None = None, faults: Mapping | None = None):
        from medvqa.model import load_inference_model, load_processor, require_cuda

        cfg = _config(cfg_dict)
        use_gpu = cfg.resources.use_gpu
        if use_gpu:
            require_cuda("this predictor actor")  # never answers on CPU labelled as GPU answers
        self.model_adapters: dict[str, list[str]] | None = None
        if models is not None:
            if adapters:
                raise ValueError("give adapters or models, not both")
            # "m<i>_<adapter>": unique across models and safe as a module key (a model name may hold "@" or ".")
            self.model_adapters = {m: [f"m{i}_{a}" for a in dict(ads)] for i, (m, ads) in enumerate(models.items())}
            adapters = {n: str(path) for m, ads in models.items()
                        for n, path in zip(self.model_adapters[m], dict(ads).values())}
        self.model = load_inference_model(cfg, adapters or (), use_gpu=use_gpu)
        self.model.eval()
        self.processor = load_processor(cfg.model)
        self.instruction = cfg.stage2.prompt if instruction is None else instruction
        self.max_new_tokens = max_new_tokens
        self.feature_cache = FeatureCache(feature_cache_mb) if feature_cache_mb > 0 else None
        self.faults = dict(faults or {})  # injected eval faults (medvqa.faults): specs, pgid, record_dir
        self.batches = 0

    @contextlib.contextmanager
    def use_model(self, name: str | None):
        """The actor's model switched to matrix model ``name`` (None: as loaded)."""
        if name is None or self.model_adapters is None:
            yield
            return
        if name not in self.model_adapters:
            raise KeyError(f"model {name!r} is not served by this predictor ({sorted(self.model_adapters)})")
        names = self.model_adapters[name]
        if type(self.model).__module__.split(".")[0] != "peft":  # only the base model was loaded
            yield
        elif not names:
            with self.model.disable_adapter():
                yield
        else:
            self.model.base_model.set_adapter(names, inference_mode=True)
            self.model.active_adapter = names[-1]
            yield

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A numpy batch with ``image`` and ``prompt`` -> every column except ``image`` and ``shot_images``, plus
        ``raw_prediction`` and ``predicted_answer`` (strings). A row's ``instruction`` column, when present, overrides
        the actor's instruction (e.g. the expert-prompt condition shares the job with the others), with ``models`` its
        ``model`` column selects the adapters, and a non-empty ``shots`` column (with ``shot_images``;
        ``conditions.examples_of``) puts few-shot turns before its question; rows are generated per (model,
        instruction, few-shot or not), which changes no answer (greedy decoding with left padding is
        batch-invariant)."""
        self.batches += 1
        if self.faults.get("faults"):
            from medvqa.faults import fire, parse_faults

            fire(parse_faults(self.faults["faults"]), "eval", self.faults["record_dir"], self.faults["pgid"],
                 batch=self.batches)
        n = len(batch["image"])
        instructions = [str(x) for x in batch["instruction"]] if "instruction" in batch else [self.instruction] * n
        names = [str(x) for x in batch["model"]] if self.model_adapters is not None else [None] * n
        shots = [bool(x) for x in batch["shots"]] if "shots" in batch else [False] * n
        raw, answer = [""] * n, [""] * n
        for name, instruction, few in sorted(set(zip(names, instructions, shots)), key=str):
            idx = [i for i in range(n) if (names[i], instructions[i], shots[i]) == (name, instruction, few)]
            rows = [{"image": batch["image"][i], "prompt": batch["prompt"][i],
                     "examples": examples_of({"shots": batch["shots"][i], "shot_images": batch["shot_images"][i]})
                     if few else ()} for i in idx]
            with self.use_model(name):
                preds = generate_answers(self.model, self.processor, rows, instruction, self.max_new_tokens,
                                         self.feature_cache)
            for i, p in zip(idx, preds):
                raw[i], answer[i] = p["raw"], p["answer"]
        out = {k: v for k, v in batch.items() if k not in ("image", "shot_images")}
        out["raw_prediction"] = np.array(raw, dtype=object)
        out["predicted_answer"] = np.array(answer, dtype=object)
        return out


def predict_dataset(ds, cfg: Config | Mapping, adapters: Mapping[str, str] | Sequence[str] = (),
                    instruction: str | None = None, max_new_tokens: int = 16, concurrency: int = 1,
                    cpus_per_actor: float = 0.5, batch_size: int = 8, num_gpus: float | None = None,
                    feature_cache_mb: float = 512.0, models: Mapping[str, Mapping[str, str]] | None = None,
                    faults: Mapping | None = None):
    """``ds`` (records with ``image`` and ``prompt``; and ``model`` with ``models``, see ``Predictor``) -> a lazy Ray
    Dataset of predictions, one row per input row (every input column except ``image``, plus ``raw_prediction`` and
    ``predicted_answer``), from ``concurrency`` ``Predictor`` actors with ``cpus_per_actor`` CPUs each (fractional
    on small machines) and ``num_gpus`` GPUs each (default: 1 when ``cfg.resources.use_gpu``, else 0), each with a
    ``feature_cache_mb`` image-feature cache (0: off), on nodes with ``resources.worker_resource`` when set. A
    dataset in one block feeds only one actor: ``repartition`` it first. Rows grouped by image (consecutive) let one
    actor encode an image once for all its questions.

    An actor lost with its node (or killed) is restarted -- on another node when its own is gone -- and the batches
    it had in flight run again on it: Ray Data 2.60 creates pool actors with ``max_restarts=-1`` and
    ``max_task_retries=-1`` unless told otherwise (passing them here is deprecated; tests/test_node_loss.py checks
    the defaults and the behaviour). A batch's output reaches the driver once, from the attempt that finished.
    ``faults``: injected faults (``medvqa.faults``)."""
    import ray

    cfg = _config(cfg)
    if num_gpus is None:
        num_gpus = actor_gpus(cfg)
    kwargs = {"cfg_dict": to_dict(cfg), "adapters": dict(adapters) if isinstance(adapters, Mapping) else
              list(adapters), "instruction": instruction, "max_new_tokens": max_new_tokens,
              "feature_cache_mb": feature_cache_mb,
              "models": None if models is None else {m: dict(a) for m, a in models.items()}, "faults": faults}
    return ds.map_batches(Predictor, fn_constructor_kwargs=kwargs, batch_format="numpy", batch_size=batch_size,
                          compute=ray.data.ActorPoolStrategy(size=concurrency), num_cpus=cpus_per_actor,
                          num_gpus=num_gpus or None, resources=node_resources(cfg.resources))
