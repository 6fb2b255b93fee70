"""Compare matrices: methods × settings × seeds, each cell a training run, trained where missing and
compared (comparison.py) — or finished runs compared as they are. The numbers come straight from each
run's summary.json.

A compare config is a base train config plus a matrix (README "Compare"). Every cell's resolved
Config is validated before anything trains; each cell has a fixed folder
``<output_dir>/<name>/runs/<method>-<setting>-seed<seed>``, so a second invocation reuses finished
cells (summary.json present), retrains unfinished ones, and refuses cells trained with another config.
Budget mode picks each PEFT method's rank by building the model and counting its parameters (budget.py).

Loading and validation import no torch; training and budget counting import it when they run.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import budget as budget_mod
from . import config as config_mod
from .comparison import Cell, row, write
from .config import METHODS, RUN_RECORD_KEY, Config, merge
from .errors import ConfigError, PeftlabError, RunError, did_you_mean
from .files import read_yaml
from .rundir import CHECKPOINTS, NAME, SUMMARY, differences, identity, open_run

log = logging.getLogger("peftlab")

KEYS = ("name", "base", "overrides", "methods", "settings", "per_method", "seeds", "budget", "output_dir")
# Keys the matrix owns; a base may carry them (a train config does), overrides may not.
OWNED = {"adapter.method": "methods", "train.seed": "seeds", "run_name": "the cell's folder name",
         "output_dir": "the compare's output_dir / --output-dir"}
BUDGET_OWNED = ("adapter.r", "adapter.init_r", "adapter.target_r")


@dataclass
class Plan:
    name: str
    folder: Path  # <output_dir>/<name>
    cells: list[Cell]
    settings: list[str]
    budget: int | None = None


# ------------------------------------------------------------------------------------- loading

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
        node[last] = merge(node.get(last, {}), v) if isinstance(v, dict) else v
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
    raw = source if path is None else read_yaml(path, "compare config")
    source_name = str(path) if path else None
    problems: list[str] = []
    for key in raw:
        if key not in KEYS:
            problems.append(f"unknown compare key '{key}'{did_you_mean(key, KEYS)} "
                            f"(allowed: {', '.join(KEYS)})")
    name = raw.get("name", path.stem if path else "compare")
    if not isinstance(name, str) or not NAME.match(name):
        problems.append(f"name: expected a folder name of letters, digits, '_', '.', '-', got {name!r}")

    base = raw.get("base", {})
    if isinstance(base, str):  # a train config file: beside the compare file, else from the working directory
        beside = (path.parent if path else Path()) / base
        base = read_yaml(beside if beside.is_file() else Path(base), "base: train config")
    if not isinstance(base, dict):
        problems.append(f"base: expected a train config (mapping) or the path of one, got {base!r}")
        base = {}
    base = {k: v for k, v in base.items() if k not in ("run_name", "output_dir", RUN_RECORD_KEY)}

    methods = _list(raw, "methods", str, None, problems)
    for m in methods:
        if m not in METHODS:
            problems.append(f"methods: unknown method {m!r}{did_you_mean(m, METHODS)} "
                            f"(allowed: {', '.join(METHODS)})")
    seeds = _list(raw, "seeds", int, [42], problems)
    budget = None
    if raw.get("budget") is not None:
        try:
            budget = budget_mod.parse_budget(raw["budget"])
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
            problems.append(f"per_method: {m!r} is not in methods{did_you_mean(m, methods)}")
        per_method[m] = _nested(value, f"per_method.{m}", problems)
    layers = [("overrides", common), ("command line", cli), *((f"settings.{k}", v) for k, v in settings.items()),
              *((f"per_method.{k}", v) for k, v in per_method.items())]
    for where, nested in layers:
        for key in config_mod.dotted(nested):
            if key in owned:
                problems.append(f"{where}: {key} is set by {owned[key]}; remove it here")
    if problems:
        raise ConfigError(problems, source_name)

    folder = Path(output_dir or raw.get("output_dir") or "runs") / name
    cells, cell_problems, cell_notes = [], {}, []
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
                    merged = merge(merged, layer)
                try:
                    cells.append(Cell(method, sname, seed, config_mod.from_dict(merged)))
                except ConfigError as e:
                    for p in e.problems:
                        cell_problems.setdefault(p, []).append(cell_name)
                    cell_notes += e.notes
    if cell_problems:
        total = len(methods) * len(settings) * len(seeds)
        raise ConfigError([p if len(where) == total else f"{p} (in {', '.join(where)})"
                           for p, where in cell_problems.items()], source_name, cell_notes)
    return Plan(name, folder, cells, list(settings), budget)


# ------------------------------------------------------------------------------------- running

def train_cell(config_file: str, error_file: str) -> int:
    """Entry point of a cell's own process (``isolate=True``): train, or write the one-line error."""
    from .console import setup_logging
    from .workflows import train  # torch: in the cell's own process

    setup_logging(False)
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
    with tempfile.TemporaryDirectory(prefix="peftlab-cell-") as tmp:
        spec, error = Path(tmp) / "config.yaml", Path(tmp) / "error.txt"
        spec.write_text(config_mod.dump(cfg))
        code = "import sys; from peftlab.matrix import train_cell; sys.exit(train_cell(sys.argv[1], sys.argv[2]))"
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
    chosen = budget_mod.choose_ranks(plan.cells, plan.budget) if plan.budget else {}
    stale = []
    for cell in plan.cells:
        run_dir = plan.folder / "runs" / cell.name
        if (run_dir / SUMMARY).is_file():
            diffs = differences(cell.config, open_run(run_dir)[1])
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
            resuming = (run_dir / CHECKPOINTS / "latest.json").is_file()
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
        line = row(plan.folder / "runs" / cell.name, plan.folder, label, cell)
        if plan.budget:
            c = chosen[f"{cell.method}-{cell.setting}"]
            line["budget"] = plan.budget
            line["budget_parameters"] = line.get("budget_parameters") or c["parameters"]
        rows.append(line)
    api = f"peftlab.compare({plan.name if isinstance(source, Plan) else str(source)!r})"
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
    keys = [{k: v for k, v in identity(cfg).items() if k != "train.seed"} for _p, cfg in opened]
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
        rows.append(row(path, folder, label, cell))
    write(folder, rows, f"{len(rows)} runs", command or f"peftlab.compare_runs({[str(r) for r in runs]!r})")
    return folder
