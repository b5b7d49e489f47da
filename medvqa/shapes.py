"""Randomly initialised Idefics2 models of a named architecture, built offline (``medvqa model build``).

``idefics2-8b`` has HuggingFaceM4/idefics2-8b's architecture (GUIDE §6) -- a Mistral-7B text model, a SigLIP vision
tower at 980 px, a perceiver resampler of 64 latents and the modality projection -- with a tokenizer and processor
laid out like the real ones:

* tokenizer: 32,003 tokens, Mistral's 32,000 (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, then the vocabulary) and Idefics2's
  ``<fake_token_around_image>`` 32000, ``<image>`` 32001 (``Idefics2Config.image_token_id``'s default) and
  ``<end_of_utterance>`` 32002; pad is ``<unk>`` (id 0), the pad id ``Idefics2Config`` gives Mistral, which has none.
  The vocabulary is ``medvqa.tiny``'s byte-level BPE padded with never-produced filler tokens, so token counts of
  English text are of the same order as Mistral's but not equal;
* processor: 64 ``<image>`` tokens per image, longest edge 980, shortest edge 378 (``Idefics2ImageProcessor``'s
  defaults), no image splitting (the ``paper`` preset's setting), the real chat template.

It is saved with ``save_pretrained``, so ``model.name_or_path=DIR`` loads it through the code path of the real
checkpoint (4-bit quantization included). ``text_layers`` / ``vision_layers`` / ``perceiver_depth`` cut the depth for
CPU tests; widths, vocabulary, image size and token counts stay those of the full shape. Weights use transformers'
default initialisation (normal, std 0.02): the model is for shapes, memory and speed, not for answers.

Sizes (``parameter_count``, on the meta device): the full shape has 8,402,768,112 parameters (the real checkpoint is
listed as 8.4B); with 1 text layer, 1 vision layer and perceiver depth 1 it is 810,933,968 (1.6 GB in bfloat16): the
embeddings and head (2 x 131M), a text layer (218M), a perceiver layer (its MLP is 4 x 4096 wide: 218M) and the
modality projection (92M) dominate.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

SHAPES = ("tiny", "idefics2-8b")

BASE_VOCAB = 32_000  # Mistral-7B's SentencePiece vocabulary
IDEFICS2_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]  # ids 32000-32002
IMAGE_SEQ_LEN = 64  # <image> tokens per image = perceiver latents
LONGEST_EDGE, SHORTEST_EDGE = 980, 378  # pixels

TEXT = dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768, rms_norm_eps=1e-5,
            sliding_window=4096, tie_word_embeddings=False)
VISION = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
              image_size=LONGEST_EDGE, patch_size=14)
PERCEIVER = dict(hidden_size=4096, rms_norm_eps=1e-5, resampler_n_latents=IMAGE_SEQ_LEN, resampler_depth=3,
                 resampler_n_heads=16, resampler_head_dim=96, num_key_value_heads=4)


def build_tokenizer(seed: int = 0):
    """The 32,003-token tokenizer described in the module docstring."""
    from tokenizers import AddedToken, Tokenizer

    from medvqa.tiny import train_bpe, wrap_tokenizer

    trained = json.loads(train_bpe(seed, ["<unk>", "<s>", "</s>"]).to_str())
    vocab = trained["model"]["vocab"]
    # Fillers no merge produces and no text encodes to (the byte-level pre-tokenizer splits '<' off), so the ids of
    # a random model's generations still decode.
    for i in range(len(vocab), BASE_VOCAB):
        vocab[f"<unused{i}>"] = i
    tok = Tokenizer.from_str(json.dumps(trained))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in IDEFICS2_TOKENS])
    return wrap_tokenizer(tok, pad_token="<unk>")


def build_processor(seed: int = 0):
    from medvqa.tiny import build_processor as processor_for

    return processor_for(build_tokenizer(seed), image_seq_len=IMAGE_SEQ_LEN, shortest_edge=SHORTEST_EDGE,
                         longest_edge=LONGEST_EDGE)


def idefics2_8b_config(tokenizer, text_layers: Optional[int] = None, vision_layers: Optional[int] = None,
                       perceiver_depth: Optional[int] = None):
    """Idefics2Config of the 8B shape; a layer count given replaces the full one (32 text, 27 vision, depth 3)."""
    from transformers import Idefics2Config

    from medvqa.tiny import token_ids

    ids = token_ids(tokenizer)
    text = {**TEXT, "vocab_size": len(tokenizer), **ids}
    vision, perceiver = dict(VISION), dict(PERCEIVER)
    for d, key, n in ((text, "num_hidden_layers", text_layers), (vision, "num_hidden_layers", vision_layers),
                      (perceiver, "resampler_depth", perceiver_depth)):
        if n is not None:
            if n < 1:
                raise ValueError(f"layer counts must be >= 1, got {key}={n}")
            d[key] = n
    return Idefics2Config(image_token_id=tokenizer.convert_tokens_to_ids("<image>"), tie_word_embeddings=False,
                          vision_config=vision, perceiver_config=perceiver, text_config=text, **ids)


def parameter_count(config) -> int:
    """Parameters of a model of ``config``, counted on the meta device (no memory is allocated)."""
    import torch
    from transformers import Idefics2ForConditionalGeneration

    with torch.device("meta"):
        model = Idefics2ForConditionalGeneration(config)
    return sum(p.numel() for p in model.parameters())


def full_parameter_count(seed: int = 0) -> int:
    """Parameters of the full idefics2-8b shape (all 32 text layers, 27 vision layers, depth-3 perceiver)."""
    return parameter_count(idefics2_8b_config(build_tokenizer(seed)))


def build(shape: str, out_dir: str | Path, text_layers: Optional[int] = None, vision_layers: Optional[int] = None,
          perceiver_depth: Optional[int] = None, seed: int = 0, dtype: str = "bfloat16", device: str = "cpu") -> dict:
    """Build ``shape`` (one of ``SHAPES``) into ``out_dir`` with ``save_pretrained``; returns what was built:
    ``path``, ``parameters`` (of the model written), ``full_shape_parameters``, ``config`` (the layer counts),
    ``dtype`` and ``seconds``. ``dtype``: of the saved weights (bfloat16 halves disk and load time; a 4-bit load
    quantizes from either). ``device``: where the weights are initialised (``cuda`` is much faster for the full
    shape, which needs ~17 GB there). Same seed -> same weights on the same device."""
    import torch

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    if shape == "tiny":
        if any(n is not None for n in (text_layers, vision_layers, perceiver_depth)):
            raise ValueError("the tiny shape has fixed layer counts; --text-layers etc. are for idefics2-8b")
        from medvqa.tiny import build_tiny

        build_tiny(out_dir, seed)
        from transformers import AutoConfig

        n = parameter_count(AutoConfig.from_pretrained(out_dir))
        return {"path": str(out_dir), "shape": shape, "parameters": n, "full_shape_parameters": n,
                "dtype": "float32", "seconds": round(time.perf_counter() - t0, 1)}
    if shape != "idefics2-8b":
        raise ValueError(f"unknown shape {shape!r} (known: {', '.join(SHAPES)})")
    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"dtype must be bfloat16 or float32, got {dtype!r}")
    from transformers import Idefics2ForConditionalGeneration

    from medvqa.tiny import generation_config

    processor = build_processor(seed)
    config = idefics2_8b_config(processor.tokenizer, text_layers, vision_layers, perceiver_depth)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Idefics2ForConditionalGeneration._from_config(config, dtype=getattr(torch, dtype))
    model.generation_config = generation_config(processor.tokenizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    built = sum(p.numel() for p in model.parameters())
    del model
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()  # hand the ~17 GB back: a caller's memory figures must not include them
    return {"path": str(out_dir), "shape": shape, "parameters": built,
            "full_shape_parameters": parameter_count(idefics2_8b_config(processor.tokenizer)),
            "config": {"text_layers": config.text_config.num_hidden_layers,
                       "vision_layers": config.vision_config.num_hidden_layers,
                       "perceiver_depth": config.perceiver_config.resampler_depth},
            "dtype": dtype, "seconds": round(time.perf_counter() - t0, 1)}
