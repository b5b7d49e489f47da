"""Helpers for the data and audit tests: encoded test images, tiny Hugging Face datasets on disk, and small folders
in the release layouts of SLAKE and VQA-RAD (generated images, never copies of the shared data)."""

from __future__ import annotations

import io
import json
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


def write_image(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(seed=seed))
    return path


# SLAKE 1.0 rows as released (train.json / validate.json / test.json); img_name is relative to imgs/.
SLAKE_ROWS = {
    "train": [
        {"img_id": 0, "img_name": "xmlab0/source.jpg", "question": "What modality is used to take this image?",
         "answer": "MRI", "q_lang": "en", "location": "Abdomen", "modality": "MRI", "answer_type": "OPEN",
         "base_type": "vqa", "content_type": "Modality", "triple": ["vhead", "_", "_"], "qid": 0},
        {"img_id": 0, "img_name": "xmlab0/source.jpg", "question": "Does the picture contain liver?",
         "answer": "Yes", "q_lang": "en", "location": "Abdomen", "modality": "MRI", "answer_type": "CLOSED",
         "base_type": "vqa", "content_type": "Organ", "triple": ["vhead", "_", "_"], "qid": 1},
        {"img_id": 0, "img_name": "xmlab0/source.jpg", "question": "这张图片的成像方式是什么?", "answer": "核磁共振",
         "q_lang": "zh", "location": "Abdomen", "modality": "MRI", "answer_type": "OPEN", "base_type": "vqa",
         "content_type": "Modality", "triple": ["vhead", "_", "_"], "qid": 2},
        {"img_id": 1, "img_name": "xmlab1/source.jpg", "question": "How many lungs are shown in this image?",
         "answer": 2, "q_lang": "en", "location": "Lung", "modality": "X-Ray", "answer_type": "OPEN",
         "base_type": "vqa", "content_type": "Quantity", "triple": ["vhead", "_", "_"], "qid": 3},
        {"img_id": 1, "img_name": "xmlab1/source.jpg", "question": "What is the function of the lung?",
         "answer": "Breathe", "q_lang": "en", "location": "Lung", "modality": "X-Ray", "answer_type": "OPEN",
         "base_type": "kvqa", "content_type": "KG", "triple": ["Lung", "Function", "?"], "qid": 4},
    ],
    "validate": [
        {"img_id": 2, "img_name": "xmlab2/source.jpg", "question": "Is this a CT image?", "answer": "Yes",
         "q_lang": "en", "location": "Brain", "modality": "CT", "answer_type": "CLOSED", "base_type": "vqa",
         "content_type": "Modality", "triple": ["vhead", "_", "_"], "qid": 5},
    ],
    "test": [
        {"img_id": 0, "img_name": "xmlab0/source.jpg", "question": "Does the picture contain the liver?",
         "answer": "Yes", "q_lang": "en", "location": "Abdomen", "modality": "MRI", "answer_type": "CLOSED",
         "base_type": "vqa", "content_type": "Organ", "triple": ["vhead", "_", "_"], "qid": 6},
        {"img_id": 3, "img_name": "xmlab3/source.jpg", "question": "Where is the abnormality?",
         "answer": "Left Lung", "q_lang": "en", "location": "Lung", "modality": "CT", "answer_type": "OPEN",
         "base_type": "vqa", "content_type": "Position", "triple": ["vhead", "_", "_"], "qid": 7},
        {"img_id": 4, "img_name": "xmlab4/source.jpg", "question": "Which organ is abnormal?", "answer": "Heart",
         "q_lang": "en", "location": "Chest_heart", "modality": "X-Ray", "answer_type": "OPEN", "base_type": "vqa",
         "content_type": "Abnormality", "triple": ["vhead", "_", "_"], "qid": 8},  # image not shipped
        {"img_id": 5, "img_name": "../../outside.jpg", "question": "Is this a CT image?", "answer": "No",
         "q_lang": "en", "location": "Lung", "modality": "X-Ray", "answer_type": "CLOSED", "base_type": "vqa",
         "content_type": "Modality", "triple": ["vhead", "_", "_"], "qid": 9},  # escapes the dataset folder
    ],
}


def slake_release(root: Path) -> Path:
    """A small SLAKE 1.0 folder in the release layout (images generated; xmlab4 left out on purpose) and a valid
    image just outside it, at ``root.parent / 'outside.jpg'``, which the escaping ``img_name`` of qid 9 names."""
    for split, rows in SLAKE_ROWS.items():
        root.mkdir(parents=True, exist_ok=True)
        (root / f"{split}.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    for k in (0, 1, 2, 3):
        write_image(root / "imgs" / f"xmlab{k}" / "source.jpg", seed=10 + k)
    write_image(root.parent / "outside.jpg", seed=99)
    return root


def vqa_rad_item(qid, image: str, question: str, answer, phrase_type: str, group: str, frame: str = "NULL",
                 rephrase: str = "NULL", organ: str = "CHEST", answer_type: str = "CLOSED") -> dict:
    """One record of ``VQA_RAD Dataset Public.json`` with every field of the release."""
    return {"qid": qid, "phrase_type": phrase_type, "qid_linked_id": group,
            "image_case_url": "https://medpix.nlm.nih.gov/case?id=x", "image_name": image, "image_organ": organ,
            "evaluation": "given", "question": question, "question_rephrase": rephrase,
            "question_relation": "strict agreement", "question_frame": frame, "question_type": "PRES",
            "answer": answer, "answer_type": answer_type}


def vqa_rad_release(root: Path, items: list[dict], image_seeds: dict[str, int]) -> Path:
    """A VQA-RAD folder in the release layout: the JSON and ``VQA_RAD Image Folder/`` with generated images."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(items), encoding="utf-8")
    for name, seed in image_seeds.items():
        write_image(root / "VQA_RAD Image Folder" / name, seed=seed)
    return root
