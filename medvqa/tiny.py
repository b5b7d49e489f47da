"""A tiny randomly initialised Idefics2 (~0.5M parameters), its tokenizer and processor, built offline.

It is saved with ``save_pretrained`` and loaded back with ``Idefics2ForConditionalGeneration.from_pretrained`` /
``AutoProcessor.from_pretrained``: the very code path used for ``HuggingFaceM4/idefics2-8b``, so tests and the
tiny preset exercise the real classes, 4-bit quantization included. Sizes are the smallest that bitsandbytes 4-bit
handles on CPU (GUIDE §5: vision hidden 32 or head_dim 16 break it).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

VERSION = "v3"  # bump when the architecture, tokenizer or corpus changes: the cache folder name carries it

# The real Idefics2-8B chat template (its processor_config.json): "User:<image>question<end_of_utterance>\n
# Assistant: answer<end_of_utterance>\n"; a turn that starts with an image gets "User:" without a space.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{message['role'].capitalize()}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# Fixed ids, in the order Mistral/Llama use for the first three (unk 0, bos 1, eos 2).
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<fake_token_around_image>", "<image>", "<end_of_utterance>"]
IMAGE_SEQ_LEN = 8  # <image> tokens per image = perceiver latents
IMAGE_SIZE = 64  # pixels, longest edge (one 4x4 grid of 16-pixel patches)
VOCAB_SIZE = 1536  # BPE target incl. the 256 byte symbols and the special tokens

# Phantom-data words (medvqa.data phantoms) and a radiology vocabulary, so common words are single tokens.
PHANTOM_WORDS = ("yes no left right lesion mass nodule small large none absent present chest head brain abdomen "
                 "lung liver kidney ct x-ray mri radiograph axial image scan showing side size organ modality which "
                 "what is there the a of in on").split()
RADIOLOGY_WORDS = (
    "radiology radiologist anterior posterior lateral medial superior inferior proximal distal coronal sagittal "
    "frontal view contrast enhanced enhancement opacity opacities consolidation effusion pleural pneumothorax "
    "cardiomegaly heart cardiac aorta aortic vessel artery vein hilar mediastinum mediastinal trachea bronchus "
    "diaphragm rib ribs spine vertebra vertebral bone fracture skull cerebral cerebellum ventricle ventricles "
    "hemorrhage infarct edema midline shift sulci gyri white grey gray matter cortex stomach bowel colon "
    "intestine appendix gallbladder pancreas spleen bladder prostate uterus ovary renal hepatic splenic "
    "pulmonary cyst tumor tumour mass calcification calcified density dense hypodense hyperdense hyperintense "
    "hypointense signal weighted t1 t2 flair diffusion ultrasound pet nuclear normal abnormal abnormality "
    "finding findings evidence seen visible shown located location region area abnormal enlarged dilated "
    "obstruction free fluid air gas wall thickening thickened margin margins border well defined irregular "
    "round oval solid multiple single bilateral unilateral upper lower middle lobe lobes base apex "
    "patient case study figure arrow arrows demonstrates reveals shows indicates suggests consistent with "
    "and or not are was were be been has have does do can this that these those it its by for from to at as "
    "how many where why when plane imaging taken type kind used quadrant segment focal diffuse mild "
    "moderate severe acute chronic old new post pre surgery surgical catheter tube line device implant"
).split()
PUNCTUATION_AND_DIGITS = list(".,;:?!'\"()[]{}-/+%<>=*&#@_") + [str(d) for d in range(10)]


def _corpus(seed: int) -> list[str]:
    """A small deterministic text corpus: sentences built from the vocabularies, plus questions and answers shaped
    like the phantom data, so the BPE learns whole words with and without a leading space."""
    import random

    rng = random.Random(seed)
    words = PHANTOM_WORDS + RADIOLOGY_WORDS
    lines = []
    for w in words:  # each word alone, capitalised and after a space, several times: high merge counts
        lines += [w, " " + w, w.capitalize(), " " + w.capitalize(), w + ".", w + "?"] * 3
    for _ in range(600):
        n = rng.randint(3, 10)
        sentence = " ".join(rng.choice(words) for _ in range(n))
        lines.append(sentence.capitalize() + rng.choice([".", "?", "!", ","]))
    for _ in range(200):
        lines.append(f"Is there a {rng.choice(['lesion', 'mass', 'nodule'])} in the "
                     f"{rng.choice(['left', 'right'])} {rng.choice(['lung', 'liver', 'kidney', 'brain'])}?")
        lines.append(f"Which {rng.choice(['side', 'organ', 'modality'])} is shown? "
                     f"{rng.choice(['CT', 'MRI', 'X-ray', 'left', 'right', 'chest', 'head', 'abdomen'])}")
        lines.append(f"{rng.randint(0, 999)} {rng.uniform(0, 100):.2f} cm mm %")
    lines += [" ".join(PUNCTUATION_AND_DIGITS)] * 5
    lines += ["Answer briefly.", "Describe this radiology image.", "User:", "Assistant:"] * 20
    return lines


def train_bpe(seed: int, special_tokens: list[str]):
    """A byte-level BPE (every string encodes, no <unk>) of at most ``VOCAB_SIZE`` tokens trained on the built-in
    corpus, ``special_tokens`` first (ids 0, 1, ...). A ``tokenizers.Tokenizer``; ``wrap_tokenizer`` makes it a
    transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    return tok


def wrap_tokenizer(tok, pad_token: str):
    """``tok`` (holding Idefics2's special tokens) as a transformers tokenizer; bos is prepended like Mistral's
    tokenizer does."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token=pad_token,
        add_bos_token=True, add_eos_token=False, model_max_length=4096,
        # Named so Idefics2Processor finds tokenizer.image_token / image_boundary_token (transformers 5).
        extra_special_tokens={"image_token": "<image>", "image_boundary_token": "<fake_token_around_image>",
                              "end_of_utterance_token": "<end_of_utterance>"},
    )


def build_tokenizer(seed: int = 0):
    """The tiny tokenizer: the trained BPE with all seven special tokens at ids 0-6 and its own <pad>."""
    return wrap_tokenizer(train_bpe(seed, SPECIAL_TOKENS), pad_token="<pad>")


def build_processor(tokenizer, image_seq_len: int = IMAGE_SEQ_LEN, shortest_edge: int = IMAGE_SIZE,
                    longest_edge: int = IMAGE_SIZE):
    """Idefics2Processor with image splitting off (on the object, GUIDE §5) and ``image_seq_len`` <image> tokens per
    image. The tiny model's shortest_edge = longest_edge keeps the 64-pixel images whole."""
    from transformers import Idefics2ImageProcessorPil, Idefics2Processor

    image_processor = Idefics2ImageProcessorPil(
        do_image_splitting=False, size={"shortest_edge": shortest_edge, "longest_edge": longest_edge})
    return Idefics2Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=image_seq_len,
                             chat_template=CHAT_TEMPLATE)


def token_ids(tokenizer) -> dict:
    """``bos_token_id``, ``eos_token_id`` and ``pad_token_id`` of ``tokenizer``, for model and generation configs."""
    return {k: tokenizer.convert_tokens_to_ids(t) for k, t in
            (("bos_token_id", "<s>"), ("eos_token_id", "</s>"), ("pad_token_id", tokenizer.pad_token))}


def generation_config(tokenizer):
    """Greedy defaults that stop at the end of the utterance, like Idefics2-8B's."""
    from transformers import GenerationConfig

    ids = token_ids(tokenizer)
    return GenerationConfig(bos_token_id=ids["bos_token_id"], pad_token_id=ids["pad_token_id"],
                            eos_token_id=[ids["eos_token_id"], tokenizer.convert_tokens_to_ids("<end_of_utterance>")])


def build_config(tokenizer):
    from transformers import Idefics2Config

    ids = token_ids(tokenizer)
    return Idefics2Config(
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=False,
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           image_size=IMAGE_SIZE, patch_size=16),
        perceiver_config=dict(hidden_size=64, resampler_n_latents=IMAGE_SEQ_LEN, resampler_depth=2,
                              resampler_n_heads=2, resampler_head_dim=32, num_key_value_heads=1),
        text_config=dict(model_type="mistral", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False, **ids),
        **ids,
    )


# Re-initialisation of the random weights so the image reaches the answer (see ``init_weights``). Gains multiply
# 1/sqrt(fan_in), the scale at which a Linear keeps its input's RMS; transformers' default (std 0.02, i.e. gain 0.16
# for 64 inputs) shrinks every residual branch ~6x, so the image term was ~200x smaller than the constant latents.
INIT = dict(
    pos_std=1.0,         # vision position embeddings (std per dim): at 0.02 they vanish next to the ~0.5-RMS patch
                         # content and *where* a lesion is gets lost (ridge probe of lesion side on the connector
                         # output, 320 phantoms: 0.69 accuracy at 0.02, 1.0 at 1.0)
    vision_gain=1.0,     # vision encoder linears
    proj_gain=1.0,       # connector modality projection (MLP)
    perceiver_gain=1.0,  # perceiver resampler linears ...
    qk_gain=2.0,         # ... with sharper q/k: attention logits ~N(0, 4) pick patches instead of averaging them
    latents_std=1.0,     # perceiver latents: N(0, 1) instead of ones (8 identical image tokens)
    text_gain=1.0,       # text decoder linears: the answer position's hidden state moves ~50% between images (7% at
                         # std 0.02), so the image shows in the logits (spread 0.66 vs 0.09 nats) at initialisation
)


def init_weights(model, seed: int, **overrides) -> None:
    """Re-initialise the vision tower, connector and text decoder in place (``INIT``, ``overrides`` win), so that
    different images give clearly different image tokens and the image moves the answer logits before any training.
    Measured (4-bit, mean over pairs of 8 phantoms): the connector output differs by ~49% between two images (0.7%
    with transformers' init) and between the 8 image tokens of one image by ~119% (0%: identical). Deterministic
    per seed."""
    import torch

    c = {**INIT, **overrides}
    gen = torch.Generator().manual_seed(seed + 1)
    inner = model.model
    vis, conn = inner.vision_model, inner.connector

    def linears(module, gain, qk=1.0):
        for name, m in module.named_modules():
            if isinstance(m, torch.nn.Linear):
                g = gain * (qk if name.endswith(("q_proj", "k_proj")) else 1.0)
                torch.nn.init.normal_(m.weight, std=g / m.in_features ** 0.5, generator=gen)

    with torch.no_grad():
        torch.nn.init.normal_(vis.embeddings.position_embedding.weight, std=c["pos_std"], generator=gen)
        linears(vis.encoder, c["vision_gain"])
        linears(conn.modality_projection, c["proj_gain"])
        linears(conn.perceiver_resampler, c["perceiver_gain"], c["qk_gain"])
        torch.nn.init.normal_(conn.perceiver_resampler.latents, std=c["latents_std"], generator=gen)
        linears(inner.text_model, c["text_gain"])


def make_tiny(seed: int = 0):
    """(model, processor) in memory: the random Idefics2ForConditionalGeneration and its processor."""
    import torch
    from transformers import Idefics2ForConditionalGeneration

    processor = build_processor(build_tokenizer(seed))
    config = build_config(processor.tokenizer)
    torch.manual_seed(seed)
    model = Idefics2ForConditionalGeneration(config).eval()
    # With the default init (std 0.02) a 64-wide hidden state can move the logits by only ~1 nat, so no LoRA can
    # push the loss far below log(vocab): the frozen random head caps learning. A wider head (std 0.2) lets the
    # tiny model's learning, and its use of the image, show up as a falling loss.
    torch.nn.init.normal_(model.lm_head.weight, std=0.2, generator=torch.Generator().manual_seed(seed))
    init_weights(model, seed)
    model.generation_config = generation_config(processor.tokenizer)
    return model, processor


def build_tiny(out_dir: Path, seed: int = 0) -> Path:
    """Build the tiny model, tokenizer and processor and ``save_pretrained`` them into ``out_dir`` (created).
    Same seed -> identical weights and tokenizer. Returns ``out_dir``."""
    out_dir = Path(out_dir)
    model, processor = make_tiny(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def tiny_model_path(cache_dir: str, seed: int = 0) -> Path:
    """``<cache_dir>/tiny-idefics2-<VERSION>-seed<seed>``, built on first use. Safe under concurrent callers (Ray
    workers): each builds into its own temp folder and renames it into place; a loser of the rename race uses the
    winner's (identical) build."""
    final = Path(os.path.expanduser(cache_dir)) / f"tiny-idefics2-{VERSION}-seed{seed}"
    if (final / "config.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build_tiny(tmp, seed)
        try:
            os.rename(tmp, final)  # atomic on one filesystem; fails if another process got there first
        except OSError:
            if not (final / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
