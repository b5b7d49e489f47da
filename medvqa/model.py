"""Model loading: quantization and LoRA builders, the stage hand-off, and the freeze policy.

Plain functions (GUIDE §2.5). The two entry points:

* ``load_model(cfg, use_gpu, stage1_adapter=None, handoff=None)`` -> a PeftModel ready to train:
  - no ``stage1_adapter``: a fresh LoRA named ``default`` (stage 1, or a single-stage run);
  - ``handoff="continue"``: the stage-1 adapter, loaded trainable, keeps training as ``default`` (the study);
  - ``handoff="merge"``: the stage-1 adapter loaded frozen as ``stage1`` plus a fresh trainable ``stage2``, both
    active (``model.active_adapters == ["stage1", "stage2"]``, ``model.active_adapter == "stage2"``). This equals
    merging stage 1 into the base and training a new LoRA on top, without merging into 4-bit weights (lossy: the
    merged delta would be re-quantized); stage 1's dropout is switched off, as merged weights have none.
* ``load_inference_model(cfg, adapters, use_gpu)`` -> the base model (no adapters: the baseline) or a frozen
  PeftModel with one or more adapters active, in eval mode; ``run_adapters(cfg, adapters_dir)`` says which
  adapters a finished run's model consists of.

``save_adapter`` writes the trainable adapter so that plain ``PeftModel.from_pretrained(base, out_dir)`` loads it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Optional

from medvqa.config import Config, LoraConfig, ModelConfig
from medvqa.storage import StoragePath, local_copy

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Module groups for describe_trainable, matched in order against full parameter names.
GROUPS = ("vision_model", "connector.modality_projection", "connector.perceiver_resampler", "text_model")
OTHER = "lm_head/other"


# ------------------------------------------------------------------------------------------------- builders


def resolve_model_path(mcfg: ModelConfig) -> str:
    """'tiny' -> the cached tiny model folder (built on first use); anything else (hub id, folder) as is."""
    if mcfg.name_or_path == "tiny":
        from medvqa.tiny import tiny_model_path

        return str(tiny_model_path(mcfg.cache_dir, mcfg.seed))
    return mcfg.name_or_path


def compute_dtype(mcfg: ModelConfig, use_gpu: bool) -> "torch.dtype":
    """'auto': bfloat16 on a GPU that supports it, else float32. float16 is never chosen: the study's fp16 compute on
    a 4-bit model gave NaN gradients."""
    import torch

    if mcfg.compute_dtype == "float32":
        return torch.float32
    if mcfg.compute_dtype == "bfloat16":
        return torch.bfloat16
    if use_gpu and torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        log.warning("GPU without bfloat16 support: computing in float32 (float16 gives NaN gradients)")
    return torch.float32


def build_quantization_config(mcfg: ModelConfig, dtype: "torch.dtype"):
    """NF4 4-bit BitsAndBytesConfig for ``quantization='4bit'``, else None.

    Quantized: text model, connector and vision tower, as in the study (transformers' default), so our baselines run
    at the study's precision. Kept in ``dtype``: only ``lm_head`` (transformers' default skip, listed explicitly
    because passing any skip list replaces the default): output logits are sensitive to quantization error and for
    Idefics2-8B it is only 131M of 8B parameters.
    """
    if mcfg.quantization != "4bit":
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=mcfg.double_quant,
        bnb_4bit_compute_dtype=dtype,
        llm_int8_skip_modules=["lm_head"],
    )


def build_lora_config(lcfg: LoraConfig):
    """peft.LoraConfig; ``target_modules`` is a regex string, which PEFT full-matches against module names."""
    import peft

    return peft.LoraConfig(
        r=lcfg.r,
        lora_alpha=lcfg.alpha,
        lora_dropout=lcfg.dropout,
        init_lora_weights="gaussian" if lcfg.init == "gaussian" else True,
        target_modules=lcfg.target_regex,
        bias="none",
        task_type=None,  # Idefics2 is not a plain causal LM; the generic PeftModel wraps it unchanged
    )


def load_processor(mcfg: ModelConfig):
    """The processor the data pipeline uses (image splitting and longest edge set on the image processor object)."""
    from medvqa.data.pipeline import cached_processor

    return cached_processor(resolve_model_path(mcfg), mcfg.do_image_splitting, mcfg.longest_edge)


# ------------------------------------------------------------------------------------------------- base model


def disable_bnb_cpu_repack(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights on CPU; returns the number of Linear4bit layers changed.

    On CPUs with AVX512-BF16, the first forward pass of a ``Linear4bit`` in eval mode without grad repacks its weight
    into a CPU kernel layout, in place. Training after that computes *silently wrong* LoRA gradients (56 of 62
    differed in our test) or crashes under gradient checkpointing ("a view of a leaf Variable ..."); repacking also
    needs in_features % 64 == 0 and out_features % 32 == 0. So any eval pass (validation, generation) before or
    during training would corrupt it. Turning it off also keeps eval logits equal to training-mode ones (the packed
    kernel computes in bf16: ~3e-3 logit difference). A layer already repacked is unpacked back, approximately
    (repacking rounded its scales to bf16), so call this right after loading.
    """
    import bitsandbytes as bnb
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            state = getattr(module.weight, "quant_state", None)
            if state is not None and getattr(state, "packing_format_for_cpu", False):
                module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                    module.weight.data, state)
            n += 1
    return n


def cuda_index(env: Mapping[str, str], device_count: int, current: int) -> int:
    """Which visible GPU a process's model goes on, from its environment ``env`` (``os.environ``):

    1. ``ACCELERATE_TORCH_DEVICE`` ('cuda:N'): Ray Train sets it in every worker to ``ray.train.torch.get_device()``,
       the GPU Ray assigned (its position in CUDA_VISIBLE_DEVICES, which lists every GPU of the node's workers);
    2. ``LOCAL_RANK``: launchers that start one process per GPU of a node (torchrun; Ray sets it too);
    3. ``current``, the current CUDA device: 0 in a plain process, e.g. a process alone on its GPU.

    An index beyond the ``device_count`` visible GPUs is an error naming its source: wrapping it around would put
    two ranks on one GPU without a word."""
    device = env.get("ACCELERATE_TORCH_DEVICE", "")
    if device.startswith("cuda"):
        source, index = "ACCELERATE_TORCH_DEVICE", int(device.partition(":")[2] or 0)
    elif env.get("LOCAL_RANK", "").strip():
        source, index = "LOCAL_RANK", int(env["LOCAL_RANK"])
    else:
        source, index = "the current CUDA device", current
    if not 0 <= index < device_count:
        raise RuntimeError(f"{source} selects GPU {index}, but this process sees {device_count} GPU(s) "
                           f"(CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '<unset>')})")
    return index


def require_cuda(where: str) -> None:
    """Raise when this process sees no CUDA device: ``resources.use_gpu=true`` must never fall back to a CPU run
    silently (hours of a 4-bit model on CPU, fp32 instead of bf16, predictions labelled as GPU ones). ``where``: who
    asks (the driver, a Train worker, a predictor actor), for the message."""
    import torch

    if torch.cuda.is_available():
        return
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    raise RuntimeError(
        f"resources.use_gpu=true but {where} sees no CUDA device (torch {torch.__version__}, {build}; "
        f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}). Run on a machine or Ray node "
        "with a GPU and a CUDA build of torch, or set resources.use_gpu=false to train and predict on CPUs.")


def worker_device(use_gpu: bool) -> "torch.device":
    """The device of this process's model: its local rank's GPU (``cuda_index``) with ``use_gpu`` (an error when
    CUDA is not visible: ``require_cuda``), else the CPU."""
    import torch

    if use_gpu:
        require_cuda("this process")
        return torch.device("cuda", cuda_index(os.environ, torch.cuda.device_count(), torch.cuda.current_device()))
    return torch.device("cpu")


def _default_device_map(use_gpu: bool) -> dict:
    device = worker_device(use_gpu)
    return {"": device.index if device.type == "cuda" else "cpu"}  # the whole model on one device


def gpu_memory(device) -> dict:
    """CUDA memory of ``device`` in GiB -- ``gpu_allocated_gib``/``gpu_reserved_gib`` now and their peaks since the
    previous call (``gpu_peak_allocated_gib``/``gpu_peak_reserved_gib``; the peaks are reset, so each logged window
    reports its own) -- or {} on a CPU. Reserved is what the caching allocator holds (what nvidia-smi shows of this
    process, less the CUDA context); allocated is what tensors use."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return {}
    gib = 2.0**30
    out = {"gpu_allocated_gib": torch.cuda.memory_allocated(device) / gib,
           "gpu_reserved_gib": torch.cuda.memory_reserved(device) / gib,
           "gpu_peak_allocated_gib": torch.cuda.max_memory_allocated(device) / gib,
           "gpu_peak_reserved_gib": torch.cuda.max_memory_reserved(device) / gib}
    torch.cuda.reset_peak_memory_stats(device)
    return {k: round(v, 3) for k, v in out.items()}


def load_base_model(mcfg: ModelConfig, use_gpu: bool, device_map=None, training: bool = True):
    """Idefics2ForConditionalGeneration, 4-bit NF4 or full precision in the compute dtype, all parameters frozen.

    ``training=True``: 4-bit models go through ``prepare_model_for_kbit_training`` (freezes the base; upcasts
    non-quantized bf16/fp16 parameters, e.g. norms, embeddings and lm_head, to fp32 for stable training -- a no-op on
    CPU, where everything is already fp32); activation (gradient) checkpointing is turned on when
    ``mcfg.gradient_checkpointing``. ``training=False`` skips both: inference keeps the compute dtype, in eval mode.
    Attention kernels: ``mcfg.attn_implementation``; the device: this process's GPU (``worker_device``) or the CPU.
    """
    from transformers import Idefics2ForConditionalGeneration

    dtype = compute_dtype(mcfg, use_gpu)
    quant = build_quantization_config(mcfg, dtype)
    model = Idefics2ForConditionalGeneration.from_pretrained(
        resolve_model_path(mcfg), dtype=dtype, quantization_config=quant, attn_implementation=mcfg.attn_implementation,
        device_map=device_map if device_map is not None else _default_device_map(use_gpu))
    if quant is not None:
        disable_bnb_cpu_repack(model)  # matters on CPU only; a no-op flag on GPU
    if training and quant is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)  # checkpointing below
    else:
        for p in model.parameters():
            p.requires_grad_(False)
    if training and mcfg.gradient_checkpointing:
        set_activation_checkpointing(model, True)
    if not training:
        model.eval()
    return model


def set_activation_checkpointing(model, enabled: bool) -> None:
    """Turn activation (gradient) checkpointing of a transformers model on or off. On: non-reentrant, so gradients
    reach the LoRA weights without the inputs requiring grad, and no KV cache (useless in training, incompatible
    with checkpointing)."""
    new_name = hasattr(model, "activation_checkpointing_enable")  # transformers >= 5.2x; older: gradient_...
    if enabled:
        if new_name:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    elif new_name:
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


# ------------------------------------------------------------------------------------------------- adapters


def load_model(cfg: Config, use_gpu: bool = False, stage1_adapter: Optional[str] = None,
               handoff: Optional[Literal["continue", "merge"]] = None, device_map=None):
    """The PeftModel to train (see the module docstring for the three cases).

    ``stage1_adapter``: folder (or URI: ``medvqa.storage.local_copy`` fetches it) written by ``save_adapter`` at
    the end of stage 1; ``handoff`` defaults to ``cfg.run.handoff``. Seed torch before calling: a fresh LoRA's A
    matrices are drawn from torch's global RNG.
    Only LoRA parameters of the trainable adapter require grad; the summary is logged.
    """
    from peft import PeftModel, get_peft_model

    base = load_base_model(cfg.model, use_gpu, device_map=device_map, training=True)
    handoff = handoff or cfg.run.handoff
    if stage1_adapter is not None:
        stage1_adapter = str(local_copy(stage1_adapter))
    if stage1_adapter is None:
        model = get_peft_model(base, build_lora_config(cfg.lora))
    elif handoff == "continue":
        model = PeftModel.from_pretrained(base, stage1_adapter, is_trainable=True)
    elif handoff == "merge":
        model = PeftModel.from_pretrained(base, stage1_adapter, adapter_name="stage1", is_trainable=False)
        model.add_adapter("stage2", build_lora_config(cfg.lora))
        model.base_model.set_adapter(["stage1", "stage2"])  # both active; this also makes both trainable ...
        _freeze_adapter(model, "stage1")  # ... so freeze stage 1 again
        model.active_adapter = "stage2"  # PeftModel's single "current" adapter (a str): the one being trained
    else:
        raise ValueError(f"handoff must be 'continue' or 'merge', got {handoff!r}")
    model.train()
    log.info("model: %s", describe_trainable(model))
    return model


def _freeze_adapter(model, name: str) -> None:
    """Freeze adapter ``name`` and drop its dropout, so it acts exactly like weights merged into the base."""
    import torch

    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer) and name in module.lora_A:
            for p in (*module.lora_A[name].parameters(), *module.lora_B[name].parameters()):
                p.requires_grad_(False)
            module.lora_dropout[name] = torch.nn.Identity()


def load_inference_model(cfg: Config, adapters: Mapping[str, str] | Sequence[str] = (), use_gpu: bool = False,
                         device_map=None):
    """Frozen model in eval mode for generation: the base model alone when ``adapters`` is empty (the baseline),
    else a PeftModel with every adapter loaded and active together (in the given order). ``adapters``: name ->
    folder, or folders (named after the folder); a URI is fetched by ``medvqa.storage.local_copy``. Same precision
    and quantization as training."""
    from peft import PeftModel

    base = load_base_model(cfg.model, use_gpu, device_map=device_map, training=False)
    if not adapters:
        return base
    if not isinstance(adapters, Mapping):
        names = [StoragePath(p).name for p in adapters]
        names = names if len(set(names)) == len(names) else [f"adapter{i}" for i in range(len(adapters))]
        adapters = dict(zip(names, adapters))
    (first, first_path), *rest = adapters.items()
    model = PeftModel.from_pretrained(base, str(local_copy(first_path)), adapter_name=first, is_trainable=False)
    for name, path in rest:
        model.load_adapter(str(local_copy(path)), adapter_name=name, is_trainable=False)
    model.base_model.set_adapter(list(adapters), inference_mode=True)
    model.active_adapter = list(adapters)[-1]
    model.eval()
    log.info("model: %s", describe_trainable(model))
    return model


def run_adapters(cfg: Config, adapters_dir: str | os.PathLike) -> dict[str, str]:
    """Adapters that make up a trained run's final model, in load order: the last stage's adapter, preceded by the
    stage-1 adapter when stage 2 was trained with ``handoff='merge'``. ``adapters_dir``: the run's ``adapters/`` (a
    path or URI; so are the values)."""
    names = [name for name, _ in cfg.stages()]
    if names != ["stage1", "stage2"] or cfg.run.handoff != "merge":
        names = names[-1:]
    return {n: str(StoragePath(adapters_dir) / n) for n in names}


def trainable_adapter(model) -> str:
    """Name of the adapter whose LoRA parameters require grad (the last active one if none do)."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name, layer in module.lora_A.items():
                if any(p.requires_grad for p in layer.parameters()):
                    return name
    active = model.active_adapter
    return active if isinstance(active, str) else active[-1]


def save_adapter(model, out_dir: str | Path, adapter_name: Optional[str] = None) -> Path:
    """Write one adapter (default: the trainable one) at the top level of ``out_dir`` -- adapter_config.json and
    adapter_model.safetensors -- whatever its name, so plain ``PeftModel.from_pretrained(base, out_dir)`` loads it
    (PEFT itself would put a non-'default' adapter in a subfolder). Overwrites; returns ``out_dir``."""
    name = adapter_name or trainable_adapter(model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp:
        model.save_pretrained(tmp, selected_adapters=[name])
        src = Path(tmp) / (name if name != "default" else "")
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.move(str(src / f), str(out_dir / f))
    return out_dir


# ------------------------------------------------------------------------------------------------- reporting


def _group(name: str) -> str:
    return next((g for g in GROUPS if g in name), OTHER)


def _numel(p) -> int:
    # Params4bit stores two 4-bit values per byte of its (uint8) storage.
    return p.numel() * 2 * p.element_size() if p.__class__.__name__ == "Params4bit" else p.numel()


def precision(model) -> str:
    """'4-bit NF4 (double quant), compute float32' or 'full precision bfloat16'."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            dq = " (double quant)" if getattr(state, "nested", False) else ""
            compute = str(module.compute_dtype).removeprefix("torch.")
            return f"4-bit {getattr(module.weight, 'quant_type', 'nf4').upper()}{dq}, compute {compute}"
    dtypes = {str(p.dtype).removeprefix("torch.") for n, p in model.named_parameters() if "lora_" not in n}
    return "full precision " + "/".join(sorted(dtypes))


def describe_trainable(model) -> str:
    """One line: trainable/total parameters overall and per module group, the precision and the adapters, e.g.
    'trainable 20,480/556,864 (3.68%) | text_model 15,360/205,696 | ... | 4-bit NF4 (double quant), compute
    float32 | adapters stage1 (frozen), stage2 (trainable)'."""
    counts = {g: [0, 0] for g in (*GROUPS, OTHER)}
    for name, p in model.named_parameters():
        n = _numel(p)
        counts[_group(name)][1] += n
        if p.requires_grad:
            counts[_group(name)][0] += n
    trainable = sum(c[0] for c in counts.values())
    total = sum(c[1] for c in counts.values())
    parts = [f"trainable {trainable:,}/{total:,} ({100 * trainable / max(total, 1):.2f}%)"]
    parts += [f"{g} {t:,}/{a:,}" for g, (t, a) in counts.items() if a]
    parts.append(precision(model))
    peft_config = getattr(model, "peft_config", None)
    if peft_config:
        train_name = trainable_adapter(model) if trainable else None
        parts.append("adapters " + ", ".join(
            f"{a} ({'trainable' if a == train_name else 'frozen'})" for a in peft_config))
    return " | ".join(parts)
