"""A run's report, from its folder alone: report.md (the per-epoch table that fine-tuning write-ups
paste from the Trainer — Epoch | Training Loss | Validation Loss | Accuracy | F1 — the summary they
assemble by hand, plots) and report.html (the same tables, the plots inlined as data: URIs, so it opens
anywhere without a server). Written at the end of `train`; `peftlab report RUN` writes it again.

No torch import. matplotlib is imported inside the plotting functions and used through its
object-oriented API (Figure + Agg) rather than pyplot: no display is needed, and a notebook's pyplot
backend and figure list are left alone when a report is written from it.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from pathlib import Path

import numpy as np

from .files import read_json, read_jsonl, write_bytes, write_text
from .labels import LabelMap
from .rundir import METRICS, PLOTS, SUMMARY, TEST_METRICS, open_run

TOP_CONFUSED_PAIRS = 15
MAX_CLASSES_FOR_HEATMAP = 20  # beyond this a confusion heatmap is unreadable; the pairs chart remains
LABELLED_WORST_CLASSES = 8


# ----------------------------------------------------------------------------------------- data

def confused_pairs(confusion: list[list[int]], names: list[str], k: int = TOP_CONFUSED_PAIRS) -> list[tuple[str, str, int]]:
    """The k largest off-diagonal cells as (true label, predicted label, count), largest first."""
    cells = [(names[t], names[p], n) for t, row in enumerate(confusion) for p, n in enumerate(row) if t != p and n]
    return sorted(cells, key=lambda c: (-c[2], c[0], c[1]))[:k]


def _short_names(paths: list[str]) -> list[str]:
    """Each name's fewest trailing dotted components that no other name shares: `attention.self.query`
    → `query`, but all-linear's `attention.output.dense` and `output.dense` stay apart."""
    parts = [p.split(".") for p in paths]

    def suffix(i: int) -> str:
        for k in range(1, len(parts[i]) + 1):
            if all(parts[j][-k:] != parts[i][-k:] for j in range(len(parts)) if j != i):
                return ".".join(parts[i][-k:])
        return paths[i]

    return [suffix(i) for i in range(len(paths))]


def rank_grid(final_ranks: dict[str, int]):
    """(layer labels, module labels, layers × modules float array, NaN where a layer lacks a module).

    A key's first integer component is its layer (`bert.encoder.layer.3.attention.self.query` → 3);
    what follows it is the module.
    """
    cells = {}
    for key, rank in final_ranks.items():
        m = re.search(r"(?:^|\.)(\d+)\.(.+)$", key)
        layer, module = (int(m.group(1)), m.group(2)) if m else (-1, key)
        cells[(layer, module)] = rank
    layers = sorted({layer for layer, _ in cells})
    modules = list(dict.fromkeys(module for _, module in cells))  # model order: query before value
    grid = np.full((len(layers), len(modules)), np.nan)
    for (layer, module), rank in cells.items():
        grid[layers.index(layer), modules.index(module)] = rank
    return [str(x) if x >= 0 else "—" for x in layers], _short_names(modules), grid


# ---------------------------------------------------------------------------------------- plots

def figure(width: float, height: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, fig.add_subplot()


def plot_validation(history: list[dict], best_step: int | None = None):
    fig, ax = figure(8, 4)
    steps = [h["step"] for h in history]
    ax.plot(steps, [100 * h["eval_accuracy"] for h in history], marker="o", label="accuracy")
    ax.plot(steps, [100 * h["eval_f1"] for h in history], marker="s", label="macro-F1")
    if best_step is not None:
        ax.axvline(best_step, color="grey", linestyle="--", linewidth=1, label=f"best checkpoint (step {best_step})")
    ax.set(xlabel="optimizer step", ylabel="%", title="Validation accuracy and macro-F1")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def plot_loss(history: list[dict]):
    fig, ax = figure(8, 4)
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["train_loss"] for h in history], marker="o", label="training (mean since previous evaluation)")
    ax.plot(steps, [h["eval_loss"] for h in history], marker="s", label="validation")
    ax.set(xlabel="optimizer step", ylabel="cross-entropy", title="Training and validation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def plot_per_class_f1(per_class: dict[str, dict], train_counts: dict[str, int], macro_f1: float | None = None):
    """Test F1 of each class against its number of training examples: do rare classes suffer?"""
    names = [n for n in per_class if n in train_counts]
    x = [train_counts[n] for n in names]
    y = [100 * per_class[n]["f1-score"] for n in names]
    fig, ax = figure(10, 5)
    ax.scatter(x, y, s=18, alpha=0.7)
    if macro_f1 is not None:  # labelled on the line: a legend box would sit on the worst classes' labels
        ax.axhline(100 * macro_f1, color="grey", linestyle="--", linewidth=1)
        ax.annotate(f"macro-F1 {100 * macro_f1:.1f}%", (1, 100 * macro_f1), xycoords=("axes fraction", "data"),
                    xytext=(-4, 3), textcoords="offset points", ha="right", fontsize=8, color="grey")
    # The worst classes crowd one corner: number them there and name them in a list beside the plot.
    worst = sorted(range(len(names)), key=lambda i: (y[i], x[i]))[:LABELLED_WORST_CLASSES]
    numbers: dict[tuple, list[str]] = {}  # classes on one point share a label: "7,8", not overprinted
    for rank, i in enumerate(worst, 1):
        numbers.setdefault((x[i], y[i]), []).append(str(rank))
    for xy, ranks in numbers.items():
        ax.annotate(",".join(ranks), xy, fontsize=7, color="#c0504d", xytext=(3, 2), textcoords="offset points")
    listing = "\n".join(f"{rank}. {names[i]}: F1 {y[i]:.0f}%, {x[i]} train" for rank, i in enumerate(worst, 1))
    ax.text(1.02, 1, f"Worst test F1\n{listing}", transform=ax.transAxes, va="top", fontsize=7)
    ax.set(xlabel="training examples of the class", ylabel="test F1 (%)",
           title=f"Per-class test F1 against training examples ({len(names)} classes)")
    ax.grid(alpha=0.3)
    return fig


def plot_confused_pairs(pairs: list[tuple[str, str, int]]):
    fig, ax = figure(8, 1 + 0.32 * max(len(pairs), 1))
    labels = [f"{t} → {p}" for t, p, _ in pairs]
    ax.barh(range(len(pairs)), [n for *_, n in pairs], color="#c0504d")
    ax.set_yticks(range(len(pairs)), labels, fontsize=8)
    ax.invert_yaxis()  # largest on top
    ax.set(xlabel="test examples (true → predicted)", title=f"Most confused label pairs (top {len(pairs)})")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(axis="x", alpha=0.3)
    return fig


def plot_confusion(confusion: list[list[int]], names: list[str]):
    cm = np.asarray(confusion)
    size = max(4.0, 0.45 * len(names) + 2.5)
    fig, ax = figure(size + 1, size)
    im = ax.imshow(cm, cmap="Blues")
    short = [n if len(n) <= 24 else n[:23] + "…" for n in names]
    ax.set_xticks(range(len(names)), short, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), short, fontsize=8)
    for (t, p), n in np.ndenumerate(cm):
        if n:
            ax.text(p, t, str(n), ha="center", va="center", fontsize=7,
                    color="white" if n > cm.max() / 2 else "black")
    ax.set(xlabel="predicted", ylabel="true", title="Test confusion matrix")
    fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def plot_adalora_ranks(final_ranks: dict[str, int], init_r: int | None = None):
    """Heatmap of the final rank per layer (rows) and module (columns); the image's array is the ranks."""
    layers, modules, grid = rank_grid(final_ranks)
    fig, ax = figure(max(4.0, 1.2 * len(modules) + 2.5), max(3.0, 0.4 * len(layers) + 1.5))
    im = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", vmin=0, vmax=init_r or np.nanmax(grid), aspect="auto")
    long = max(map(len, modules), default=0) > 10  # all-linear names overlap when horizontal
    ax.set_xticks(range(len(modules)), modules, fontsize=9, rotation=30 if long else 0, ha="right" if long else "center")
    ax.set_yticks(range(len(layers)), layers, fontsize=9)
    for (r, c), v in np.ndenumerate(grid):
        if not math.isnan(v):
            ax.text(c, r, f"{v:g}", ha="center", va="center", fontsize=8,
                    color="white" if v < (init_r or np.nanmax(grid)) / 2 else "black")
    ax.set(xlabel="module", ylabel="layer", title="AdaLoRA final rank by layer and module")
    fig.colorbar(im, ax=ax, label="rank")
    return fig


def plot_rank_budget(adalora: dict):
    """Sum of ranks over optimizer steps, against the budgets and the allocation schedule."""
    steps, budgets = zip(*adalora["rank_history"], strict=True)
    fig, ax = figure(8, 4)
    ax.step(steps, budgets, where="post", linewidth=2, label="sum of ranks")
    if "init_budget" in adalora:
        ax.axhline(adalora["init_budget"], color="grey", linestyle=":", linewidth=1, label="init_r × modules")
    ax.axhline(adalora["budget"], color="grey", linestyle="--", linewidth=1, label="target_r × modules")
    # PEFT numbers steps from 0 (update_and_allocate(k) runs during optimizer step k + 1); the x axis
    # counts completed steps like metrics.jsonl, so PEFT's tinit and final-allocation steps move by one.
    ax.axvline(adalora["tinit"] + 1, color="#c0504d", linestyle=":", linewidth=1,
               label=f"end of warm-up (tinit={adalora['tinit']})")
    final = adalora["total_step"] - adalora["tfinal"] + 1
    ax.axvline(final, color="#c0504d", linestyle="--", linewidth=1, label=f"final allocation (step {final})")
    ax.set(xlabel="optimizer steps completed", ylabel="sum of ranks", title="AdaLoRA rank budget over training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# ------------------------------------------------------------------------------------- document
# A report is a list of blocks rendered twice, to Markdown and to HTML, so both show the same tables:
# ("h1"|"h2"|"p"|"note", text), ("table", header, right_aligned_columns, rows), ("img", file, alt).

def epoch_table(history: list[dict]) -> tuple:
    rows = [[f"{h['epoch']:g}", str(h["step"]), f"{h['train_loss']:.4f}", f"{h['eval_loss']:.4f}",
             f"{100 * h['eval_accuracy']:.2f}%", f"{100 * h['eval_f1']:.2f}%"] for h in history]
    return ("table", ["Epoch", "Step", "Training Loss", "Validation Loss", "Accuracy", "F1"], {0, 1, 2, 3, 4, 5}, rows)


def _summary_table(s: dict) -> tuple:
    rows = [
        ["Backbone", f"`{s['backbone']}`"],
        ["Trainable parameters", s["parameters"]],
        ["Splits (train / validation / test)",
         f"{s['splits']['train']:,} / {s['splits']['validation']:,} / {s['splits']['test']:,}"],
        ["Optimizer steps", f"{s['optimizer_steps']:,}"],
        ["Best checkpoint", f"epoch {s['best_epoch']}, step {s['best_step']}"],
        ["**Test accuracy**", f"**{100 * s['test_accuracy']:.2f}%**"],
        ["**Test macro-F1**", f"**{100 * s['test_f1']:.2f}%**"],
        ["Train time", f"{s['train_seconds'] / 60:.1f} min ({s['train_samples_per_second']:.0f} samples/s)"],
        ["Peak memory", f"{s['peak_memory_mb']:.0f} MB"],
    ]
    return ("table", ["Metric", "Value"], set(), rows)


def build(summary: dict, history: list[dict], test: dict, names: list[str]) -> tuple[list[tuple], dict[str, object]]:
    """(blocks, {png file name: Figure}) for a run's files."""
    figs: dict[str, object] = {}
    blocks: list[tuple] = [("h1", f"{summary['method']} on {summary['dataset']}")]
    blocks += [("note", note) for note in summary.get("notes", [])]
    blocks += [_summary_table(summary), ("h2", "Training progress"), epoch_table(history)]
    if history:
        figs["validation.png"] = plot_validation(history, summary.get("best_step"))
        figs["loss.png"] = plot_loss(history)
        blocks += [("img", "validation.png", "Validation accuracy and macro-F1 over optimizer steps"),
                   ("img", "loss.png", "Training and validation loss over optimizer steps")]

    blocks.append(("h2", "Test results by class"))
    train_counts = summary.get("label_counts", {}).get("train")
    if train_counts and test.get("per_class"):
        figs["per_class_f1.png"] = plot_per_class_f1(test["per_class"], train_counts, test.get("f1"))
        blocks.append(("img", "per_class_f1.png", "Per-class test F1 against training examples"))
    if "confusion" in test:
        pairs = confused_pairs(test["confusion"], names)
        if pairs:
            figs["confused_pairs.png"] = plot_confused_pairs(pairs)
            blocks += [("img", "confused_pairs.png", "Most confused label pairs"),
                       ("table", ["True label", "Predicted as", "Test examples"], {2},
                        [[f"`{t}`", f"`{p}`", str(n)] for t, p, n in pairs])]
        else:
            blocks.append(("p", "No test example was misclassified."))
        if len(names) <= MAX_CLASSES_FOR_HEATMAP:
            figs["confusion.png"] = plot_confusion(test["confusion"], names)
            blocks.append(("img", "confusion.png", "Test confusion matrix"))
    if not (train_counts and "confusion" in test):
        blocks.append(("p", "Per-class training counts or the test confusion matrix were not recorded by this "
                            "run (older peftlab); retrain for the per-class plots."))

    if "adalora" in summary:
        a = summary["adalora"]
        blocks += [("h2", "AdaLoRA rank allocation"),
                   ("p", f"Budget {a['budget']} = target_r × {a['modules']} modules; final ranks sum to "
                         f"{a['rank_sum']}; effective trainable parameters after pruning: "
                         f"{a['effective_trainable_parameters']:,}.")]
        init_r = a["init_budget"] // a["modules"] if a.get("init_budget") and a["modules"] else None
        if a["final_ranks"]:
            figs["adalora_ranks.png"] = plot_adalora_ranks(a["final_ranks"], init_r)
            blocks.append(("img", "adalora_ranks.png", "AdaLoRA final rank by layer and module"))
        if a.get("rank_history"):
            figs["adalora_budget.png"] = plot_rank_budget(a)
            blocks.append(("img", "adalora_budget.png", "AdaLoRA rank budget over optimizer steps"))
        blocks.append(("table", ["Module", "Final rank"], {1}, [[f"`{k}`", str(v)] for k, v in a["final_ranks"].items()]))
    return blocks, figs


def to_markdown(blocks: list[tuple]) -> str:
    out = []
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2"):
            out += [f"{'#' * int(kind[1])} {b[1]}", ""]
        elif kind == "p":
            out += [b[1], ""]
        elif kind == "note":
            out += [f"> **Note:** {b[1]}", ""]
        elif kind == "img":
            out += [f"![{b[2]}]({PLOTS}/{b[1]})", ""]
        elif kind == "table":
            _, header, right, rows = b
            out.append("| " + " | ".join(header) + " |")
            out.append("|" + "|".join("---:" if i in right else "---" for i in range(len(header))) + "|")
            out += ["| " + " | ".join(r) + " |" for r in rows]
            out.append("")
    return "\n".join(out)


def _inline_html(text: str) -> str:
    """The two Markdown inline forms the report uses: **bold** and `code`."""
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


CSS = """body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;margin:0;background:#fafafa}
main{max-width:1000px;margin:0 auto;padding:24px;background:#fff}h1{margin-top:0}h2{border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:12px 0}th,td{border:1px solid #ddd;padding:4px 10px}th{background:#f2f2f2}
td.r,th.r{text-align:right}code{font-size:90%;background:#f2f2f2;padding:0 3px;border-radius:3px}
.note{border-left:4px solid #e0a800;background:#fff8e1;padding:8px 12px}figure{margin:16px 0}
img{max-width:100%;height:auto}figcaption{color:#666;font-size:13px}"""

# Sets data-images-loaded="loaded/total" on <body> once the page has loaded, so a headless browser's
# --dump-dom can show that every inlined image decoded (the report's own test uses it).
LOAD_CHECK = """window.addEventListener("load",function(){var i=Array.prototype.slice.call(document.images);
document.body.setAttribute("data-images-loaded",i.filter(function(x){return x.complete&&x.naturalWidth>0}).length+"/"+i.length)});"""


def to_html(blocks: list[tuple], pngs: dict[str, bytes]) -> str:
    title = next((b[1] for b in blocks if b[0] == "h1"), "peftlab run")
    out = ['<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width,initial-scale=1">',
           f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body><main>"]
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2"):
            out.append(f"<{kind}>{_inline_html(b[1])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{_inline_html(b[1])}</p>")
        elif kind == "note":
            out.append(f'<p class="note"><strong>Note:</strong> {_inline_html(b[1])}</p>')
        elif kind == "img":
            data = base64.b64encode(pngs[b[1]]).decode("ascii")
            out.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(b[2])}">'
                       f"<figcaption>{html.escape(b[2])}</figcaption></figure>")
        elif kind == "table":
            _, header, right, rows = b
            cls = [' class="r"' if i in right else "" for i in range(len(header))]
            out.append("<table><thead><tr>" + "".join(f"<th{c}>{_inline_html(h)}</th>" for c, h in zip(cls, header, strict=True))
                       + "</tr></thead><tbody>")
            out += ["<tr>" + "".join(f"<td{c}>{_inline_html(v)}</td>" for c, v in zip(cls, r, strict=True)) + "</tr>"
                    for r in rows]
            out.append("</tbody></table>")
    out.append(f"</main><script>{LOAD_CHECK}</script></body></html>\n")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------- files

def write_report(run_dir: Path, summary: dict | None = None, history: list[dict] | None = None) -> list[Path]:
    """Write report.md, report.html and plots/*.png; return their paths.

    ``summary`` and ``history`` default to the run's summary.json and metrics.jsonl (train passes them
    because summary.json is written last); the rest comes from test_metrics.json and labels.json.
    """
    run_dir = Path(run_dir)
    summary = summary if summary is not None else read_json(run_dir / SUMMARY)
    history = history if history is not None else read_jsonl(run_dir / METRICS)
    test = read_json(run_dir / TEST_METRICS) if (run_dir / TEST_METRICS).is_file() else {}
    names = LabelMap.load(run_dir).names

    blocks, figs = build(summary, history, test, names)
    pngs = {name: png(fig) for name, fig in figs.items()}
    (run_dir / PLOTS).mkdir(exist_ok=True)
    written = []
    for name, data in pngs.items():
        write_bytes(run_dir / PLOTS / name, data)
        written.append(run_dir / PLOTS / name)
    write_text(run_dir / "report.md", to_markdown(blocks))
    write_text(run_dir / "report.html", to_html(blocks, pngs))
    return [*written, run_dir / "report.md", run_dir / "report.html"]


def regenerate(run: str | Path) -> list[Path]:
    """`peftlab report RUN`: write a finished run's report again from its folder."""
    path, _cfg = open_run(run)
    return write_report(path)
