"""Synthetic radiology phantoms: 64x64 images whose captions and answers are functions of the image.

A tiny model can only beat the text-only baseline on these by looking at the image, so learning and image use are
measurable offline. Each record draws a ground truth (modality ct | x-ray | mri, organ head | chest | abdomen, lesion
present/absent, side left | right, size small | large), renders it, and states it as a ROCO-style caption or a
VQA-RAD-style question-answer. ``meta`` carries the ground truth (an evaluator picks same-modality swap images).
Ultrasound (``OOD_MODALITIES``) is drawn only for an explicit anatomy such as 'ultrasound/abdomen': the evaluation's
out-of-distribution set for phantom runs (``ood_anatomy``), a modality no phantom training set contains.

Conventions:
- ``side`` is the *patient's* side, drawn in radiological convention: the patient's left is on the image's right.
- Lesions are bright discs (intensity 1.0 over tissue <= 0.75) of radius ~4 px (small) or ~10 px (large).
- Yes/no answers are balanced: for a closed question the answer is drawn first (p=0.5) and the image made to match.
- Deterministic per (task, seed, split, index): same arguments, same bytes (numpy's PCG64 + PIL's PNG encoder).
"""

from __future__ import annotations

import hashlib
import io
import json
import zlib

import numpy as np

SIZE = 64
MODALITIES = ("ct", "x-ray", "mri")
# A family no default phantom set draws (only an explicit anatomy such as 'ultrasound/abdomen'): a real distribution
# shift for the evaluation's out-of-distribution condition. Sector field of view, speckle, depth attenuation.
OOD_MODALITIES = ("ultrasound",)
ORGANS = ("head", "chest", "abdomen")
SIDES = ("left", "right")
LESION_SIZES = ("small", "large")
RADIUS = {"small": 4.0, "large": 10.0}  # pixels at 64 px
QUESTION_TYPES = ("PRES", "POS", "SIZE", "ORGAN", "MODALITY")
LESION_QUESTION_TYPES = ("PRES", "POS", "SIZE")
ANSWER_VOCAB = ("yes", "no", "left", "right", "small", "large", "none", "head", "chest", "abdomen", "ct", "x-ray",
                "mri")
# How captions name each modality; a caption always contains this word (tests rely on it).
MODALITY_WORD = {"ct": "CT", "x-ray": "X-ray", "mri": "MRI", "ultrasound": "ultrasound"}
_MODALITY_PHRASE = {"ct": ("Axial CT", "Contrast-enhanced axial CT"), "x-ray": ("Frontal X-ray", "Plain X-ray"),
                    "mri": ("Axial MRI", "Axial T2-weighted MRI"),
                    "ultrasound": ("Transverse ultrasound", "Grey-scale ultrasound")}
_REGION = {"head": "{side} side of the brain", "chest": "{side} lung", "abdomen": "{side} side of the abdomen"}
_LESION_Y = {"head": 30.0, "chest": 30.0, "abdomen": 31.0}
_TASKS = {"caption": 1, "vqa": 2}

_Y, _X = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)


# ------------------------------------------------------------------------------------------------ drawing


class _Canvas:
    """Float image in [0, 1] with shape helpers in jittered (shifted, scaled) coordinates."""

    def __init__(self, dx: float, dy: float, scale: float):
        self.x = (_X - 32.0 - dx) / scale  # centred coordinates: (0, 0) is the body centre
        self.y = (_Y - 32.0 - dy) / scale
        self.img = np.zeros((SIZE, SIZE), np.float32)

    def ellipse(self, cx, cy, rx, ry):
        return ((self.x - cx) / rx) ** 2 + ((self.y - cy) / ry) ** 2 <= 1.0

    def fill(self, mask, value):
        self.img[mask] = value

    def ring(self, cx, cy, rx, ry, width, value):
        self.img[self.ellipse(cx, cy, rx, ry) & ~self.ellipse(cx, cy, rx - width, ry - width)] = value


def _axial(c: _Canvas, organ: str, mri: bool, rng: np.random.Generator) -> None:
    """Cross-sections (CT and MRI). MRI contrast: fat bright, cortical bone dark, CSF bright, air black."""
    bone, fat, soft = (0.12, 0.85, 0.5) if mri else (0.95, 0.3, 0.5)
    if organ == "head":
        c.fill(c.ellipse(0, 0, 23, 27), fat if mri else bone)   # scalp (MRI) / skull (CT)
        c.fill(c.ellipse(0, 0, 21, 25), bone)                    # skull
        c.fill(c.ellipse(0, 0, 18.5, 22.5), soft)                # brain
        if mri:  # gyri: a sulcal texture only MRI shows at this size
            brain = c.ellipse(0, 0, 18.5, 22.5)
            c.img[brain] += 0.12 * np.sin(c.x[brain] * 1.3) * np.sin(c.y[brain] * 1.3)
        csf = 0.9 if mri else 0.15
        c.fill(c.ellipse(-4, -1, 2.5, 7) | c.ellipse(4, -1, 2.5, 7), csf)  # ventricles
    else:
        ry = 21 if organ == "chest" else 22
        c.fill(c.ellipse(0, 0, 29, ry), fat)                     # subcutaneous fat
        c.fill(c.ellipse(0, 0, 26.5, ry - 2.5), soft)            # body
        c.fill(c.ellipse(0, 13, 4, 4), bone)                     # vertebral body
        if organ == "chest":
            c.fill(c.ellipse(-13, -2, 10, 13) | c.ellipse(13, -2, 10, 13), 0.02 if mri else 0.08)  # lungs
            c.fill(c.ellipse(3, 0, 7, 7), 0.45 if mri else 0.6)  # heart (patient's left: image right)
        else:
            c.fill(c.ellipse(-10, -3, 11, 9), 0.35 if mri else 0.62)      # liver (patient's right: image left)
            c.fill(c.ellipse(-12, 8, 4, 5) | c.ellipse(12, 8, 4, 5), 0.6 if mri else 0.68)  # kidneys
            for _ in range(3):  # bowel gas / fluid
                c.fill(c.ellipse(rng.uniform(2, 14), rng.uniform(-10, 2), 2.5, 2.5), 0.75 if mri else 0.05)


def _projection(c: _Canvas, organ: str, rng: np.random.Generator) -> None:
    """Frontal radiographs: summed attenuation, air black, bone bright, body a vertical silhouette."""
    if organ == "head":
        c.fill(c.ellipse(0, 0, 22, 27), 0.9)                     # skull vault
        c.fill(c.ellipse(0, 0, 18, 23), 0.45)
        c.fill(c.ellipse(-8, 3, 4.5, 4) | c.ellipse(8, 3, 4.5, 4), 0.2)  # orbits
        c.fill(c.ellipse(0, 20, 12, 5) & (c.y > 18), 0.8)        # mandible
    else:
        torso = (np.abs(c.x) < 27) & (c.y > -30) & c.ellipse(0, 10, 30, 44)
        c.fill(torso, 0.35)
        if organ == "chest":
            lungs = c.ellipse(-12, -2, 9, 19) | c.ellipse(12, -2, 9, 19)
            c.fill(lungs, 0.1)
            for k in range(6):  # ribs: bright curved bands across the lung fields
                band = np.abs(c.y - (-19 + 7 * k) - 0.012 * c.x ** 2) < 1.1
                c.img[band & lungs] = 0.55
            c.fill(c.ellipse(-11, -22, 10, 1.6) | c.ellipse(11, -22, 10, 1.6), 0.75)  # clavicles
            c.fill((np.abs(c.x - 1) < 5) & (c.y > -24) & (c.y < 20), 0.7)      # mediastinum + spine
        else:
            spine = (np.abs(c.x) < 4) & (np.mod(c.y, 6) > 1.2)
            c.fill(spine & torso, 0.8)                                          # lumbar vertebrae
            c.ring(-13, 26, 12, 9, 2.5, 0.75)
            c.ring(13, 26, 12, 9, 2.5, 0.75)                                    # iliac wings
            for _ in range(4):
                c.fill(c.ellipse(rng.uniform(-18, 18), rng.uniform(-16, 8), 3, 2), 0.08)  # bowel gas


_APEX_Y, _SECTOR_HALF_ANGLE = -31.0, np.deg2rad(48)  # the probe at the top edge; the fan's half opening


def _ultrasound(c: _Canvas, organ: str, lesion: bool, side: str, size: str, rng: np.random.Generator) -> np.ndarray:
    """A B-mode ultrasound: a fan-shaped field of view from a probe at the top, multiplicative speckle, depth
    attenuation, organ echoes (abdomen: liver and a kidney; chest: pleural line and A-lines; head: the falx and the
    ventricles). A lesion is an echogenic disc with an acoustic shadow beneath it, at the same place and size as in
    the other modalities (patient's left on the image's right). Returns the image in [0, 1] before noise."""
    depth = np.hypot(c.x, c.y - _APEX_Y)
    fan = (np.abs(np.arctan2(c.x, c.y - _APEX_Y)) < _SECTOR_HALF_ANGLE) & (depth > 4) & (depth < 62)
    echo = np.full((SIZE, SIZE), 0.32, np.float32)
    if organ == "abdomen":
        echo[c.ellipse(-6, -6, 20, 12)] = 0.45                   # liver parenchyma
        echo[c.ellipse(10, 14, 8, 5)] = 0.55                      # kidney cortex
        echo[c.ellipse(10, 14, 5, 2.5)] = 0.85                    # renal sinus fat
    elif organ == "chest":
        for k in range(4):                                        # pleural line, then its A-line reverberations
            echo[np.abs(c.y - (-20 + 11 * k)) < 0.9] = 0.9 - 0.15 * k
    else:
        echo[(np.abs(c.x) < 0.9) & (np.abs(c.y) < 22)] = 0.85     # falx: the midline echo
        echo[c.ellipse(-5, -2, 2.5, 6) | c.ellipse(5, -2, 2.5, 6)] = 0.05  # fluid-filled ventricles: anechoic
    if lesion:
        sign = 1.0 if side == "left" else -1.0
        cx, cy = sign * (13 + rng.uniform(-1.5, 1.5)), _LESION_Y[organ] - 32.0 + rng.uniform(-2, 2)
        r = RADIUS[size] * rng.uniform(0.9, 1.1)
        below = (np.abs(c.x - cx) < r * 0.8) & (c.y > cy + r)
        echo[below] *= 0.35                                       # acoustic shadow
        echo[c.ellipse(cx, cy, r, r)] = 1.0                       # echogenic lesion
    speckle = rng.rayleigh(0.8, (SIZE, SIZE)).astype(np.float32)
    speckle = (speckle + np.roll(speckle, 1, 0) + np.roll(speckle, 1, 1)) / 3  # grain of ~2 px
    gain = np.exp(-depth / 90.0)
    return np.where(fan, echo * speckle * gain, 0.0).astype(np.float32)


def render_phantom(modality: str, organ: str, lesion: bool, side: str, size: str,
                   rng: np.random.Generator | int = 0) -> np.ndarray:
    """A (64, 64, 3) uint8 image of the given ground truth; ``rng`` drives jitter and noise."""
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    c = _Canvas(rng.uniform(-2, 2), rng.uniform(-2, 2), rng.uniform(0.94, 1.06))
    if modality == "ultrasound":
        img = _ultrasound(c, organ, lesion, side, size, rng) + rng.standard_normal((SIZE, SIZE),
                                                                                 dtype=np.float32) * 0.02
        g = (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        return np.repeat(g[:, :, None], 3, axis=2)
    if modality == "x-ray":
        _projection(c, organ, rng)
    else:
        _axial(c, organ, modality == "mri", rng)
    img = c.img
    if modality == "mri":  # smooth coil bias field and stronger noise: a texture CT/X-ray lack
        phase = rng.uniform(0, 2 * np.pi)
        img = img * (0.85 + 0.2 * np.cos(c.x / 20 + phase))
        sigma = 0.05
    else:
        sigma = 0.025
    if lesion:
        sign = 1.0 if side == "left" else -1.0  # patient's left on the image's right
        cx = sign * (13 + rng.uniform(-1.5, 1.5))
        cy = _LESION_Y[organ] - 32.0 + rng.uniform(-2, 2)
        r = RADIUS[size] * rng.uniform(0.9, 1.1)
        img[c.ellipse(cx, cy, r, r)] = 1.0  # after the bias field: equally strong everywhere
    img = img * rng.uniform(0.92, 1.05) + rng.standard_normal((SIZE, SIZE), dtype=np.float32) * sigma
    g = (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return np.repeat(g[:, :, None], 3, axis=2)


def encode_png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array, "RGB").save(buf, format="PNG", compress_level=1)  # level 1: ~3x faster, ~10% larger
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ text


def caption(truth: dict, variant: int = 0) -> str:
    mod = _MODALITY_PHRASE[truth["modality"]][variant % 2]
    head = f"{mod} of the {truth['organ']}"
    if truth["lesion"]:
        where = _REGION[truth["organ"]].format(side=truth["side"])
        return f"{head} showing a {truth['size']} lesion in the {where}."
    return f"{head} with no focal lesion." if variant % 2 == 0 else f"{head} showing no lesion."


def _other(rng: np.random.Generator, values: tuple, not_this: str) -> str:
    rest = [v for v in values if v != not_this]
    return rest[int(rng.integers(len(rest)))]


def _pick(rng: np.random.Generator, values: tuple) -> str:
    return values[int(rng.integers(len(values)))]


_MODALITY_Q = {"ct": "Is this a CT scan?", "x-ray": "Is this an X-ray?", "mri": "Is this an MRI?",
               "ultrasound": "Is this an ultrasound?"}


def parse_anatomy(anatomy: str) -> tuple[str, str]:
    """'ct/chest' -> ('ct', 'chest'); a ValueError naming the choices otherwise."""
    modality, _, organ = anatomy.partition("/")
    if modality not in MODALITIES + OOD_MODALITIES or organ not in ORGANS:
        raise ValueError(f"phantom anatomy {anatomy!r} must be '<modality>/<organ>' with modality in "
                         f"{MODALITIES + OOD_MODALITIES} and organ in {ORGANS}")
    return modality, organ


def ood_anatomy(anatomy: str) -> str:
    """The out-of-distribution phantom anatomy for training phantoms of ``anatomy`` ('' = all nine): ultrasound, a
    modality no phantom training set draws, of the trained organ (the abdomen when every organ is trained)."""
    organ = parse_anatomy(anatomy)[1] if anatomy else "abdomen"
    return f"{OOD_MODALITIES[0]}/{organ}"


def _question(rng: np.random.Generator, truth: dict, qtypes: tuple = QUESTION_TYPES) -> tuple[str, str, str, str]:
    """Pick a question of one of ``qtypes``, adjusting ``truth`` in place so a closed answer is yes with p=0.5.
    Returns (question, answer, answer_type, question_type)."""
    qtype = _pick(rng, qtypes)
    closed = qtype == "PRES" or rng.random() < 0.5
    if closed:
        yes = bool(rng.random() < 0.5)
        answer = "yes" if yes else "no"
        if qtype == "PRES":
            truth["lesion"] = yes
            return _pick(rng, ("Is there a lesion?", "Is a lesion present?")), answer, "closed", qtype
        if qtype == "POS":
            probe = _pick(rng, SIDES)
            truth.update(lesion=True, side=probe if yes else _other(rng, SIDES, probe))
            return f"Is the lesion on the {probe} side?", answer, "closed", qtype
        if qtype == "SIZE":
            probe = _pick(rng, LESION_SIZES)
            truth.update(lesion=True, size=probe if yes else _other(rng, LESION_SIZES, probe))
            return f"Is the lesion {probe}?", answer, "closed", qtype
        if qtype == "ORGAN":
            probe = _pick(rng, ORGANS)
            truth["organ"] = probe if yes else _other(rng, ORGANS, probe)
            return f"Does this image show the {probe}?", answer, "closed", qtype
        probe = _pick(rng, MODALITIES)
        truth["modality"] = probe if yes else _other(rng, MODALITIES, probe)
        return _MODALITY_Q[probe], answer, "closed", qtype
    if qtype == "POS":
        return "Which side is the lesion on?", truth["side"] if truth["lesion"] else "none", "open", qtype
    if qtype == "SIZE":
        return "What is the size of the lesion?", truth["size"] if truth["lesion"] else "none", "open", qtype
    if qtype == "ORGAN":
        return _pick(rng, ("What organ is shown?", "Which organ is this?")), truth["organ"], "open", qtype
    return _pick(rng, ("What is the imaging modality?", "What modality is this?")), truth["modality"], "open", qtype


# ------------------------------------------------------------------------------------------------ records


def _rng(task: str, seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(split.encode()), int(index), _TASKS[task]])


def phantom_record(index: int, task: str = "vqa", seed: int = 0, split: str = "train", anatomy: str = "") -> dict:
    """One phantom record (already SCHEMA-shaped, ``meta`` as a JSON string), deterministic per its arguments.
    ``anatomy`` ('ct/chest'): every image has that modality and organ and every question is about the lesion
    (presence, side, size), so every image-dependent answer needs the lesion to be read; '' draws all nine."""
    if task not in _TASKS:
        raise ValueError(f"phantom task must be one of {list(_TASKS)}, got {task!r}")
    modalities, organs, qtypes = MODALITIES, ORGANS, QUESTION_TYPES
    if anatomy:
        modality, organ = parse_anatomy(anatomy)
        modalities, organs, qtypes = (modality,), (organ,), LESION_QUESTION_TYPES
    rng = _rng(task, seed, split, index)
    truth = {"modality": _pick(rng, modalities), "organ": _pick(rng, organs), "lesion": bool(rng.random() < 0.5),
             "side": _pick(rng, SIDES), "size": _pick(rng, LESION_SIZES)}
    if task == "vqa":
        prompt, target, answer_type, question_type = _question(rng, truth, qtypes)
    else:
        prompt, target, answer_type, question_type = "", caption(truth, int(rng.integers(2))), "", ""
    image = encode_png(render_phantom(truth["modality"], truth["organ"], truth["lesion"], truth["side"],
                                      truth["size"], rng))
    meta = {"modality": truth["modality"], "organ": truth["organ"],
            "lesion": "present" if truth["lesion"] else "absent",
            "side": truth["side"] if truth["lesion"] else "none",
            "size": truth["size"] if truth["lesion"] else "none",
            "task": task, "seed": int(seed), "index": int(index)}
    return {
        "id": f"phantom-{task}-{split}-{int(index)}",
        "image": image,
        "image_id": hashlib.sha1(image).hexdigest(),
        "image_name": f"phantom_{task}_{split}_{int(index):06d}.png",
        "prompt": prompt, "target": target, "answer_type": answer_type, "question_type": question_type,
        "split": split, "source": "phantom", "meta": json.dumps(meta, sort_keys=True), "reject_reason": "",
    }


def phantom_records(task: str = "vqa", n: int = 256, seed: int = 0, split: str = "train",
                    anatomy: str = "") -> list[dict]:
    """Records 0..n-1; any prefix of a longer list is the shorter list (indices are independent draws)."""
    return [phantom_record(i, task, seed, split, anatomy) for i in range(n)]
