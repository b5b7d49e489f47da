"""Small helpers for tests/test_data.py: encoded test images and tiny Hugging Face datasets on disk."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

# The shared data folder sits beside the project (/work/shared next to /work/main); absent elsewhere.
SHARED = Path(__file__).resolve().parents[2] / "shared"
DATA = SHARED / "data"


def image_bytes(fmt: str = "JPEG", size: tuple[int, int] = (48, 32), seed: int = 0) -> bytes:
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format=fmt)
    return buf.getvalue()


def hf_vqa_dataset(n: int = 6, decode: bool = True):
    """A tiny VQA dataset with an HF ``Image`` column; every third answer is 'yes', one is 'no'."""
    import datasets

    answers = ["yes" if i % 3 == 0 else ("no" if i == 1 else f"answer {i}") for i in range(n)]
    ds = datasets.Dataset.from_dict({
        "image": [{"bytes": image_bytes(seed=i), "path": f"img{i}.jpg"} for i in range(n)],
        "question": [f"Question {i}?" for i in range(n)],
        "answer": answers,
    })
    return ds.cast_column("image", datasets.Image(decode=decode))


def hf_caption_dataset(n: int = 5):
    import datasets

    ds = datasets.Dataset.from_dict({
        "image_id": [f"ROCO_{i:05d}" for i in range(n)],
        "image": [{"bytes": image_bytes("PNG", seed=100 + i), "path": None} for i in range(n)],
        "caption": [f" Axial CT   of case {i}. " for i in range(n)],
    })
    return ds.cast_column("image", datasets.Image())
