"""The comparison itself: a row per run from its summary.json, mean ± std per method over seeds,
comparison.csv / .md / .html and plots. No torch: it reads run folders only.

``matrix.run`` (training a compare matrix) and ``matrix.compare_runs`` (finished runs) both end here.
"""

from __future__ import annotations

import csv
import io
import os
import platform
import statistics
from dataclasses import dataclass
from pathlib import Path

from .config import RUN_RECORD_KEY, Config
from .files import write_bytes, write_text
from .report import PLOTS, figure, png, to_html, to_markdown
from .rundir import open_run, read_summary


@dataclass
class Cell:
    """One run of a comparison: a cell of a compare matrix, or a finished run given to --runs."""

    method: str
    setting: str
    seed: int
    config: Config | None  # None for a finished run given to --runs
    status: str = "pending"  # pending → trained | reused | failed | skipped
    error: str = ""

    @property
    def name(self) -> str:
        return f"{self.method}-{self.setting}-seed{self.seed}"

CSV_COLUMNS = ("group", "method", "setting", "seed", "status", "error", "run", "dataset", "trainable_parameters",
               "total_parameters", "trainable_percent", "adalora_effective_parameters", "rank", "init_r",
               "budget", "budget_parameters", "test_accuracy", "test_f1", "best_epoch", "train_seconds",
               "train_samples_per_second", "peak_memory_mb", "device", "ece_after", "oos_f1", "auroc", "fpr_at_95",
               "in_scope_accuracy")
# Confidence figures (summary.json's calibration and rejection sections, absent from older runs): the
# group table shows a column for each only when some run has it. (key, header), all fractions.
CONFIDENCE_COLUMNS = (("ece_after", "ECE (after scaling)"), ("oos_f1", "OOS F1"), ("auroc", "OOS AUROC"),
                      ("fpr_at_95", "FPR@95"), ("in_scope_accuracy", "In-scope accuracy"))


def confidence_figures(s: dict) -> dict:
    """ece_after from the calibration section, and the deciding scorer's oos_f1, auroc, fpr_at_95 and
    in_scope_accuracy from the rejection section (none when no scorer decides): None where absent."""
    out = {k: None for k, _ in CONFIDENCE_COLUMNS}
    out["ece_after"] = s.get("calibration", {}).get("ece_after")
    rej = s.get("rejection") or {}
    decided = rej.get("scorers", {}).get(rej.get("method")) if rej.get("method", "none") != "none" else None
    for k in ("oos_f1", "auroc", "fpr_at_95", "in_scope_accuracy"):
        out[k] = (decided or {}).get(k)
    return out


def row(run_dir: Path, folder: Path, label: str, cell: Cell) -> dict:
    """One comparison.csv row: the run's own numbers, copied from its summary.json and config.yaml."""
    row = {"group": label, "method": cell.method, "setting": cell.setting, "seed": cell.seed, "status": cell.status,
           "error": cell.error, "run": os.path.relpath(run_dir, folder)}
    if cell.status not in ("trained", "reused"):
        return row
    s = read_summary(run_dir)
    cfg = open_run(run_dir)[1]
    a = cfg["adapter"]
    effective = s.get("adalora", {}).get("effective_trainable_parameters")
    row.update({k: s.get(k) for k in ("dataset", "trainable_parameters", "total_parameters", "trainable_percent",
                                      "test_accuracy", "test_f1", "best_epoch", "train_seconds",
                                      "train_samples_per_second", "peak_memory_mb", "device")})
    row.update(adalora_effective_parameters=effective,
               rank={"lora": a["r"], "dora": a["r"], "adalora": a["target_r"]}.get(cell.method),
               init_r=a["init_r"] if cell.method == "adalora" else None,
               budget_parameters=effective if effective is not None else s["trainable_parameters"],
               _notes=s.get("notes", []), _versions=cfg.get(RUN_RECORD_KEY, {}).get("versions", {}))
    row.update(confidence_figures(s))
    return row


def _stats(values: list[float]) -> tuple[float, float | None, int]:
    """(mean, sample standard deviation over seeds or None for one run, n)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None), len(values)


def summarise(rows: list[dict]) -> list[dict]:
    """One entry per group, in first-seen order: mean ± std of the finished runs' metrics."""
    out = []
    for label in dict.fromkeys(r["group"] for r in rows):
        mine = [r for r in rows if r["group"] == label]
        ok = [r for r in mine if r["status"] in ("trained", "reused")]
        g = {"group": label, "method": mine[0]["method"], "runs": len(mine), "n": len(ok),
             "failed": [r for r in mine if r["status"] in ("failed", "skipped")]}
        for key in ("test_accuracy", "test_f1", "train_seconds", "train_samples_per_second"):
            g[key] = _stats([r[key] for r in ok]) if ok else None
        if ok:
            first = ok[0]
            g.update({k: first[k] for k in ("trainable_parameters", "total_parameters", "trainable_percent",
                                            "adalora_effective_parameters", "rank", "init_r", "budget_parameters")})
            g["peak_memory_mb"] = max(r["peak_memory_mb"] for r in ok)
        for key, _ in CONFIDENCE_COLUMNS:  # over the runs that have it (older runs lack these sections)
            have = [r[key] for r in ok if r.get(key) is not None]
            g[key] = _stats(have) if have else None
        out.append(g)
    return out


def _pm(stat, scale: float = 100, digits: int = 2, unit: str = "%") -> str:
    if stat is None:
        return "—"
    mean, std, _n = stat
    spread = "" if std is None else f" ± {scale * std:.{digits}f}"
    return f"{scale * mean:.{digits}f}{spread}{unit}"


def plot_accuracy_vs_parameters(groups: list[dict], budget: int | None = None):
    fig, ax = figure(8, 5)
    for g in groups:
        mean, std, _ = g["test_accuracy"]
        bar = ax.errorbar([g["trainable_parameters"]], [100 * mean], yerr=[100 * (std or 0)], fmt="o", capsize=4,
                          label=g["group"])
        if g["adalora_effective_parameters"]:  # where AdaLoRA ends after pruning: hollow, same colour
            colour = bar.lines[0].get_color()
            ax.plot([g["adalora_effective_parameters"], g["trainable_parameters"]], [100 * mean] * 2, ":", color=colour)
            ax.plot([g["adalora_effective_parameters"]], [100 * mean], "o", mfc="none", color=colour)
    if budget:
        ax.axvline(budget, color="grey", linestyle="--", linewidth=1, label=f"budget {budget:,}")
    ax.set_xscale("log")
    ax.set(xlabel="trainable parameters (log; hollow: AdaLoRA effective after pruning)", ylabel="test accuracy (%)",
           title="Test accuracy against trainable parameters (mean ± std over seeds)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return fig


def plot_bars(groups: list[dict], series: list[tuple[str, str, float]], ylabel: str, title: str):
    """Bars per group for each (key, legend, scale) series, with the std over seeds as error bars."""
    fig, ax = figure(max(6, 1.4 * len(groups) + 2), 4.5)
    width = 0.8 / len(series)
    for j, (key, legend, scale) in enumerate(series):
        ax.bar([i + (j - (len(series) - 1) / 2) * width for i in range(len(groups))],
               [scale * g[key][0] for g in groups], width=width, label=legend,
               yerr=[scale * (g[key][1] or 0) for g in groups], capsize=4)
    ax.set_xticks(range(len(groups)), [g["group"] for g in groups], rotation=20 if len(groups) > 4 else 0)
    ax.set(ylabel=ylabel, title=title)
    ax.grid(axis="y", alpha=0.3)
    if len(series) > 1:
        ax.legend()
    return fig


def build(rows: list[dict], title: str, command: str, budget: int | None = None, notes: list[str] = ()):
    """(blocks, {png name: Figure}) of the comparison, in report.py's block format."""
    groups = summarise(rows)
    ok = [r for r in rows if r["status"] in ("trained", "reused")]
    blocks: list[tuple] = [("h1", f"Comparison: {title}")]
    blocks += [("note", n) for n in dict.fromkeys([*(n for r in ok for n in r["_notes"]), *notes])]
    datasets = sorted({r["dataset"] for r in ok})
    if len(datasets) > 1:
        blocks.append(("note", f"These runs are on different datasets ({', '.join(datasets)}): not comparable."))
    header = ["Method", "Runs (n)", "Trainable parameters", "Trainable %", "Rank"]
    if budget:
        header.append(f"Budget used (of {budget:,})")
    header += ["Test accuracy", "Test macro-F1"]
    shown = [(k, h) for k, h in CONFIDENCE_COLUMNS if any(g.get(k) for g in groups)]
    header += [h for _, h in shown]
    header += ["Train min", "Train samples/s", "Peak memory MB (max)", "AdaLoRA effective parameters"]
    table = []
    for g in groups:
        if not g["n"]:
            table.append([g["group"], f"0 of {g['runs']}", *["—"] * (len(header) - 2)])  # see "Failed" below
            continue
        rank = "" if g["rank"] is None else str(g["rank"]) + (f" (init {g['init_r']})" if g["init_r"] else "")
        line = [g["group"], f"{g['n']}" + (f" of {g['runs']}" if g["n"] < g["runs"] else ""),
                f"{g['trainable_parameters']:,}", f"{g['trainable_percent']:.2f}%", rank or "—"]
        if budget:
            used = g["budget_parameters"]
            line.append(f"{used:,} ({100 * used / budget:.1f}%)" + (" **over budget**" if used > budget else ""))
        line += [_pm(g["test_accuracy"]), _pm(g["test_f1"]), *(_pm(g[k]) for k, _ in shown),
                 _pm(g["train_seconds"], 1 / 60, 1, ""),
                 f"{g['train_samples_per_second'][0]:.0f}", f"{g['peak_memory_mb']:.0f}",
                 f"{g['adalora_effective_parameters']:,}" if g["adalora_effective_parameters"] else "—"]
        table.append(line)
    blocks.append(("table", header, set(range(1, len(header))), table))
    blocks.append(("p", "Mean ± sample standard deviation over seeds (n runs each); every figure comes from "
                        "the runs' summary.json (one row per run in comparison.csv). Peak memory is the process's "
                        "maximum RSS on CPU, the maximum allocated memory on a GPU."
                        + (" ECE is after temperature scaling; the out-of-scope figures are the deciding scorer's "
                           "(ood.method), over the runs that recorded them." if shown else "")))
    figs: dict[str, object] = {}
    plotted = [g for g in groups if g["n"]]
    if plotted:
        low = min(100 * min(g["test_accuracy"][0], g["test_f1"][0]) for g in plotted)
        scores = plot_bars(plotted, [("test_accuracy", "accuracy", 100), ("test_f1", "macro-F1", 100)], "%",
                           "Test accuracy and macro-F1 per method (mean ± std over seeds)")
        scores.axes[0].set_ylim(max(0, low - 10), 100)  # the differences sit in the top few points
        figs = {"accuracy_vs_parameters.png": plot_accuracy_vs_parameters(plotted, budget), "accuracy_f1.png": scores,
                "train_time.png": plot_bars(plotted, [("train_seconds", "train", 1 / 60)], "minutes",
                                            "Training time per method (mean ± std over seeds)")}
        blocks += [("img", "accuracy_vs_parameters.png", "Test accuracy against trainable parameters"),
                   ("img", "accuracy_f1.png", "Test accuracy and macro-F1 per method"),
                   ("img", "train_time.png", "Training time per method")]
    failed = [r for g in groups for r in g["failed"]]
    if failed:
        blocks += [("h2", "Failed or skipped runs"),
                   ("table", ["Run", "Status", "Error"], set(),
                    [[f"`{r['run']}`", r["status"], r["error"]] for r in failed])]
    versions = [r["_versions"] for r in ok]
    hardware = [f"platform {', '.join(sorted({v.get('platform', '?') for v in versions})) or '?'}",
                f"{os.cpu_count()} CPUs (machine that wrote this comparison: {platform.node() or '?'})",
                f"torch {', '.join(sorted({v.get('torch', '?') for v in versions})) or '?'}",
                f"device {', '.join(sorted({str(r['device']) for r in ok})) or '?'}"]
    blocks += [("h2", "How this was made"), ("p", f"Command: `{command}`"),
               ("p", "Hardware: " + "; ".join(hardware) + ".")]
    return blocks, figs


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS} for r in rows)
    return buf.getvalue()


def write(folder: Path, rows: list[dict], title: str, command: str, budget: int | None = None,
          notes: list[str] = ()) -> list[Path]:
    """comparison.csv, comparison.md, comparison.html and plots/*.png in ``folder`` (atomic writes)."""
    folder = Path(folder)
    blocks, figs = build(rows, title, command, budget, notes)
    pngs = {name: png(fig) for name, fig in figs.items()}
    written = []
    for name, data in pngs.items():
        write_bytes(folder / PLOTS / name, data)
        written.append(folder / PLOTS / name)
    for name, text in (("comparison.csv", to_csv(rows)), ("comparison.md", to_markdown(blocks)),
                       ("comparison.html", to_html(blocks, pngs))):
        write_text(folder / name, text)
        written.append(folder / name)
    return written
