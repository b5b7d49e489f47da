"""Model inputs: exact label masks (prompt, image and pad tokens are -100; only the answer and its
<end_of_utterance> are trained) and micro-batch padding."""

import numpy as np
import pytest
from PIL import Image

from medvqa.data.pipeline import IGNORE_INDEX, cached_processor, collate, encode_example


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return cached_processor(str(tiny_model_dir), False, None)


def _image(seed=0, size=(64, 64)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))


def test_labels_train_only_the_answer_and_end_of_utterance(processor):
    tok = processor.tokenizer
    ex = encode_example(processor, _image(), "Answer briefly.", "Is there a lesion?", "yes", max_length=512)
    ids, labels = ex["input_ids"], ex["labels"]
    assert ids.shape == labels.shape
    trained = np.flatnonzero(labels != IGNORE_INDEX)
    answer = tok(" yes", add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<end_of_utterance>")]
    # the trained positions are exactly the trailing answer tokens, contiguous, and equal to the inputs there
    assert trained.tolist() == list(range(len(ids) - len(answer), len(ids)))
    assert ids[trained].tolist() == answer == labels[trained].tolist()
    # every image-related token and the whole user turn are masked
    for special in ("<image>", "<fake_token_around_image>"):
        positions = ids == tok.convert_tokens_to_ids(special)
        assert positions.any() and (labels[positions] == IGNORE_INDEX).all()
    prompt = tok.decode(ids[: trained[0]])
    assert "Is there a lesion?" in prompt and prompt.rstrip().endswith("Assistant:")


def test_prompt_is_the_generation_prompt(processor):
    """Training inputs start with exactly what inference feeds the model, so the two never drift apart."""
    train = encode_example(processor, _image(), "Answer briefly.", "What organ?", "chest", max_length=512)
    infer = encode_example(processor, _image(), "Answer briefly.", "What organ?", None, max_length=512)
    n = len(infer["input_ids"])
    assert train["input_ids"][:n].tolist() == infer["input_ids"].tolist() and "labels" not in infer


def test_truncation_cuts_the_answer_never_the_prompt(processor):
    long = " ".join(["lesion"] * 200)
    full = encode_example(processor, _image(), "Describe this radiology image.", "", long, max_length=10_000)
    cut = encode_example(processor, _image(), "Describe this radiology image.", "", long, max_length=100)
    n_prompt = int((full["labels"] == IGNORE_INDEX).sum())
    assert len(cut["input_ids"]) == max(100, n_prompt + 1)
    assert cut["input_ids"][:n_prompt].tolist() == full["input_ids"][:n_prompt].tolist()


def _column_batch(rows):
    """Rows -> the columnar batch Ray Data hands to collate: one 1-D object array per column."""
    out = {}
    for k in rows[0]:
        col = np.empty(len(rows), dtype=object)
        col[:] = [r[k] for r in rows]
        out[k] = col
    return out


def test_collate_pads_with_ignore_index_and_masks(processor):
    a = encode_example(processor, _image(0), "Answer briefly.", "Is there a lesion?", "yes", 512)
    b = encode_example(processor, _image(1), "Answer briefly.", "What is the size of the lesion?",
                       "large lesion in the left lung", 512)
    out = collate(_column_batch([a, b]), pad_token_id=processor.tokenizer.pad_token_id)
    la, lb = len(a["input_ids"]), len(b["input_ids"])
    short = 0 if la < lb else 1
    n = min(la, lb)
    assert out["input_ids"].shape == out["labels"].shape == out["attention_mask"].shape == (2, max(la, lb))
    assert (out["labels"][short, n:] == IGNORE_INDEX).all()
    assert (out["attention_mask"][short, n:] == 0).all() and (out["attention_mask"][short, :n] == 1).all()
    assert (out["input_ids"][short, n:] == processor.tokenizer.pad_token_id).all()
    assert out["pixel_values"].shape[:2] == (2, 1) and out["pixel_attention_mask"].dtype.is_floating_point is False


def test_collate_pads_images_of_different_sizes():
    ex = lambda h, w: {"input_ids": np.array([1, 2]), "labels": np.array([-100, 2]),
                       "pixel_values": np.ones((1, 3, h, w), np.float32), "pixel_attention_mask": np.ones((1, h, w), bool)}
    a, b = ex(32, 64), ex(64, 48)
    out = collate(_column_batch([a, b]), pad_token_id=0)
    assert out["pixel_values"].shape == (2, 1, 3, 64, 64)
    assert out["pixel_attention_mask"][0].sum() == 32 * 64 and out["pixel_attention_mask"][1].sum() == 64 * 48
    assert out["pixel_values"][0, 0, :, 32:].abs().sum() == 0
