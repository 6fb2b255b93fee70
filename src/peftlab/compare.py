"""peftlab compare: train a matrix of methods × settings × seeds (or take finished runs) and write one
comparison — comparison.csv (a row per run), comparison.md/.html (a row per method, mean ± std over
seeds) and plots — whose numbers come straight from each run's summary.json.

A compare config is a base train config plus a matrix (README "Compare"). Every cell's resolved
Config is validated before anything trains; each cell has a fixed folder
``<output_dir>/<name>/runs/<method>-<setting>-seed<seed>``, so a second invocation reuses finished
cells (summary.json present), retrains unfinished ones, and refuses cells trained with another config.
Budget mode picks each PEFT method's rank by building the model and counting its parameters.

Loading and validation import no torch; training and budget counting import it when they run.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

from . import config as config_mod
from .comparison import _row, write
from .config import METHODS, Config
from .errors import ConfigError, PeftlabError, RunError
from .runs import SUMMARY, open_run

log = logging.getLogger("peftlab")

KEYS = ("name", "base", "overrides", "methods", "settings", "per_method", "seeds", "budget", "output_dir")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Keys the matrix owns; a base may carry them (a train config does), overrides may not.
OWNED = {"adapter.method": "methods", "train.seed": "seeds", "run_name": "the cell's folder name",
         "output_dir": "the compare's output_dir / --output-dir"}
BUDGET_OWNED = ("adapter.r", "adapter.init_r", "adapter.target_r")
# AdaLoRA prunes from init_r down to target_r; 1.5× is the ratio of the shipped 12 → 8 setup.
INIT_R_FACTOR = 1.5


@dataclass
class Cell:
    method: str
    setting: str
    seed: int
    config: Config | None  # None for a finished run given to --runs
    status: str = "pending"  # pending → trained | reused | failed | skipped
    error: str = ""

    @property
    def name(self) -> str:
        return f"{self.method}-{self.setting}-seed{self.seed}"


@dataclass
class Plan:
    name: str
    folder: Path  # <output_dir>/<name>
    cells: list[Cell]
    settings: list[str]
    budget: int | None = None


# ------------------------------------------------------------------------------------- loading

def parse_budget(value) -> int:
    """1M, 1.5M, 150k, 150000 → a parameter count."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kKmM]?)\s*", str(value)) if not isinstance(value, bool) else None
    count = round(float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6}[m.group(2).lower()]) if m else 0
    if count < 1:
        raise ConfigError(f"budget: expected a parameter count like 1M, 1.5M, 150k or 150000, got {value!r}")
    return count


def _nested(value, where: str, problems: list[str]) -> dict:
    """{'train.epochs': 3} or {'train': {'epochs': 3}} or ['train.epochs=3'] → a nested dict."""
    if value is None:
        return {}
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return config_mod.parse_overrides(value)
    if not isinstance(value, dict):
        problems.append(f"{where}: expected a mapping of keys (train.epochs: 3) or a list of key=value, got {value!r}")
        return {}
    out: dict = {}
    for key, v in value.items():
        node = out
        *parents, last = str(key).split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = config_mod._merge(node.get(last, {}), v) if isinstance(v, dict) else v
    return out


def _list(raw: dict, key: str, kind, default, problems: list[str]) -> list:
    value = raw.get(key, default)
    value = [value] if isinstance(value, kind) and not isinstance(value, bool) else value
    if (not isinstance(value, list) or not value or len(set(map(str, value))) != len(value)
            or any(isinstance(v, bool) or not isinstance(v, kind) for v in value)):
        problems.append(f"{key}: expected a non-empty list of distinct {kind.__name__ if kind is int else 'names'}, "
                        f"got {value!r}")
        return []
    return value


def _mapping(raw: dict, key: str, default: dict, problems: list[str]) -> dict:
    value = raw.get(key) or default
    if not isinstance(value, dict):
        problems.append(f"{key}: expected a mapping of name → overrides, got {value!r}")
        return default
    return value


def load(source: str | Path | dict, overrides: list[str] | None = None, data_dir: str | None = None,
         output_dir: str | None = None) -> Plan:
    """Read and validate a compare config (a YAML path or a dict); every cell's Config is built here."""
    path = None if isinstance(source, dict) else Path(source)
    raw = source if path is None else config_mod.read_yaml(path, "compare config")
    problems: list[str] = []
    for key in raw:
        if key not in KEYS:
            problems.append(f"unknown compare key '{key}'{config_mod._did_you_mean(key, KEYS)} "
                            f"(allowed: {', '.join(KEYS)})")
    name = raw.get("name", path.stem if path else "compare")
    if not isinstance(name, str) or not NAME.match(name):
        problems.append(f"name: expected a folder name of letters, digits, '_', '.', '-', got {name!r}")

    base = raw.get("base", {})
    if isinstance(base, str):  # a train config file: beside the compare file, else from the working directory
        beside = (path.parent if path else Path()) / base
        base = config_mod.read_yaml(beside if beside.is_file() else Path(base), "base: train config")
    if not isinstance(base, dict):
        problems.append(f"base: expected a train config (mapping) or the path of one, got {base!r}")
        base = {}
    base = {k: v for k, v in base.items() if k not in ("run_name", "output_dir", config_mod.RUN_RECORD_KEY)}

    methods = _list(raw, "methods", str, None, problems)
    for m in methods:
        if m not in METHODS:
            problems.append(f"methods: unknown method {m!r}{config_mod._did_you_mean(m, METHODS)} "
                            f"(allowed: {', '.join(METHODS)})")
    seeds = _list(raw, "seeds", int, [42], problems)
    budget = None
    if raw.get("budget") is not None:
        try:
            budget = parse_budget(raw["budget"])
        except ConfigError as e:
            problems.append(str(e))

    owned = dict(OWNED, **dict.fromkeys(BUDGET_OWNED, "budget")) if budget else OWNED
    common = _nested(raw.get("overrides"), "overrides", problems)
    cli = config_mod.parse_overrides(overrides or [])
    settings = {}
    for sname, value in _mapping(raw, "settings", {"default": {}}, problems).items():
        if not NAME.match(str(sname)) or "-" in str(sname):
            problems.append(f"settings: name {sname!r} must be letters, digits, '_' or '.' "
                            "(it is part of folder names)")
        settings[str(sname)] = _nested(value, f"settings.{sname}", problems)
    per_method = {}
    for m, value in _mapping(raw, "per_method", {}, problems).items():
        if m not in methods:
            problems.append(f"per_method: {m!r} is not in methods{config_mod._did_you_mean(m, methods)}")
        per_method[m] = _nested(value, f"per_method.{m}", problems)
    layers = [("overrides", common), ("command line", cli), *((f"settings.{k}", v) for k, v in settings.items()),
              *((f"per_method.{k}", v) for k, v in per_method.items())]
    for where, nested in layers:
        for key in config_mod.dotted(nested):
            if key in owned:
                problems.append(f"{where}: {key} is set by {owned[key]}; remove it here")
    if problems:
        raise ConfigError(problems)

    folder = Path(output_dir or raw.get("output_dir") or "runs") / name
    cells, cell_problems = [], {}
    for method in methods:
        for sname, setting in settings.items():
            for seed in seeds:
                cell_name = f"{method}-{sname}-seed{seed}"
                forced = {"adapter": {"method": method}, "train": {"seed": seed}, "run_name": cell_name,
                          "output_dir": str(folder / "runs")}
                if data_dir:
                    forced["data"] = {"data_dir": str(data_dir)}
                merged = base
                for layer in (common, per_method.get(method, {}), setting, cli, forced):
                    merged = config_mod._merge(merged, layer)
                try:
                    cells.append(Cell(method, sname, seed, config_mod.from_dict(merged)))
                except ConfigError as e:
                    for p in e.problems:
                        cell_problems.setdefault(p, []).append(cell_name)
    if cell_problems:
        total = len(methods) * len(settings) * len(seeds)
        raise ConfigError([p if len(where) == total else f"{p} (in {', '.join(where)})"
                           for p, where in cell_problems.items()])
    return Plan(name, folder, cells, list(settings), budget)


# --------------------------------------------------------------------------------- budget mode

def count_for_budget(cfg: Config, id2label: dict[int, str], rank: int | None, cache: dict) -> tuple[int, int]:
    """(parameters counted against a budget, largest sensible rank) for ``cfg`` at ``rank``, by building
    the model: LoRA/DoRA trainable parameters; AdaLoRA the effective ones at target_r (what remains after
    pruning: r·(in+out)+r per module, plus modules_to_save); full: all trainable parameters."""
    import dataclasses

    from . import modeling

    a = cfg.adapter
    key = json.dumps([config_mod.to_dict(cfg)["model"], a.method, a.target_modules, a.modules_to_save,
                      a.use_dora, len(id2label), rank])
    if key not in cache:
        # AdaLoRA built at init_r = target_r = rank holds exactly the post-pruning shapes.
        adapter = dataclasses.replace(a, r=rank or a.r, init_r=rank or a.init_r, target_r=rank or a.target_r)
        model, _tok, _ = modeling.build(cfg.model, adapter, id2label, total_steps=100, schedule=(10, 20))
        if a.method == "adalora":
            counted = modeling.adalora_effective_parameters(model, {})
        else:
            counted = modeling.count_parameters(model)[0]
        dims = [min(m.get_base_layer().in_features, m.get_base_layer().out_features)
                for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "get_base_layer")]
        cache[key] = (counted, min(dims) if dims else 0)
        del model
    return cache[key]


def best_rank(count, budget: int) -> tuple[int | None, int, int]:
    """(largest rank whose count ≤ budget or None, its count, the rank cap); ``count(r)`` → (params, cap).

    The count is linear in the rank, so two builds give the estimate and two more confirm it; the walks
    below keep the answer exact should a method not be linear."""
    p1, cap = count(1)
    if p1 > budget:
        return None, p1, cap
    slope = count(2)[0] - p1 if cap >= 2 else 0
    r = min(cap, 1 + (budget - p1) // slope) if slope > 0 else 1
    while r > 1 and count(r)[0] > budget:
        r -= 1
    while r < cap and count(r + 1)[0] <= budget:
        r += 1
    return r, count(r)[0], cap


def choose_ranks(plan: Plan) -> dict[str, dict]:
    """Set each PEFT cell's rank for the plan's budget; return {method-setting: what was chosen}."""
    from . import data as data_mod

    cache: dict = {}
    labels: dict[str, dict] = {}
    chosen: dict[str, dict] = {}
    for cell in plan.cells:
        group = f"{cell.method}-{cell.setting}"
        if group not in chosen:
            cfg = cell.config
            data_key = json.dumps(config_mod.to_dict(cfg)["data"])
            if data_key not in labels:  # the head's size counts: it is trained and saved
                labels[data_key] = data_mod.load(cfg.data, cfg.train.seed).labels.id2label
            id2label = labels[data_key]
            if cell.method == "full":
                counted = count_for_budget(cfg, id2label, None, cache)[0]
                chosen[group] = {"rank": None, "parameters": counted, "over_budget": counted > plan.budget}
            else:
                count = lambda r, c=cfg, i=id2label: count_for_budget(c, i, r, cache)  # noqa: E731
                rank, counted, cap = best_rank(count, plan.budget)
                chosen[group] = {"rank": rank, "parameters": counted, "over_budget": rank is None, "cap": cap}
            c = chosen[group]
            log.info("budget %s: %s → %s parameters (%s)", f"{plan.budget:,}", group,
                     f"{c['parameters']:,}", "over budget" if c["over_budget"] else f"rank {c['rank']}")
        c = chosen[group]
        if c["over_budget"] and cell.method != "full":
            cell.status, cell.error = "skipped", f"over budget even at rank 1 ({c['parameters']:,} parameters)"
        elif c["rank"]:
            a = cell.config.adapter
            a.r, a.target_r, a.init_r = c["rank"], c["rank"], math.ceil(INIT_R_FACTOR * c["rank"])
    return chosen


# ------------------------------------------------------------------------------------- running

def train_cell(config_file: str, error_file: str) -> int:
    """Entry point of a cell's own process (``isolate=True``): train, or write the one-line error."""
    from .cli import _setup_logging
    from .workflows import train

    _setup_logging(False)
    try:
        train(config_mod.load(config_file))
    except PeftlabError as e:
        Path(error_file).write_text(str(e))
        return 2
    return 0


def _train_isolated(cfg: Config) -> None:
    """Train in a fresh Python process. Peak memory is a process's high-water mark (ru_maxrss cannot be
    reset), so runs sharing a process would report the largest earlier run's; a crash or the OOM killer
    also takes only this cell. The child's log and progress bars go to this terminal."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(prefix="peftlab-cell-") as tmp:
        spec, error = Path(tmp) / "config.yaml", Path(tmp) / "error.txt"
        spec.write_text(config_mod.dump(cfg))
        code = "import sys; from peftlab.compare import train_cell; sys.exit(train_cell(sys.argv[1], sys.argv[2]))"
        rc = subprocess.run([sys.executable, "-c", code, str(spec), str(error)]).returncode
        if rc:
            raise RunError(error.read_text().strip() if error.is_file() else f"the training process exited with code "
                           f"{rc}" + (" (killed: out of memory?)" if rc in (-9, 137) else "; its log is above"))


def run(source: str | Path | dict | Plan, overrides: list[str] | None = None, data_dir: str | None = None,
        output_dir: str | None = None, command: str | None = None, isolate: bool = True) -> Path:
    """Train what is missing of a compare matrix, reuse what is finished, write the comparison; return its
    folder. A cell that fails with a user-facing error is recorded and the others still run. ``isolate``
    trains each cell in its own process (honest peak memory); False trains here (quicker to start)."""
    plan = source if isinstance(source, Plan) else load(source, overrides, data_dir, output_dir)
    chosen = choose_ranks(plan) if plan.budget else {}
    stale = []
    for cell in plan.cells:
        run_dir = plan.folder / "runs" / cell.name
        if (run_dir / SUMMARY).is_file():
            diffs = config_mod.differences(cell.config, open_run(run_dir)[1])
            if diffs:
                stale.append(f"{cell.name} ({'; '.join(diffs[:3])})")
    if stale:
        more = f" and {len(stale) - 3} more" if len(stale) > 3 else ""
        raise RunError(f"finished runs in {plan.folder / 'runs'} were trained with another config: "
                       f"{', '.join(stale[:3])}{more} — delete those folders to retrain them, or give the compare "
                       "another name")
    from . import workflows

    n = len(plan.cells)
    for i, cell in enumerate(plan.cells, 1):
        run_dir = plan.folder / "runs" / cell.name
        if cell.status == "skipped":
            log.info("[%d/%d] skipping %s: %s", i, n, cell.name, cell.error)
        elif (run_dir / SUMMARY).is_file():
            cell.status = "reused"
            log.info("[%d/%d] reusing %s (finished)", i, n, cell.name)
        else:
            resuming = (run_dir / "checkpoints" / "latest.json").is_file()
            log.info("[%d/%d] %s %s", i, n, "continuing the unfinished" if resuming else "training", cell.name)
            try:
                _train_isolated(cell.config) if isolate else workflows.train(cell.config)
                cell.status = "trained"
            except Exception as e:  # one cell's mistake or out-of-memory must not lose the others
                if not isinstance(e, PeftlabError) and "out of memory" not in str(e).lower():
                    raise
                cell.status, cell.error = "failed", str(e).splitlines()[0]
                log.error("[%d/%d] %s failed: %s", i, n, cell.name, cell.error)
    rows = []
    for cell in plan.cells:
        label = cell.method if len(plan.settings) == 1 else f"{cell.method} ({cell.setting})"
        row = _row(plan.folder / "runs" / cell.name, plan.folder, label, cell)
        if plan.budget:
            c = chosen[f"{cell.method}-{cell.setting}"]
            row["budget"] = plan.budget
            row["budget_parameters"] = row.get("budget_parameters") or c["parameters"]
        rows.append(row)
    api = f"peftlab.compare.run({plan.name if isinstance(source, Plan) else str(source)!r})"
    shared = [] if isolate or not any(c.status == "trained" for c in plan.cells) else [
        "The runs trained by this invocation shared one process (in-process mode): their peak memory is that "
        "process's high-water mark, which includes the earlier runs'."]
    write(plan.folder, rows, plan.name, command or api, plan.budget, shared)
    return plan.folder


def compare_runs(runs: list[str | Path], output_dir: str | Path, command: str | None = None) -> Path:
    """Compare finished run folders: runs whose configs differ only in the seed form one row."""
    folder = Path(output_dir)
    opened = [open_run(r) for r in runs]
    if len({p.resolve() for p, _ in opened}) != len(opened):
        raise RunError("compare --runs: the same run folder is given twice")
    keys = []
    for _p, cfg in opened:
        d = {k: v for k, v in config_mod.dotted({k: v for k, v in cfg.items() if k != config_mod.RUN_RECORD_KEY}).items()
             if k not in config_mod.NOT_IDENTITY and k != "train.seed"}
        keys.append(d)
    groups = list(dict.fromkeys(json.dumps(k, sort_keys=True, default=str) for k in keys))
    rows = []
    for (path, cfg), k in zip(opened, keys, strict=True):
        method = cfg["adapter"]["method"]
        label = method
        same_method = [json.loads(g) for g in groups if json.loads(g)["adapter.method"] == method]
        if len(same_method) > 1:  # name the keys that set this group apart from its method's others
            differing = [key for key in k if any(o.get(key) != k[key] for o in same_method)]
            label = f"{method} ({', '.join(f'{key}={k[key]}' for key in differing[:3])})"
        cell = Cell(method, "", cfg["train"]["seed"], None, status="reused")
        rows.append(_row(path, folder, label, cell))
    write(folder, rows, f"{len(rows)} runs", command or f"peftlab.compare.compare_runs({[str(r) for r in runs]!r})")
    return folder
