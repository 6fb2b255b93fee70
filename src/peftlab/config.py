"""One typed config tree: dataclasses whose field help is the documentation.

Loading is strict: unknown keys, wrong types and conflicting values are collected and raised together
as one ConfigError, each naming the key, what is allowed, and a did-you-mean where one is close.
This module imports no torch, so ``peftlab --help`` and config validation stay instant.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .errors import ConfigError

METHODS = ("full", "lora", "adalora", "dora")
# The section a run folder's config.yaml adds (versions, backbone path, …): a record, not a setting.
RUN_RECORD_KEY = "_run"

# Tuned on the embedded all-MiniLM-L6-v2 / Banking77 (see README "Defaults"). A sentence-embedding
# model learns slowly through low-rank adapters at the seeds' 2e-4, so adapters get a much larger
# rate; full fine-tuning moves every weight and wants a small one.
DEFAULT_LEARNING_RATE = {"full": 1e-4, "lora": 5e-3, "dora": 5e-3, "adalora": 5e-3}


def _help(default: Any, text: str) -> Any:
    """A field with its help text; the help is shown by ``peftlab keys`` and written into docs."""
    return field(default=default, metadata={"help": text})


@dataclass
class ModelConfig:
    name: str = _help(
        "default",
        "Backbone: 'default' (the embedded all-MiniLM-L6-v2), a local Hugging Face model folder, or a hub id.",
    )
    max_length_tokens: int = _help(64, "Texts are truncated to this many tokens.")
    trust_remote_code: bool = _help(False, "Allow model code from the hub. Off: only built-in architectures load.")


@dataclass
class DataConfig:
    dataset: str | None = _help(
        "banking77", "Built-in dataset name (banking77, ag_news), or null when train_file is given."
    )
    data_dir: str | None = _help(
        None, "Folder holding built-in datasets (<data_dir>/banking77/train.csv …); default $PEFTLAB_DATA_DIR."
    )
    train_file: str | None = _help(None, "CSV, JSONL or Parquet file with training examples.")
    validation_file: str | None = _help(None, "Optional validation file; else a stratified split of train.")
    test_file: str | None = _help(None, "Test file; required with train_file.")
    text_columns: list[str] | None = _help(
        None, "Text column(s), joined with '. ' when several. Default: the dataset's own, else ['text']."
    )
    label_column: str | None = _help(None, "Label column. Default: the dataset's own, else 'label'.")
    validation_size: float = _help(
        0.1, "Stratified validation split when there is no validation file: a fraction (<1) or a count."
    )
    max_train_examples: int | None = _help(None, "Use a stratified subset of the training set (quick runs).")
    max_test_examples: int | None = _help(None, "Use a stratified subset of the test set (quick runs).")


@dataclass
class AdapterConfig:
    method: Literal["full", "lora", "adalora", "dora"] = _help("lora", "Fine-tuning method.")
    r: int = _help(8, "LoRA/DoRA rank.")
    lora_alpha: float = _help(16, "LoRA scaling numerator (scale = lora_alpha / r, or / sqrt(r) with rsLoRA).")
    lora_dropout: float = _help(0.1, "Dropout on the adapter's input.")
    target_modules: str | list[str] = _help(
        "auto", "'auto' (per architecture: query+value or its equivalent), 'all-linear', or module names."
    )
    use_rslora: bool = _help(False, "Rank-stabilised LoRA scaling (lora_alpha / sqrt(r)).")
    use_dora: bool = _help(False, "Weight-decomposed LoRA; method 'dora' sets it.")
    init_lora_weights: Literal["default", "gaussian", "pissa", "olora"] = _help(
        "default", "LoRA initialisation: PEFT's default, gaussian, PiSSA or OLoRA."
    )
    modules_to_save: list[str] = field(default_factory=list, metadata={
        "help": "Extra modules trained in full and saved with the adapter (head and new weights always are)."})
    init_r: int = _help(12, "AdaLoRA: initial rank of every module.")
    target_r: int = _help(8, "AdaLoRA: average rank per module after pruning (budget = target_r × modules).")
    tinit: int | None = _help(None, "AdaLoRA: optimizer steps of warm-up before pruning (default 10 %).")
    tfinal: int | None = _help(None, "AdaLoRA: final optimizer steps at fixed ranks (default 20 %).")
    deltaT: int = _help(10, "AdaLoRA: optimizer steps between two budget allocations.")
    beta1: float = _help(0.85, "AdaLoRA: EMA factor of the sensitivity.")
    beta2: float = _help(0.85, "AdaLoRA: EMA factor of the uncertainty.")
    orth_reg_weight: float = _help(0.5, "AdaLoRA: weight of the orthogonal regulariser.")


@dataclass
class TrainConfig:
    epochs: int = _help(5, "Training epochs.")
    batch_size: int = _help(32, "Examples per optimizer step, all processes together (before accumulation).")
    eval_batch_size: int = _help(
        64, "Examples per evaluation batch (length-sorted; 64 measured faster than 32 or 128 on a 2-core CPU).")
    learning_rate: float | None = _help(
        None, "Peak learning rate. Default per method: full 1e-4, lora/dora/adalora 5e-3."
    )
    head_learning_rate: float | None = _help(None, "Learning rate of the head; default learning_rate.")
    weight_decay: float = _help(0.01, "AdamW weight decay (not applied to biases and LayerNorm).")
    warmup_ratio: float = _help(0.06, "Fraction of optimizer steps with linear warmup.")
    lr_scheduler: Literal["linear", "cosine", "constant"] = _help("linear", "Schedule after warmup.")
    gradient_accumulation_steps: int = _help(1, "Batches accumulated per optimizer step.")
    max_grad_norm: float = _help(1.0, "Gradient clipping norm (0 disables).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = _help(
        "auto", "Mixed precision: auto is bf16 on a GPU that supports it, else fp32."
    )
    eval_every_steps: int = _help(0, "Evaluate every N optimizer steps; 0 evaluates once per epoch.")
    metric_for_best: Literal["accuracy", "f1", "loss"] = _help("accuracy", "Validation metric that picks the best checkpoint.")
    save_top_k: int = _help(1, "Best checkpoints kept in the run folder during training.")
    checkpoint_every_steps: int = _help(
        0, "Also save the resume state every N optimizer steps; 0 saves it after each evaluation only.")
    early_stopping_patience: int = _help(0, "Stop after N evaluations without improvement; 0 disables.")
    final_epoch_on_train_and_validation: bool = _help(
        False, "After training, one more epoch on train+validation at the final learning rate (seed 003)."
    )
    seed: int = _help(42, "Seed for splits, initialisation and data order.")
    num_threads: int = _help(0, "CPU threads for torch; 0 keeps torch's choice.")
    fast_dropout: bool = _help(
        True, "Draw dropout masks with torch.rand instead of bernoulli_ (about 10 % faster training on CPU; the "
        "same distribution, another random stream). false: nn.Dropout's own masks.")
    max_steps: int | None = _help(None, "Stop after this many optimizer steps (smoke tests).")
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = field(default_factory=list, metadata={
        "help": "Experiment trackers that receive each evaluation, the test metrics and the hyperparameters: "
                "tensorboard, mlflow, wandb (each an extra: pip install 'peftlab[mlflow]')."})
    tracking_dir: str | None = _help(
        None, "Folder for the trackers' local files (TensorBoard events, MLflow file store, W&B offline runs); "
        "default <run>/tracking.")
    tracking_project: str = _help("peftlab", "MLflow experiment and W&B project name.")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = _help("runs", "Folder in which run folders are created.")
    run_name: str | None = _help(None, "Run folder name; default <dataset>-<method>-<time>.")

    @property
    def learning_rate(self) -> float:
        """The effective peak learning rate (the method's tuned default when unset)."""
        return self.train.learning_rate or DEFAULT_LEARNING_RATE[self.adapter.method]


# ---------------------------------------------------------------- type checking

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false",
            type(None): "null"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """Return (ok, value) where value is converted to ``tp`` if it fits."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if isinstance(value, str) and "," in value:  # "query,value" means a list where one is allowed
            args = sorted(args, key=lambda a: typing.get_origin(a) is not list)
        for arg in args:
            ok, v = _coerce(value, arg)
            if ok:
                return True, v
        return False, value
    if origin is Literal:
        return (value in typing.get_args(tp)), value
    if origin is list:
        if isinstance(value, str):  # key=a,b on the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            return False, value
        out = []
        for v in value:
            ok, v = _coerce(v, typing.get_args(tp)[0])
            if not ok:
                return False, value
            out.append(v)
        return True, out
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if tp is str:
        return isinstance(value, str), value
    return False, value


def _did_you_mean(word: str, options) -> str:
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f" — did you mean '{close[0]}'?" if close else ""


def _build(cls, data: Any, prefix: str, problems: list[str]):
    if not isinstance(data, dict):
        problems.append(f"{prefix or 'config'}: expected a mapping of keys, got {data!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in fields:
            problems.append(f"unknown key '{name}'{_did_you_mean(name, [prefix + f for f in fields])}"
                            f" (allowed: {', '.join(fields)})")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, f"{name}.", problems)
            continue
        ok, coerced = _coerce(value, tp)
        if not ok:
            hint = ""
            if typing.get_origin(tp) is Literal or any(
                typing.get_origin(a) is Literal for a in typing.get_args(tp)
            ):
                lits = [x for a in [tp, *typing.get_args(tp)] if typing.get_origin(a) is Literal
                        for x in typing.get_args(a)]
                # a list (or key=a,b) is judged by its first bad item: did-you-mean for 'mlfow', not the list
                items = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else [value]
                bad = next((str(v).strip() for v in items if str(v).strip() not in map(str, lits)), value)
                hint = _did_you_mean(bad, lits)
            problems.append(f"{name}: expected {_type_name(tp)}, got {value!r}{hint}")
            continue
        kwargs[key] = coerced
    return cls(**kwargs)


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
        for key in ("tinit", "tfinal"):
            value = getattr(a, key)
            if value is not None and value < (1 if key == "tfinal" else 0):
                problems.append(f"adapter.{key} must be {'at least 1' if key == 'tfinal' else 'non-negative'}"
                                f" (got {value})")
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
    if min(t.eval_every_steps, t.early_stopping_patience, t.num_threads, t.checkpoint_every_steps) < 0:
        problems.append("train.eval_every_steps, early_stopping_patience, num_threads and checkpoint_every_steps "
                        "must be non-negative")
    if cfg.model.max_length_tokens < 8:
        problems.append(f"model.max_length_tokens must be at least 8 (got {cfg.model.max_length_tokens})")
    if d.validation_size <= 0:
        problems.append(f"data.validation_size must be positive (got {d.validation_size})")
    if d.dataset is None and d.train_file is None:
        problems.append("data: give data.dataset (banking77, ag_news) or data.train_file")
    if d.dataset is not None and d.train_file is not None:
        problems.append("data: give either data.dataset or data.train_file, not both")
    if d.train_file is not None and d.test_file is None:
        problems.append("data.test_file is required with data.train_file")


def check_adalora_schedule(adapter: AdapterConfig, total_steps: int) -> tuple[int, int]:
    """Resolve tinit/tfinal for ``total_steps`` optimizer steps, or raise naming the keys."""
    tinit = adapter.tinit if adapter.tinit is not None else max(0, round(0.1 * total_steps))
    tfinal = adapter.tfinal if adapter.tfinal is not None else max(1, round(0.2 * total_steps))
    if tinit + tfinal >= total_steps:
        raise ConfigError(
            f"adapter.tinit + adapter.tfinal ({tinit} + {tfinal}) must be less than the total optimizer steps "
            f"({total_steps}): lower them, or train for more steps (train.epochs, smaller train.batch_size)"
        )
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


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for k, v in extra.items():
        merged[k] = _merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def from_dict(data: dict) -> Config:
    problems: list[str] = []
    section = data.get("data") if isinstance(data, dict) else None
    if isinstance(section, dict) and section.get("train_file") and "dataset" not in section:
        data = _merge(data, {"data": {"dataset": None}})  # a train_file replaces the default built-in dataset
    cfg = _build(Config, data, "", problems)
    _check(cfg, problems)  # fields with a bad type kept their valid defaults, so this adds no false alarms
    if problems:
        raise ConfigError(problems)
    if cfg.adapter.method == "dora":
        cfg.adapter.use_dora = True
    return cfg


def read_yaml(path: Path, what: str, shape: str = "a mapping of keys") -> dict:
    """A YAML mapping from ``path``; a missing file, bad YAML or another shape is a one-line ConfigError."""
    if not path.is_file():
        raise ConfigError(f"{what} '{path}' not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} '{path}' must hold {shape}")
    return raw


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (optional) and apply ``key=value`` overrides; raise ConfigError on any problem."""
    data: dict = {}
    if path is not None:
        data = read_yaml(Path(path), "config file", "a mapping of sections (model, data, adapter, train)")
        data.pop(RUN_RECORD_KEY, None)  # a run folder's config.yaml re-runs as is
    return from_dict(_merge(data, parse_overrides(overrides or [])))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def describe() -> list[tuple[str, Any, str]]:
    """Every key with its default and help, for ``peftlab config --help-keys`` and the docs."""
    rows = []

    def walk(cls, prefix):
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")
            else:
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                rows.append((f"{prefix}{f.name}", default, f.metadata.get("help", "")))

    walk(Config, "")
    return rows


# Where a run runs and where trackers write does not change a result: not part of a cell's identity.
NOT_IDENTITY = {"data.data_dir", "output_dir", "run_name", "train.num_threads", "train.report_to",
                "train.tracking_dir", "train.tracking_project", "train.checkpoint_every_steps"}


def dotted(nested: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} → {"a.b": 1}."""
    out = {}
    for k, v in nested.items():
        out.update(dotted(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def differences(cfg: Config, recorded: dict) -> list[str]:
    """Keys where a run's config.yaml differs from what the cell asks for (resolved values the
    run filled in itself — learning-rate default, AdaLoRA schedule, local model path — are matched)."""
    want = dotted(to_dict(cfg))
    have = dotted({k: v for k, v in recorded.items() if k != RUN_RECORD_KEY})
    want["train.learning_rate"] = cfg.learning_rate
    if cfg.model.name != "default" and Path(cfg.model.name).expanduser().exists():
        want["model.name"] = str(Path(cfg.model.name).expanduser().resolve())
    out = []
    for key, value in want.items():
        # keys a run's config.yaml lacks came with a later peftlab: the run cannot have differed in them
        if key in NOT_IDENTITY or key not in have or (key in ("adapter.tinit", "adapter.tfinal") and value is None):
            continue
        got = have.get(key)
        same = (math.isclose(value, got) if isinstance(value, float) and isinstance(got, (int, float))
                else value == got)
        if not same:
            out.append(f"{key} {got!r} → {value!r}")
    return out
