"""One typed config tree: dataclasses whose field help is the documentation, and the one place every
training default is written.

Loading is strict (schema.py): unknown keys, wrong types and conflicting values are collected and raised
together as one ConfigError, one problem per line, each naming the key and the fix. Keys that users paste
from a PEFT config (``bias``, ``task_type``, ``init_lora_weights: true``) are taken where they mean
something here and explained where they do not. This module imports no torch, so ``peftlab --help`` and
config validation stay instant.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from . import schema
from .errors import ConfigError
from .files import read_yaml
from .schema import setting

METHODS = ("full", "lora", "adalora", "dora")
# The section a run folder's config.yaml adds (versions, backbone path, data files): a record, not a setting.
RUN_RECORD_KEY = "_run"
# Where built-in datasets are looked for when data.data_dir is not set.
DATA_DIR_ENV = "PEFTLAB_DATA_DIR"
# Examples per evaluation and prediction batch (length-sorted): 64 measured faster than 32 or 128 on a
# 2-core CPU. The default of train.eval_batch_size, predict, evaluate and serve.
EVAL_BATCH_SIZE = 64

# Tuned on the embedded all-MiniLM-L6-v2 / Banking77 (README "Configuration"). A sentence-embedding
# model learns slowly through low-rank adapters at the 2e-4 of the usual BERT recipe, so adapters get a
# much larger rate; full fine-tuning moves every weight and wants a small one.
DEFAULT_LEARNING_RATE = {"full": 1e-4, "lora": 5e-3, "dora": 5e-3, "adalora": 5e-3}


@dataclass
class ModelConfig:
    name: str = setting(
        "default",
        "Backbone: 'default' (the embedded all-MiniLM-L6-v2), a local Hugging Face model folder, or a hub id.")
    max_length_tokens: int = setting(64, "Texts are truncated to this many tokens.")
    trust_remote_code: bool = setting(False, "Allow model code from the hub. Off: only built-in architectures load.")


@dataclass
class DataConfig:
    dataset: str | None = setting(
        "banking77", "Built-in dataset name (banking77, ag_news), or null when train_file is given.")
    data_dir: str | None = setting(
        None, "Folder holding built-in datasets (<data_dir>/banking77/train.csv …); default $PEFTLAB_DATA_DIR.")
    train_file: str | None = setting(None, "CSV, JSONL or Parquet file with training examples.")
    validation_file: str | None = setting(None, "Optional validation file; else a stratified split of train.")
    test_file: str | None = setting(None, "Test file; required with train_file.")
    text_columns: list[str] | None = setting(
        None, "Text column(s), joined with '. ' when several. Default: the dataset's own, else ['text'].")
    label_column: str | None = setting(None, "Label column. Default: the dataset's own, else 'label'.")
    validation_size: float = setting(
        0.1, "Stratified validation split when there is no validation file: a fraction (<1) or a count.")
    max_train_examples: int | None = setting(None, "Use a stratified subset of the training set (quick runs).")
    max_test_examples: int | None = setting(None, "Use a stratified subset of the test set (quick runs).")
    oos_label: str | None = setting(
        None, "The label that means 'none of the intents' (CLINC150's 'oos'): its validation and test examples "
        "measure out-of-scope rejection.")
    oos_train: Literal["threshold", "class"] = setting(
        "threshold", "With oos_label, its training examples are left out and rejection is by the scorer's "
        "threshold ('threshold', Larson et al.'s oos-threshold), or they train one more class and predicting "
        "it rejects ('class', oos-train).")
    known_intents: float | None = setting(
        None, "Open-intent protocol: train on this seeded random fraction of the intents (0.75: three in four, "
        "chosen by train.seed); the others are out of scope in validation and test.")


@dataclass
class AdapterConfig:
    method: Literal["full", "lora", "adalora", "dora"] = setting("lora", "Fine-tuning method.")
    r: int = setting(8, "LoRA/DoRA rank.")
    lora_alpha: float = setting(16, "LoRA scaling numerator (scale = lora_alpha / r, or / sqrt(r) with rsLoRA).")
    lora_dropout: float = setting(0.1, "Dropout on the adapter's input.")
    target_modules: str | list[str] = setting(
        "auto", "'auto' (per architecture: query+value or its equivalent), 'all-linear', or module names.")
    bias: Literal["none", "all", "lora_only"] = setting(
        "none", "Which biases train (PEFT's bias): none, all, or those of the adapted layers (lora_only).")
    use_rslora: bool = setting(False, "Rank-stabilised LoRA scaling (lora_alpha / sqrt(r)).")
    use_dora: bool = setting(False, "Weight-decomposed LoRA; method 'dora' sets it.")
    init_lora_weights: Literal["default", "gaussian", "pissa", "olora"] = setting(
        "default", "LoRA initialisation: PEFT's default (true), gaussian, PiSSA or OLoRA.")
    modules_to_save: list[str] = setting(
        [], "Extra modules trained in full and saved with the adapter (head and new weights always are).")
    init_r: int = setting(12, "AdaLoRA: initial rank of every module.")
    target_r: int = setting(8, "AdaLoRA: average rank per module after pruning (budget = target_r × modules).")
    tinit: int | None = setting(None, "AdaLoRA: optimizer steps of warm-up before pruning (default 10 %).")
    tfinal: int | None = setting(None, "AdaLoRA: final optimizer steps at fixed ranks (default 20 %).")
    deltaT: int = setting(10, "AdaLoRA: optimizer steps between two budget allocations.")
    beta1: float = setting(0.85, "AdaLoRA: EMA factor of the sensitivity.")
    beta2: float = setting(0.85, "AdaLoRA: EMA factor of the uncertainty.")
    orth_reg_weight: float = setting(0.5, "AdaLoRA: weight of the orthogonal regulariser.")


@dataclass
class TrainConfig:
    epochs: int = setting(5, "Training epochs.")
    batch_size: int = setting(32, "Examples per optimizer step, all processes together (before accumulation).")
    eval_batch_size: int = setting(EVAL_BATCH_SIZE, "Examples per evaluation batch (length-sorted).")
    learning_rate: float | None = setting(
        None, "Peak learning rate. Default per method: full 1e-4, lora/dora/adalora 5e-3.")
    head_learning_rate: float | None = setting(None, "Learning rate of the head; default learning_rate.")
    weight_decay: float = setting(0.01, "AdamW weight decay (not applied to biases and LayerNorm).")
    warmup_ratio: float = setting(0.06, "Fraction of optimizer steps with linear warmup.")
    lr_scheduler: Literal["linear", "cosine", "constant"] = setting("linear", "Schedule after warmup.")
    gradient_accumulation_steps: int = setting(1, "Batches accumulated per optimizer step.")
    max_grad_norm: float = setting(1.0, "Gradient clipping norm (0 disables).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = setting(
        "auto", "Mixed precision: auto is bf16 on a GPU that supports it, else fp32.")
    eval_every_steps: int = setting(0, "Evaluate every N optimizer steps; 0 evaluates once per epoch.")
    metric_for_best: Literal["accuracy", "f1", "loss"] = setting(
        "accuracy", "Validation metric that picks the best checkpoint.")
    save_top_k: int = setting(1, "Best checkpoints kept in the run folder during training.")
    checkpoint_every_steps: int = setting(
        0, "Also save the resume state every N optimizer steps; 0 saves it after each evaluation only.")
    early_stopping_patience: int = setting(0, "Stop after N evaluations without improvement; 0 disables.")
    final_epoch_on_train_and_validation: bool = setting(
        False, "After training, one more epoch on train+validation at a tenth of the peak learning rate, "
        "to use the validation examples too.")
    seed: int = setting(42, "Seed for splits, initialisation and data order.")
    num_threads: int = setting(0, "CPU threads for torch; 0 keeps torch's choice.")
    fast_dropout: bool = setting(
        True, "Draw dropout masks with torch.rand instead of bernoulli_ (about 10 % faster training on CPU; the "
        "same distribution, another random stream). false: nn.Dropout's own masks.")
    max_steps: int | None = setting(None, "Stop after this many optimizer steps (smoke tests).")
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = setting(
        [], "Experiment trackers that receive each evaluation, the test metrics and the hyperparameters: "
            "tensorboard, mlflow, wandb (each an extra: pip install 'peftlab[mlflow]').")
    tracking_dir: str | None = setting(
        None, "Folder for the trackers' local files (TensorBoard events, MLflow file store, W&B offline runs); "
        "default <run>/tracking.")
    tracking_project: str = setting("peftlab", "MLflow experiment and W&B project name.")


OOD_SCORERS = ("msp", "energy", "mahalanobis", "knn")


@dataclass
class OodConfig:
    method: Literal["none", "msp", "energy", "mahalanobis", "knn"] = setting(
        "none", "Out-of-scope rejection: none, or the score that decides — msp (calibrated top probability), "
        "energy (logsumexp of the logits), mahalanobis (distance to the nearest class mean of the pooled "
        "features), knn (cosine similarity to the k-th nearest training text). The report shows all of them.")
    keep_in_scope: float = setting(
        0.95, "The threshold keeps this fraction of in-scope validation texts; with out-of-scope validation "
              "examples (data.oos_label, data.known_intents) it maximises out-of-scope F1 instead.")
    label: str = setting("out_of_scope", "The label predict and serve give a rejected text.")
    knn_k: int = setting(10, "knn: which nearest training text (by cosine similarity) scores a text.")
    calibrate: bool = setting(
        True, "Fit a temperature on validation after training, so that scores are calibrated probabilities.")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ood: OodConfig = field(default_factory=OodConfig)
    output_dir: str = setting("runs", "Folder in which run folders are created.")
    run_name: str | None = setting(None, "Run folder name; default <dataset>-<method>-<time>.")

    @property
    def learning_rate(self) -> float:
        """The effective peak learning rate (the method's tuned default when unset)."""
        return self.train.learning_rate or DEFAULT_LEARNING_RATE[self.adapter.method]


@dataclass
class ServeLimits:
    """Request and batching limits; YAML ``limits:`` keys and CLI flags use these names."""

    max_texts_per_request: int = setting(64, "texts per request")
    max_chars_per_text: int = setting(2000, "characters per text")
    max_body_bytes: int = setting(1_000_000, "request body size in bytes")
    max_batch_texts: int = setting(128, "texts per model call, over the requests it combines")
    # 0 by default: measured on 2 CPU cores (bench/serve.py, MiniLM), 5 ms cost latency at every concurrency
    # and gained no throughput, since requests that arrive while a batch runs are combined anyway and CPU
    # cost grows with batch size.
    max_wait_ms: float = setting(
        0, "how long a batch waits for more requests (0: requests that arrive while the model is busy form "
           "the next batch)")


def make_limits(values: dict | None = None, source: str | None = None) -> ServeLimits:
    """ServeLimits from a dict, refusing unknown keys, wrong types and values out of range."""
    problems: list[str] = []
    notes: list[str] = []
    limits = schema.build(ServeLimits, values or {}, "limits.", problems, notes)
    for key, value in asdict(limits).items():
        if key == "max_wait_ms" and value < 0:  # the only float: 0 turns the collection window off
            problems.append(f"limits.max_wait_ms must be a number >= 0, not {value:g}")
        elif key != "max_wait_ms" and value < 1:
            problems.append(f"limits.{key} must be an integer >= 1, not {value!r}")
    if problems:
        raise ConfigError(problems, source, notes)
    return limits


# Names other tools use for our keys (transformers' TrainingArguments, PEFT, common notebooks).
ALIASES = {
    "train.lr": "train.learning_rate", "train.num_train_epochs": "train.epochs", "train.num_epochs": "train.epochs",
    "train.per_device_train_batch_size": "train.batch_size", "train.lr_scheduler_type": "train.lr_scheduler",
    "train.per_device_eval_batch_size": "train.eval_batch_size", "train.fp16": "train.precision",
    "train.bf16": "train.precision", "model.max_length": "model.max_length_tokens",
    "model.model_name_or_path": "model.name", "adapter.rank": "adapter.r", "adapter.alpha": "adapter.lora_alpha",
    "adapter.dropout": "adapter.lora_dropout", "adapter.peft_type": "adapter.method",
    "adapter.base_model_name_or_path": "model.name",
}


def _peft_keys(adapter: dict, problems: list[str]) -> dict:
    """The ``adapter`` section with keys pasted from a PEFT LoraConfig/AdaLoraConfig taken or explained:
    values peftlab always uses are accepted and dropped, the others are problems that say why."""
    out = dict(adapter)
    task = out.pop("task_type", "SEQ_CLS")
    if str(task).upper().removeprefix("TASKTYPE.") != "SEQ_CLS":
        problems.append(f"adapter.task_type: peftlab trains sequence classifiers, always task_type SEQ_CLS "
                        f"(got {task!r}); remove the key")
    for key, usual, why in (
            ("inference_mode", False, "peftlab trains with it off and loads saved adapters with it on"),
            ("fan_in_fan_out", False, "it is for GPT-2-style Conv1D layers; encoders use nn.Linear")):
        if key in out and out.pop(key) != usual:
            problems.append(f"adapter.{key}: {why}; remove the key")
    if "total_step" in out:
        out.pop("total_step")
        problems.append("adapter.total_step: peftlab counts AdaLoRA's total_step itself (optimizer steps from "
                        "train.epochs, train.batch_size and the data); remove the key")
    init = out.get("init_lora_weights")
    if init is True:
        out["init_lora_weights"] = "default"  # PEFT's True is its default initialisation
    elif init is False:
        out.pop("init_lora_weights")
        problems.append("adapter.init_lora_weights: false (PEFT's random non-zero start, meant for its tests) is "
                        "not offered; use default, gaussian, pissa or olora")
    return out


def _check(cfg: Config, problems: list[str]) -> None:
    """Cross-field rules: combinations that PEFT or the loop would reject later, or silently misuse."""
    a, t, d = cfg.adapter, cfg.train, cfg.data
    if a.method == "adalora":
        if a.use_dora:
            problems.append("adapter.use_dora: AdaLoRA does not support DoRA — use method=dora or method=adalora alone")
        if a.target_r > a.init_r:
            problems.append(f"adapter.target_r ({a.target_r}) must not exceed adapter.init_r ({a.init_r})")
        if a.init_lora_weights in ("pissa", "olora"):
            problems.append(f"adapter.init_lora_weights: {a.init_lora_weights} is a LoRA option; AdaLoRA "
                            "initialises its own SVD triplets — use method=lora or init_lora_weights=default")
        if a.deltaT < 1:
            problems.append("adapter.deltaT must be at least 1")
        for key, low in (("tinit", 0), ("tfinal", 1)):
            value = getattr(a, key)
            if value is not None and value < low:
                problems.append(f"adapter.{key} must be {'at least 1' if low else 'non-negative'} (got {value})")
    for key in ("r", "init_r", "target_r"):
        if getattr(a, key) < 1:
            problems.append(f"adapter.{key} must be at least 1 (got {getattr(a, key)})")
    if not 0 <= a.lora_dropout < 1:
        problems.append(f"adapter.lora_dropout must be in [0, 1) (got {a.lora_dropout})")
    for key in ("epochs", "batch_size", "eval_batch_size", "gradient_accumulation_steps", "save_top_k"):
        if getattr(t, key) < 1:
            problems.append(f"train.{key} must be at least 1 (got {getattr(t, key)})")
    for key in ("learning_rate", "head_learning_rate"):
        value = getattr(t, key)
        if value is not None and value <= 0:
            problems.append(f"train.{key} must be positive (got {value})")
    if not 0 <= t.warmup_ratio < 1:
        problems.append(f"train.warmup_ratio must be in [0, 1) (got {t.warmup_ratio})")
    for key in ("eval_every_steps", "early_stopping_patience", "num_threads", "checkpoint_every_steps"):
        if getattr(t, key) < 0:
            problems.append(f"train.{key} must be non-negative (got {getattr(t, key)})")
    if cfg.model.max_length_tokens < 8:
        problems.append(f"model.max_length_tokens must be at least 8 (got {cfg.model.max_length_tokens})")
    if d.validation_size <= 0:
        problems.append(f"data.validation_size must be positive (got {d.validation_size:g})")
    if d.known_intents is not None and not 0 < d.known_intents < 1:
        problems.append(f"data.known_intents must be a fraction in (0, 1), such as 0.75 (got {d.known_intents:g})")
    if d.known_intents is not None and d.oos_label is not None:
        problems.append("data: give data.oos_label (data with an out-of-scope label) or data.known_intents "
                        "(intents held out as out of scope), not both")
    if d.oos_label is not None and not str(d.oos_label).strip():
        problems.append("data.oos_label must be a label name, not empty")
    o = cfg.ood
    if not 0 < o.keep_in_scope <= 1:
        problems.append(f"ood.keep_in_scope must be in (0, 1], such as 0.95 (got {o.keep_in_scope:g})")
    if o.knn_k < 1:
        problems.append(f"ood.knn_k must be at least 1 (got {o.knn_k})")
    if not o.label.strip():
        problems.append("ood.label must be a label name, not empty")
    if d.dataset is None and d.train_file is None:
        problems.append("data: give data.dataset (banking77, ag_news) or data.train_file")
    if d.dataset is not None and d.train_file is not None:
        problems.append("data: give either data.dataset or data.train_file, not both")
    if d.train_file is not None and d.test_file is None:
        problems.append("data.test_file is required with data.train_file")


def data_dir(cfg: DataConfig) -> Path | None:
    """The folder of built-in datasets: data.data_dir, else $PEFTLAB_DATA_DIR, else none (the hub)."""
    d = cfg.data_dir or os.environ.get(DATA_DIR_ENV)
    return Path(d).expanduser() if d else None


def with_absolute_paths(cfg: Config) -> Config:
    """``cfg`` with every location absolute — a local model folder, the data folder (from $PEFTLAB_DATA_DIR
    when data.data_dir is unset) and data files — as a run records it, so that the run reads the same files
    from any working directory later."""
    def absolute(p: str | Path | None) -> str | None:
        return str(Path(p).expanduser().resolve()) if p else None

    d = cfg.data
    data = dataclasses.replace(d, data_dir=absolute(data_dir(d)), train_file=absolute(d.train_file),
                               validation_file=absolute(d.validation_file), test_file=absolute(d.test_file))
    local_model = cfg.model.name != "default" and Path(cfg.model.name).expanduser().exists()
    model = dataclasses.replace(cfg.model, name=absolute(cfg.model.name)) if local_model else cfg.model
    return dataclasses.replace(cfg, model=model, data=data)


def check_adalora_schedule(adapter: AdapterConfig, total_steps: int) -> tuple[int, int]:
    """Resolve tinit/tfinal for ``total_steps`` optimizer steps, or raise naming the keys."""
    tinit = adapter.tinit if adapter.tinit is not None else max(0, round(0.1 * total_steps))
    tfinal = adapter.tfinal if adapter.tfinal is not None else max(1, round(0.2 * total_steps))
    if tinit + tfinal >= total_steps:
        raise ConfigError(
            f"adapter.tinit + adapter.tfinal ({tinit} + {tfinal}) must be less than the total optimizer steps "
            f"({total_steps}): lower them, or train for more steps (train.epochs, smaller train.batch_size)")
    return tinit, tfinal


def parse_overrides(overrides: list[str]) -> dict:
    """``["train.epochs=3", "adapter.target_modules=query,value"]`` → nested dict (values read as YAML)."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value (example: train.epochs=3)")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else None
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with an earlier one for '{part}'")
        node[parts[-1]] = value
    return out


def merge(base: dict, extra: dict) -> dict:
    """``extra`` over ``base``, section by section (nested dicts merge, everything else replaces)."""
    merged = dict(base)
    for k, v in extra.items():
        merged[k] = merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def from_dict(data: dict, source: str | None = None) -> Config:
    """A validated Config from nested dicts; every problem is collected into one ConfigError."""
    problems: list[str] = []
    notes: list[str] = []
    if isinstance(data, dict):
        section = data.get("data")
        if isinstance(section, dict) and section.get("train_file") and "dataset" not in section:
            data = merge(data, {"data": {"dataset": None}})  # a train_file replaces the default built-in dataset
        if isinstance(data.get("adapter"), dict):
            data = {**data, "adapter": _peft_keys(data["adapter"], problems)}
    cfg = schema.build(Config, data, "", problems, notes, ALIASES)
    _check(cfg, problems)  # fields with a bad type kept their valid defaults, so this adds no false alarms
    if problems:
        raise ConfigError(problems, source, notes)
    if cfg.adapter.method == "dora":
        cfg.adapter.use_dora = True
    return cfg


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (optional) and apply ``key=value`` overrides; raise ConfigError on any problem."""
    data: dict = {}
    if path is not None:
        data = read_yaml(Path(path), "config file", "a mapping of sections (model, data, adapter, train, ood)")
        data.pop(RUN_RECORD_KEY, None)  # a run folder's config.yaml re-runs as is
    return from_dict(merge(data, parse_overrides(overrides or [])), str(path) if path is not None else None)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def describe() -> list[tuple[str, Any, str]]:
    """Every key with its default and help, for ``peftlab keys`` and the docs."""
    return schema.describe(Config)


def dotted(nested: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} → {"a.b": 1}."""
    out = {}
    for k, v in nested.items():
        out.update(dotted(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def hub_offline() -> bool:
    """Whether the Hugging Face hub is off limits (HF_HUB_OFFLINE, as huggingface_hub reads it)."""
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
