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

Ray Data: ``ds.map_batches(Predictor, fn_constructor_kwargs=..., compute=ActorPoolStrategy(size=n), num_cpus=...)``
loads the model once per actor (``predict_dataset`` wraps this). On 2 local CPUs give actors fractional CPUs
(0.25-0.5): whole-CPU actors starve the read tasks and the pipeline hangs without an error (GUIDE §5).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medvqa.config import Config, from_dict, to_dict
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


def _device(model):
    try:
        return next(p.device for p in model.parameters())
    except StopIteration:  # pragma: no cover - a model without parameters
        import torch

        return torch.device("cpu")


def generate_answers(model, processor, rows: Sequence[Mapping[str, Any]], instruction: str,
                     max_new_tokens: int = 16) -> list[dict]:
    """Greedy answers for ``rows`` (each with ``image``: encoded bytes, and ``prompt``: the question; '' for a
    caption prompt) in one left-padded ``generate`` call. Returns one dict per row, in order: ``raw`` (the decoded new
    tokens, special tokens skipped) and ``answer`` (``metrics.extract_answer(raw)``). The same function serves the
    base model and base + adapters (see the module docstring)."""
    import torch

    if not rows:
        return []
    encoded = [encode_example(processor, decode_image(bytes(r["image"])), instruction, str(r.get("prompt") or ""),
                              None, _PROMPT_MAX_LENGTH) for r in rows]
    batch = left_pad_collate(encoded, processor)
    device = _device(model)
    batch = {k: v.to(device) for k, v in batch.items()}  # generate casts pixels to the model's dtype
    with torch.inference_mode():
        out = model.generate(**batch, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                             eos_token_id=stop_token_ids(model, processor),
                             pad_token_id=processor.tokenizer.pad_token_id)
    new_tokens = out[:, batch["input_ids"].shape[1]:].cpu()  # left padding: every prompt ends at the same column
    raws = processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return [{"raw": raw, "answer": extract_answer(raw)} for raw in raws]


def _config(cfg: Config | Mapping) -> Config:
    return cfg if isinstance(cfg, Config) else from_dict(dict(cfg))


class Predictor:
    """Ray Data callable class: loads the model once per actor, answers each batch.

    ``cfg_dict``: a ``Config`` as ``config.to_dict`` (or a Config). ``adapters``: name -> folder, or folders, in load
    order (``model.run_adapters``); empty for the base model. ``instruction``: defaults to ``cfg.stage2.prompt``.
    The model goes to this actor's GPU when ``cfg.resources.use_gpu`` and one is visible (request it with
    ``num_gpus=1`` in ``map_batches``), else CPU.
    """

    def __init__(self, cfg_dict: Config | Mapping, adapters: Mapping[str, str] | Sequence[str] = (),
                 instruction: str | None = None, max_new_tokens: int = 16):
        import torch

        from medvqa.model import load_inference_model, load_processor

        cfg = _config(cfg_dict)
        use_gpu = bool(cfg.resources.use_gpu and torch.cuda.is_available())
        if cfg.resources.use_gpu and not use_gpu:
            log.warning("resources.use_gpu is set but this actor sees no GPU: predicting on CPU")
        self.model = load_inference_model(cfg, adapters or (), use_gpu=use_gpu)
        self.model.eval()
        self.processor = load_processor(cfg.model)
        self.instruction = cfg.stage2.prompt if instruction is None else instruction
        self.max_new_tokens = max_new_tokens

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A numpy batch with ``image`` and ``prompt`` -> every column except ``image``, plus ``raw_prediction`` and
        ``predicted_answer`` (strings). A row's ``instruction`` column, when present, overrides the actor's
        instruction (e.g. the expert-prompt condition shares the job with the others); rows are generated per
        instruction, which changes no answer (greedy decoding with left padding is batch-invariant)."""
        n = len(batch["image"])
        instructions = [str(x) for x in batch["instruction"]] if "instruction" in batch else [self.instruction] * n
        raw, answer = [""] * n, [""] * n
        for instruction in sorted(set(instructions)):
            idx = [i for i in range(n) if instructions[i] == instruction]
            rows = [{"image": batch["image"][i], "prompt": batch["prompt"][i]} for i in idx]
            for i, p in zip(idx, generate_answers(self.model, self.processor, rows, instruction, self.max_new_tokens)):
                raw[i], answer[i] = p["raw"], p["answer"]
        out = {k: v for k, v in batch.items() if k != "image"}
        out["raw_prediction"] = np.array(raw, dtype=object)
        out["predicted_answer"] = np.array(answer, dtype=object)
        return out


def predict_dataset(ds, cfg: Config | Mapping, adapters: Mapping[str, str] | Sequence[str] = (),
                    instruction: str | None = None, max_new_tokens: int = 16, concurrency: int = 1,
                    cpus_per_actor: float = 0.5, batch_size: int = 8, num_gpus: float | None = None):
    """``ds`` (records with ``image`` and ``prompt``) -> a lazy Ray Dataset of predictions, one row per input row
    (every input column except ``image``, plus ``raw_prediction`` and ``predicted_answer``), from ``concurrency``
    ``Predictor`` actors with ``cpus_per_actor`` CPUs each (fractional on small machines) and ``num_gpus`` GPUs each
    (default: 1 when ``cfg.resources.use_gpu``, else 0). A dataset in one block feeds only one actor:
    ``repartition`` it first."""
    import ray

    cfg = _config(cfg)
    if num_gpus is None:
        num_gpus = 1 if cfg.resources.use_gpu else 0
    kwargs = {"cfg_dict": to_dict(cfg), "adapters": dict(adapters) if isinstance(adapters, Mapping) else
              list(adapters), "instruction": instruction, "max_new_tokens": max_new_tokens}
    return ds.map_batches(Predictor, fn_constructor_kwargs=kwargs, batch_format="numpy", batch_size=batch_size,
                          compute=ray.data.ActorPoolStrategy(size=concurrency), num_cpus=cpus_per_actor,
                          num_gpus=num_gpus or None)
