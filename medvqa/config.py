"""Typed run configuration: dataclasses with a doc per field, YAML presets, dotted overrides.

Merge order: dataclass defaults -> preset YAML -> ``key=value`` overrides. Unknown keys and values of the wrong type
are errors that name the key. This module imports neither torch nor ray, so the CLI's ``--help`` stays instant.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

PRESETS_DIR = Path(__file__).parent / "presets"

# Projections of the text model, modality projection and perceiver resampler; never the vision encoder, whose
# q/k/v_proj a plain suffix list would also catch (GUIDE §5).
LORA_TARGET_REGEX = (
    r".*(text_model|connector\.modality_projection|connector\.perceiver_resampler)"
    r".*(q|k|v|o|gate|up|down)_proj$"
)


# The phantom generator's anatomies (data/phantoms.py (MODALITIES + OOD_MODALITIES) x ORGANS; a test keeps the two in
# step): spelled out here so that checking a config needs no import of the generator. Ultrasound is a family no
# default phantom set draws: the phantom runs' out-of-distribution test set.
PhantomAnatomy = Literal["", "ct/head", "ct/chest", "ct/abdomen", "x-ray/head", "x-ray/chest", "x-ray/abdomen",
                         "mri/head", "mri/chest", "mri/abdomen", "ultrasound/head", "ultrasound/chest",
                         "ultrasound/abdomen"]
#: the evaluation conditions (medvqa/conditions.py builds their question rows)
Condition = Literal["true", "swapped", "blank", "expert", "few_shot", "medhalt", "ood"]
#: the models of the evaluation matrix
MatrixModel = Literal["base", "single_stage", "two_stage"]
Protocol = Literal["official", "image_disjoint"]


class ConfigError(ValueError):
    """A preset or override that does not fit the schema; the message names the offending key."""


def doc(default: Any = dataclasses.MISSING, help: str = "", factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field carrying its documentation (shown by ``medvqa config --help-fields``)."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"doc": help})
    return field(default=default, metadata={"doc": help})


@dataclass
class ModelConfig:
    name_or_path: str = doc("tiny", "HF hub id or local folder of an Idefics2 checkpoint; 'tiny' builds (once, "
                                    "cached) a randomly initialised ~0.4M-parameter Idefics2 offline.")
    quantization: Literal["4bit", "none"] = doc("4bit", "'4bit': bitsandbytes NF4 QLoRA (as the study); 'none': "
                                                        "full-precision base with LoRA.")
    compute_dtype: Literal["auto", "bfloat16", "float32"] = doc(
        "auto", "Compute dtype of the 4-bit layers and autocast: 'auto' = bfloat16 on CUDA, float32 on CPU. "
                "Never float16: the study's fp16 compute gave NaN gradients.")
    double_quant: bool = doc(True, "Nested quantization of the 4-bit scales (saves ~0.4 bit/param).")
    gradient_checkpointing: bool = doc(False, "Recompute activations in backward: less memory, ~30% slower.")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = doc(
        "sdpa", "Attention kernels of the vision tower, perceiver and text model: 'sdpa' (PyTorch's fused "
                "scaled_dot_product_attention, transformers' default), 'eager' (plain matmul + softmax: "
                "materialises every attention matrix, 4900x4900 per head for a 980-px image), 'flash_attention_2' "
                "(needs the flash-attn package and a CUDA GPU).")
    do_image_splitting: bool = doc(False, "Idefics2 image splitting into 4 crops + global (study: off).")
    longest_edge: Optional[int] = doc(None, "Resize images so the longest edge is this many pixels; None keeps the "
                                            "processor's default (980 for Idefics2-8B, 64 for tiny).")
    cache_dir: str = doc("~/.cache/medvqa", "Where the tiny model is built and cached (hub downloads use the "
                                                 "standard Hugging Face cache, HF_HOME).")
    seed: int = doc(0, "Seed for building the tiny model (same seed -> same weights).")


@dataclass
class LoraConfig:
    r: int = doc(8, "LoRA rank; higher: more capacity and memory.")
    alpha: int = doc(8, "LoRA scaling numerator (scale = alpha / r).")
    dropout: float = doc(0.1, "Dropout on the LoRA input.")
    init: Literal["gaussian", "default"] = doc("gaussian", "LoRA A init: 'gaussian' (study) or PEFT's kaiming.")
    target_regex: str = doc(LORA_TARGET_REGEX, "Regex over full module names selecting LoRA targets.")


@dataclass
class DataConfig:
    kind: Literal["phantom", "vqa_rad", "vqa_rad_hf", "roco", "roco_hf", "pathvqa", "pathvqa_hf", "slake"] = doc(
        "phantom", "Source adapter: 'phantom' synthetic radiographs; 'vqa_rad' original JSON + image folder; "
                   "'roco' original captions.txt + image folder; 'pathvqa' released layout (pvqa_<split>.json + "
                   "images/<split>/); 'slake' SLAKE 1.0 release (train/validate/test.json + imgs/, English "
                   "questions only); 'vqa_rad_hf' / 'roco_hf' / 'pathvqa_hf' HF dataset id, parquet or save_to_disk "
                   "folder. Image names read from dataset files must stay inside data.path (else rejected).")
    path: str = doc("", "Folder, parquet file or HF dataset id (unused for 'phantom').")
    split: str = doc("train", "Split to read ('train', 'test', 'validation').")
    task: Literal["caption", "vqa"] = doc("vqa", "Which phantom records to generate (caption or question-answer).")
    limit: Optional[int] = doc(None, "Use only the first N records after a seeded shuffle (ROCO subset size).")
    num_records: int = doc(256, "Phantom records to generate.")
    phantom_anatomy: PhantomAnatomy = doc("", "Phantoms only: one 'modality/organ' (e.g. 'ct/chest') for every "
                                              "image, with questions only about the lesion (presence, side, size); "
                                              "'' draws all nine.")
    seed: int = doc(0, "Seed for phantoms and subset sampling.")
    validation_fraction: float = doc(0.0, "Carve about this fraction of the split's images out as a validation set "
                                          "(image-disjoint: every question of an image falls on one side; seeded by "
                                          "data.seed); training uses the rest. Sweeps score trials on it, never on "
                                          "the test split. Under either protocol it is carved from the training "
                                          "side.")
    protocol: Protocol = doc("official", "Which records are training and which are test, for training, the "
                                         "validation carve, the evaluation's test set and the report's leakage "
                                         "statement alike: 'official' the source's splits as released (VQA-RAD: "
                                         "446 of 451 test questions have their image in training); "
                                         "'image_disjoint' pools the released splits and re-splits them by image "
                                         "(content hash; seeded by data.seed, stratified by organ when the records "
                                         "name one): no test image is trained on. split='train' / 'test' pick the "
                                         "side. VQA sources only; phantoms are image-disjoint as generated.")
    test_fraction: float = doc(0.2, "protocol=image_disjoint: about this fraction of the pooled questions is on the "
                                    "test side, whole images at a time (VQA-RAD's official test split is 451 of "
                                    "2,248 = 0.2).")


@dataclass
class StageConfig:
    enabled: bool = doc(True, "Run this stage.")
    task: Literal["caption", "vqa"] = doc("vqa", "'caption' (stage 1, ROCO) or 'vqa' (stage 2, VQA-RAD).")
    prompt: str = doc("Answer briefly.", "Instruction appended to the question (vqa) or the whole prompt (caption).")
    data: DataConfig = doc(factory=DataConfig, help="Training data source.")
    epochs: float = doc(1.0, "Passes over the data.")
    max_steps: Optional[int] = doc(None, "Stop after this many optimizer steps (overrides epochs when smaller).")
    lr: float = doc(1e-4, "Peak AdamW learning rate.")
    global_batch_size: int = doc(16, "Examples per optimizer step over all workers: the experiment's batch, the same "
                                     "whatever the worker count (paper: 16 = 2 x 8 x 1 GPU). The micro-batches per "
                                     "step follow from it: global_batch_size / (batch_size x resources.num_workers), "
                                     "which must be a whole number.")
    batch_size: int = doc(2, "Per-worker micro-batch size: a memory knob; the experiment's batch is "
                             "global_batch_size.")
    grad_accum: Optional[int] = doc(None, "Micro-batches per optimizer step on each worker. None (recommended): "
                                          "derived from global_batch_size; given, it must agree with it.")
    warmup_steps: int = doc(50, "Linear warm-up, in optimizer steps.")
    schedule: Literal["linear", "cosine", "constant"] = doc("linear", "Decay after warm-up.")
    weight_decay: float = doc(0.01, "AdamW weight decay.")
    max_grad_norm: float = doc(1.0, "Gradient clipping norm (0 disables).")
    max_length: int = doc(512, "Truncate token sequences to this many tokens (answers are never cut mid-prompt).")
    validate_every_n_steps: Optional[int] = doc(None, "With data.validation_fraction > 0: answer and score the "
                                                      "validation questions every N optimizer steps (None: at the "
                                                      "end of every epoch) and at the end; reported as val_* metrics.")


@dataclass
class ResourcesConfig:
    num_workers: int = doc(1, "Ray Train workers (one per GPU on a cluster).")
    use_gpu: bool = doc(False, "Train workers (and each sweep trial's workers) run on GPUs.")
    gpus_per_worker: float = doc(1.0, "GPUs reserved per Train worker with use_gpu. A fraction (0.5, 0.25) packs "
                                      "several 4-bit trials of a sweep on one large GPU: Ray shares the GPU but "
                                      "not its memory, so pick a fraction whose share of the GPU's memory holds a "
                                      "trial's peak (bench/gpu.py measures it). Above 1: a whole number.")
    cpus_per_worker: float = doc(0.5, "CPUs reserved per Train worker. Fractional on small machines: a worker "
                                      "holding a whole CPU starves Ray Data's tasks on 2 cores and the run hangs.")
    data_cpus_per_task: float = doc(0.25, "CPUs per Ray Data preprocessing task.")
    data_concurrency: int = doc(2, "Max parallel Ray Data preprocessing tasks per Train worker (each worker streams "
                                   "its own part of every epoch).")
    data_buffer_mb: Optional[int] = doc(None, "Cap on the object-store memory (MiB) Ray Data may hold in flight for "
                                              "a worker's stream; bounds a streamed stage's memory whatever the data "
                                              "size. None: Ray's default share of the object store.")
    num_cpus: Optional[int] = doc(None, "CPUs for a locally started Ray (None: all).")
    worker_resource: Optional[str] = doc(None, "A custom Ray resource that only worker nodes carry (e.g. "
                                               "'medvqa_worker', set with `ray start --resources` or a KubeRay "
                                               "group's rayStartParams; any amount >= 1): Train workers, Ray Data "
                                               "tasks and predictor actors each ask for 0.001 of it, so they run on "
                                               "those nodes, never on the head. None: anywhere.")


@dataclass
class RunConfig:
    name: str = doc("tiny", "Human-readable prefix of the run id.")
    output_dir: str = doc("runs", "Parent folder of run directories: a path (relative: below $MEDVQA_RUNS_BASE, else "
                                  "the cwd) or a URI of any storage pyarrow.fs supports (s3://bucket/runs, gs://, "
                                  "abfs://; S3-compatible endpoint from $AWS_ENDPOINT_URL). Every artifact of the "
                                  "run goes there.")
    seed: int = doc(0, "Seed for data order, LoRA init and everything stochastic.")
    handoff: Literal["continue", "merge"] = doc("continue", "Stage 1 -> 2: 'continue' trains the same adapter "
                                                           "(study); 'merge' merges it and starts a fresh LoRA.")
    log_every_n_steps: int = doc(1, "Report loss, lr, samples/s, tokens/s every N optimizer steps.")
    checkpoint_every_n_steps: int = doc(50, "Checkpoint adapter, optimizer, scheduler and data position.")
    max_failures: int = doc(2, "Ray Train restarts from the latest checkpoint after a worker failure.")
    max_reject_fraction: float = doc(0.05, "Stop with an error when more than this fraction of records is rejected.")
    evaluate: bool = doc(False, "Run the evaluation matrix (base vs this run; `medvqa eval`, settings in eval.*) "
                                "after training.")
    tracking: Literal["none", "mlflow"] = doc("none", "'mlflow': log params, per-step and evaluation metrics and "
                                                      "the report to MLflow (medvqa.tracking); 'none': off.")
    tracking_uri: str = doc("", "MLflow tracking URI; '' takes $MLFLOW_TRACKING_URI, else "
                                "sqlite:///<output_dir>/mlflow.db (a local store, no server).")
    tracking_experiment: str = doc("medvqa", "MLflow experiment the run is logged under.")
    tracking_adapters: bool = doc(False, "Upload the finished adapters as MLflow artifacts (default: only their path, "
                                         "tag medvqa.adapters; a paper-preset adapter is ~100 MB).")
    verbose: bool = doc(False, "Show Ray's own output (execution plans, worker start-up, checkpoint paths) on the "
                               "terminal; by default it goes to RUN_DIR/logs/ and the terminal shows progress bars.")


@dataclass
class EvalConfig:
    conditions: list[Condition] = doc(factory=lambda: ["true", "swapped", "blank", "expert", "few_shot", "medhalt",
                                                       "ood"], help=(
        "Evaluation conditions: 'true' (the test split), 'swapped' (each question on another test image), 'blank' "
        "(each question on a uniform mid-gray image of its image's size: what the model answers from the text "
        "alone), 'expert' (the expert-radiologist prompt), 'few_shot' (eval.few_shot_k solved examples from the "
        "training side first, as earlier chat turns), 'medhalt' (Med-HALT nonsense questions; eval.medhalt_path), "
        "'ood' (eval.ood_path; for a phantom run ultrasound phantoms, a modality no phantom run trains on). A "
        "condition whose source is missing is skipped and listed with its reason. A list, or comma-separated: "
        "eval.conditions=true,swapped."))
    models: list[MatrixModel] = doc(factory=lambda: ["base", "single_stage", "two_stage"], help=(
        "Models of the matrix: 'base' (no adapter), 'two_stage' (the run), 'single_stage' (stage 2 straight from the "
        "base model, with the run's stage-2 config, data and seed: `medvqa train run.evaluate=true` trains it as a "
        "sibling run directory <run.name>-single-stage-<hash> beside the run; `medvqa eval` uses it when it is "
        "there). For a run without stage 1 the run itself is the single-stage model."))
    protocol: Literal["", "official", "image_disjoint"] = doc(
        "", "The test set's protocol: '' the run's stage2.data.protocol; the other one evaluates on that protocol's "
            "test set, and every fine-tuned model's overlap with it (images it trained on) is measured and reported "
            "(official training saw most image-disjoint test images, and the reverse).")
    test_limit: Optional[int] = doc(None, "Evaluate a seeded subset of this many test questions (None: all).")
    seed: Optional[int] = doc(None, "Seed of the swaps, the few-shot examples, the Med-HALT subset and image draws "
                                    "and the bootstrap; None: run.seed.")
    few_shot_k: int = doc(1, "few_shot: solved examples before each question (the study stored a 1-shot run), "
                             "drawn per question (seeded) from the training side of the protocol, never from the test "
                             "side, never on the question's own image.")
    few_shot_seed: Optional[int] = doc(None, "Seed of the few-shot draws; None: the evaluation seed.")
    medhalt_path: str = doc("", "Med-HALT reasoning_fake.csv for the medhalt condition ('' or a missing file: "
                                "medhalt is skipped, with the reason in the report).")
    medhalt_limit: Optional[int] = doc(100, "Med-HALT questions (a seeded subset; None: all 1,858).")
    ood_path: str = doc("", "PathVQA test source for the ood condition: the released layout (pvqa_test.json + "
                            "images/test/), an HF id, parquet or save_to_disk folder. '': ultrasound phantoms for a "
                            "phantom run, else ood is skipped (listed with the reason).")
    max_new_tokens: int = doc(16, "Greedy decoding budget, the same for every model (VQA answers are a few words). "
                                  "Part of the predictions' resume key: a change predicts every cell anew.")
    batch_size: int = doc(8, "Questions per generate call (answers do not depend on it: left-padded greedy decoding).")
    concurrency: int = doc(2, "Predictor actors; each loads the base model once with every model's adapters.")
    cpus_per_actor: float = doc(0.5, "CPUs per predictor actor. Fractional on small machines: whole-CPU actors "
                                     "starve Ray Data's read tasks on 2 cores and the job hangs.")
    gpus_per_actor: Optional[float] = doc(None, "GPUs per predictor actor; None: 1 with resources.use_gpu, else 0. "
                                                "Fractional (e.g. 0.25) packs several actors on one large GPU "
                                                "(each holds its own copy of the model).")
    feature_cache_mb: float = doc(512.0, "Per-actor cache of image features (vision encoder + connector), MB: each "
                                         "image is encoded once for all its questions; 0 turns it off (answers are "
                                         "identical either way). 512 holds ~1,000 Idefics2-8B images.")
    n_boot: int = doc(1000, "Bootstrap resamples for every confidence interval and paired test.")


@dataclass
class Config:
    run: RunConfig = doc(factory=RunConfig, help="Run identity, hand-off, logging and fault tolerance.")
    model: ModelConfig = doc(factory=ModelConfig, help="Base model and quantization.")
    lora: LoraConfig = doc(factory=LoraConfig, help="LoRA adapter.")
    stage1: StageConfig = doc(factory=lambda: StageConfig(
        task="caption", prompt="Describe this radiology image.", epochs=3, lr=1e-5,
        data=DataConfig(kind="phantom", task="caption")), help="Stage 1: radiology captioning (ROCO).")
    stage2: StageConfig = doc(factory=lambda: StageConfig(task="vqa", epochs=2, lr=1e-4),
                              help="Stage 2: medical VQA (VQA-RAD).")
    resources: ResourcesConfig = doc(factory=ResourcesConfig, help="Ray resources.")
    eval: EvalConfig = doc(factory=EvalConfig, help="The evaluation matrix (`medvqa eval`, run.evaluate); not part "
                                                     "of the run id.")

    def stages(self) -> list[tuple[str, StageConfig]]:
        """Enabled stages in training order."""
        return [(n, s) for n, s in (("stage1", self.stage1), ("stage2", self.stage2)) if s.enabled]


# ----------------------------------------------------------------------------------------------- construction


def _check_value(key: str, tp: Any, value: Any) -> Any:
    """Coerce ``value`` to type ``tp`` or raise a ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check_value(key, inner, value)
    if origin is list:
        (inner,) = typing.get_args(tp)
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list):
            items = [value]  # a single YAML scalar, e.g. eval.conditions=true
        return [_check_value(f"{key}[{i}]", inner, v.strip() if isinstance(v, str) else v)
                for i, v in enumerate(items)]
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and str(value).lower() in choices:
            value = str(value).lower()  # YAML reads `true` as a boolean; the condition is named 'true'
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads '1e-5' (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp}")


def _merge(obj: Any, data: dict, prefix: str = "") -> Any:
    """Return a copy of dataclass ``obj`` with ``data`` (a nested dict) merged in, type-checked."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    updates = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{full}' (known: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            updates[key] = _merge(current, value, full + ".")
        else:
            updates[key] = _check_value(full, hints[key], value)
    return dataclasses.replace(obj, **updates)


def parse_overrides(overrides: list[str]) -> dict:
    """``["stage1.lr=1e-5", "lora.r=16"]`` -> nested dict; values are parsed as YAML scalars."""
    nested: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. stage2.lr=1e-4)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = nested
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r} conflicts with another override")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return nested


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def named_yaml(name: str, folder: Path, what: str) -> Path:
    """``name`` as an existing YAML path, else ``folder/<name>.yaml``; a ConfigError saying ``what`` is unknown and
    listing the known names otherwise."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    path = folder / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in folder.glob("*.yaml"))
        raise ConfigError(f"{what} {name!r} (known: {', '.join(known)}; or pass a YAML path)")
    return path


def preset_path(preset: str) -> Path:
    """A preset name (``paper``) or a path to a YAML file (e.g. a sweep's best config)."""
    return named_yaml(preset, PRESETS_DIR, "unknown preset")


def grad_accum_steps(stage: StageConfig, resources: ResourcesConfig, name: str = "stage") -> int:
    """Micro-batches per optimizer step on each worker: ``global_batch_size / (batch_size x num_workers)``. A
    ConfigError naming the keys when that is not a whole number or disagrees with an explicit ``grad_accum``."""
    per_round = stage.batch_size * resources.num_workers
    if stage.global_batch_size % per_round:
        raise ConfigError(f"{name}.global_batch_size={stage.global_batch_size} is not a multiple of {name}.batch_size "
                          f"x resources.num_workers = {stage.batch_size} x {resources.num_workers}; change one of "
                          f"them (the global batch is the experiment, the other two only how it is computed)")
    accum = stage.global_batch_size // per_round
    if stage.grad_accum is not None and stage.grad_accum != accum:
        raise ConfigError(f"{name}.grad_accum={stage.grad_accum} disagrees with {name}.global_batch_size / "
                          f"({name}.batch_size x resources.num_workers) = {stage.global_batch_size} / "
                          f"({stage.batch_size} x {resources.num_workers}) = {accum}; set {name}.grad_accum=null "
                          f"(it follows from the global batch) or make them agree")
    return accum


def validate(cfg: Config) -> Config:
    """Cross-field checks that types alone cannot express."""
    if not cfg.stages():
        raise ConfigError("stage1.enabled and stage2.enabled are both false: nothing to train")
    for name, stage in cfg.stages():
        for key in ("global_batch_size", "batch_size", "grad_accum", "max_length"):
            if getattr(stage, key) is not None and getattr(stage, key) < 1:
                raise ConfigError(f"{name}.{key}: must be >= 1")
        if stage.lr <= 0:
            raise ConfigError(f"{name}.lr: must be > 0")
        if stage.epochs <= 0 and not stage.max_steps:
            raise ConfigError(f"{name}.epochs: must be > 0 (or set {name}.max_steps)")
        if not 0 <= stage.data.validation_fraction < 1:
            raise ConfigError(f"{name}.data.validation_fraction: must be in [0, 1)")
        if stage.data.validation_fraction and stage.task != "vqa":
            raise ConfigError(f"{name}.data.validation_fraction: validation scores answers, so it needs task=vqa")
        if stage.validate_every_n_steps is not None and stage.validate_every_n_steps < 1:
            raise ConfigError(f"{name}.validate_every_n_steps: must be >= 1 (or null for every epoch)")
        if stage.data.kind != "phantom" and not stage.data.path:
            raise ConfigError(f"{name}.data.path: required for data.kind={stage.data.kind!r}")
        if stage.data.protocol == "image_disjoint":
            if stage.task != "vqa":
                raise ConfigError(f"{name}.data.protocol: image_disjoint re-splits VQA sources; use official for "
                                  f"task={stage.task}")
            if stage.data.split not in ("train", "test"):
                raise ConfigError(f"{name}.data.split: image_disjoint has the sides 'train' and 'test', not "
                                  f"{stage.data.split!r} (carve validation with data.validation_fraction)")
        if not 0 < stage.data.test_fraction < 1:
            raise ConfigError(f"{name}.data.test_fraction: must be in (0, 1)")
    if cfg.lora.r < 1:
        raise ConfigError("lora.r: must be >= 1")
    if not 0 <= cfg.lora.dropout < 1:
        raise ConfigError("lora.dropout: must be in [0, 1)")
    if not 0 <= cfg.run.max_reject_fraction <= 1:
        raise ConfigError("run.max_reject_fraction: must be in [0, 1]")
    if cfg.resources.num_workers < 1:
        raise ConfigError("resources.num_workers: must be >= 1")
    if cfg.resources.cpus_per_worker <= 0 or cfg.resources.data_cpus_per_task <= 0:
        raise ConfigError("resources.cpus_per_worker and data_cpus_per_task: must be > 0")
    validate_eval(cfg)
    g = cfg.resources.gpus_per_worker
    if g <= 0 or (g > 1 and g != int(g)):
        raise ConfigError(f"resources.gpus_per_worker: must be a fraction in (0, 1] or a whole number, got {g}")
    if cfg.model.attn_implementation == "flash_attention_2" and not cfg.resources.use_gpu:
        raise ConfigError("model.attn_implementation=flash_attention_2 needs resources.use_gpu=true (CUDA only)")
    for name, stage in cfg.stages():
        grad_accum_steps(stage, cfg.resources, name)
    return cfg


def validate_eval(cfg: Config) -> None:
    e = cfg.eval
    for key in ("max_new_tokens", "batch_size", "concurrency", "n_boot", "test_limit", "medhalt_limit",
                "few_shot_k"):
        if getattr(e, key) is not None and getattr(e, key) < 1:
            raise ConfigError(f"eval.{key}: must be >= 1")
    for key in ("conditions", "models"):
        if len(set(getattr(e, key))) != len(getattr(e, key)):
            raise ConfigError(f"eval.{key}: {getattr(e, key)} names one twice")
    if e.cpus_per_actor <= 0:
        raise ConfigError("eval.cpus_per_actor: must be > 0")
    if e.feature_cache_mb < 0:
        raise ConfigError("eval.feature_cache_mb: must be >= 0")
    if e.gpus_per_actor is not None and (e.gpus_per_actor < 0 or (e.gpus_per_actor > 0 and not cfg.resources.use_gpu)):
        raise ConfigError("eval.gpus_per_actor: must be >= 0, and > 0 only with resources.use_gpu=true")


def node_resources(resources: ResourcesConfig) -> dict[str, float]:
    """Custom Ray resources for a Train worker, Ray Data task or predictor actor: a sliver of
    ``resources.worker_resource`` (it never limits how many run on a node), or none."""
    return {resources.worker_resource: 0.001} if resources.worker_resource else {}


def actor_gpus(cfg: Config) -> float:
    """GPUs each predictor actor takes: ``eval.gpus_per_actor``, else 1 with ``resources.use_gpu``, else 0."""
    if cfg.eval.gpus_per_actor is not None:
        return cfg.eval.gpus_per_actor
    return 1.0 if cfg.resources.use_gpu else 0.0


def _load_preset(preset: str, seen: tuple = ()) -> Config:
    """A preset YAML merged over defaults; a top-level ``base: other`` merges over that preset instead, so a
    variant (e.g. the single-stage baseline) states only what differs and cannot drift from its parent."""
    path = preset_path(preset)
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a preset must be a mapping")
    base = data.pop("base", None)
    if base in seen:
        raise ConfigError(f"{path}: circular 'base: {base}'")
    parent = _load_preset(base, seen + (preset,)) if base else Config()
    return _merge(parent, data)


def load_config(preset: str = "tiny", overrides: list[str] | None = None) -> Config:
    """Defaults -> preset YAML (-> its base) -> overrides, then validated."""
    cfg = _load_preset(preset)
    if overrides:
        cfg = _merge(cfg, parse_overrides(overrides))
    return validate(cfg)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict, overrides: list[str] | tuple = ()) -> Config:
    """Rebuild a Config from ``to_dict`` output (e.g. a run's resolved config.yaml), with dotted ``key=value``
    ``overrides`` merged on top."""
    cfg = _merge(Config(), _with_global_batch(data))
    return validate(_merge(cfg, parse_overrides(list(overrides))) if overrides else cfg)


def _with_global_batch(data: dict) -> dict:
    """A config written before ``global_batch_size`` existed stated ``grad_accum``: its global batch was
    batch_size x grad_accum x num_workers."""
    workers = (data.get("resources") or {}).get("num_workers", 1)
    out = dict(data)
    for name in ("stage1", "stage2"):
        stage = data.get(name)
        if isinstance(stage, dict) and stage.get("grad_accum") and "global_batch_size" not in stage:
            out[name] = {**stage, "global_batch_size": stage.get("batch_size", 2) * stage["grad_accum"] * workers}
    return out


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def field_docs(obj: Any = None, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, current value, doc) for every leaf field, for ``medvqa config``."""
    obj = Config() if obj is None else obj
    rows = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            rows += field_docs(value, f"{prefix}{f.name}.")
        else:
            rows.append((f"{prefix}{f.name}", repr(value), f.metadata.get("doc", "")))
    return rows
