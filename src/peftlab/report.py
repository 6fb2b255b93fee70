"""A run's report, from its folder alone: report.md (the per-epoch table that fine-tuning write-ups
paste from the Trainer — Epoch | Training Loss | Validation Loss | Accuracy | F1 — the summary they
assemble by hand, plots, and when summary.json has them calibration and out-of-scope rejection) and report.html (the same tables, the plots inlined as data: URIs, so it opens
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


def plot_reliability(before: dict, after: dict, temperature: float | None = None):
    """Accuracy against mean confidence per confidence bin (empty bins skipped), before and after
    temperature scaling, with the diagonal of perfect calibration."""
    fig, ax = figure(6, 5)
    ax.plot([0, 100], [0, 100], color="grey", linestyle="--", linewidth=1, label="perfectly calibrated")
    after_label = "after temperature scaling" + (f" (T={temperature:.3g})" if temperature is not None else "")
    for points, label, marker in ((before, "before (softmax of the logits)", "o"), (after, after_label, "s")):
        kept = [(c, a) for c, a, n in zip(points["confidence"], points["accuracy"], points["count"], strict=True) if n]
        ax.plot([100 * c for c, _ in kept], [100 * a for _, a in kept], marker=marker, label=label)
    ax.set(xlim=(0, 100), ylim=(0, 100), xlabel="confidence: mean top probability in the bin (%)",
           ylabel="accuracy in the bin (%)", title="Reliability diagram (test set)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_score_histograms(histograms: dict[str, dict], deciding: str | None = None,
                          thresholds: dict[str, float] | None = None):
    """One panel per scorer: the share of in-scope and of out-of-scope test texts in each score bin
    (each set sums to 100 %, so both show whatever their sizes), with the scorer's threshold."""
    from matplotlib.figure import Figure

    names = list(histograms)
    fig = Figure(figsize=(3.2 * len(names) + 0.6, 3.4), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, name in zip(axes, names, strict=True):
        h = histograms[name]
        for key, label, colour in (("in", "in scope", "#4f81bd"), ("out", "out of scope", "#c0504d")):
            total = sum(h[key]) or 1
            ax.stairs([100 * n / total for n in h[key]], h["edges"], fill=True, alpha=0.45, color=colour, label=label)
        t = (thresholds or {}).get(name)
        if t is not None and h["edges"][0] <= t <= h["edges"][-1]:
            ax.axvline(t, color="black", linestyle="--", linewidth=1, label="threshold")
        elif t is not None:  # drawn, it would squash the histograms into a corner
            ax.text(0.02, 0.97, f"threshold {t:.4g}\n(off the chart)", transform=ax.transAxes, va="top", fontsize=7)
        ax.set_xlim(h["edges"][0], h["edges"][-1])
        ax.set(xlabel=f"{name} score (higher: more in scope)", title=name + (" (deciding)" if name == deciding else ""))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("share of texts (%)")
    handles = {}  # one legend below the panels, where it hides no bar (any panel may lack the threshold)
    for ax in axes:
        handles.update(zip(*reversed(ax.get_legend_handles_labels()), strict=True))
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=len(handles), fontsize=8)
    fig.suptitle("In-scope and out-of-scope test scores")
    return fig


def plot_risk_coverage(curves: dict[str, dict], deciding: str | None = None):
    """Selective classification on in-scope test texts: the error rate among the texts each scorer is
    most confident about, against the fraction kept."""
    fig, ax = figure(8, 4)
    for name, c in curves.items():
        ax.plot([100 * x for x in c["coverage"]], [100 * y for y in c["risk"]],
                linewidth=2.5 if name == deciding else 1.5, label=name + (" (deciding)" if name == deciding else ""))
    ax.set(xlim=(0, 100), xlabel="coverage: in-scope test texts kept, most confident first (%)",
           ylabel="risk: error rate among those kept (%)", title="Risk–coverage per scorer")
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


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def _number(x: float | None, spec: str = ".4g") -> str:
    return "—" if x is None else format(x, spec)


OOS_COLUMNS = (("oos_precision", "OOS precision"), ("oos_recall", "OOS recall"), ("oos_f1", "OOS F1"),
               ("auroc", "AUROC"), ("fpr_at_95", "FPR@95"), ("overall_accuracy", "Overall accuracy"))


def calibration_blocks(c: dict, figs: dict[str, object]) -> list[tuple]:
    """The Calibration section: temperature, ECE and Brier before/after, and the reliability diagram."""
    rows = [["Temperature", "1", f"{c['temperature']:.4g}"],
            ["ECE (15 bins)", _pct(c.get("ece_before")), _pct(c.get("ece_after"))],
            ["Brier score", _number(c.get("brier_before"), ".4f"), _number(c.get("brier_after"), ".4f")]]
    blocks = [("h2", "Calibration"),
              ("p", f"Temperature scaling divides the logits by T = {c['temperature']:.4g}, fitted on "
                    f"{c.get('fitted_on', 'validation')} by negative log-likelihood; ECE (expected calibration "
                    "error) and the Brier score are on the test set, lower is better."),
              ("table", ["Metric", "Before scaling", "After scaling"], {1, 2}, rows)]
    if c.get("reliability_before") and c.get("reliability_after"):
        figs["reliability.png"] = plot_reliability(c["reliability_before"], c["reliability_after"], c["temperature"])
        blocks.append(("img", "reliability.png", "Reliability diagram: accuracy against confidence per bin, "
                                                 "before and after temperature scaling"))
    return blocks


def rejection_blocks(r: dict, figs: dict[str, object]) -> list[tuple]:
    """The Out-of-scope rejection section: which scorer decides, a row per scorer, histograms, risk–coverage."""
    method, scorers = r.get("method", "none"), r.get("scorers", {})
    deciding = method if method in scorers else None
    blocks: list[tuple] = [("h2", "Out-of-scope rejection")]
    if deciding:
        s = scorers[deciding]
        threshold = r.get("threshold") if r.get("threshold") is not None else s.get("threshold")
        blocks.append(("p", f"The `{deciding}` score decides: a text scoring below {_number(threshold)} is labelled "
                            f"`{r.get('label', 'out_of_scope')}`. How the threshold was chosen: "
                            f"{s.get('selected_by', '?')}."))
    else:
        how = ("best out-of-scope F1" if r.get("validation_out_of_scope") else
               "keeping a fixed share (ood.keep_in_scope) of in-scope texts")
        blocks.append(("p", "No score decides (ood.method none): no text is rejected by a score. Each row shows "
                            f"what a scorer would do at the threshold chosen on validation by {how}."))
    oos = r.get("test_out_of_scope", 0)
    blocks.append(("p", f"Test: {r.get('test_in_scope', 0):,} in-scope and {oos:,} out-of-scope texts; validation: "
                        f"{r.get('validation_out_of_scope', 0):,} out-of-scope texts. In-scope accuracy counts a "
                        "rejected in-scope text as wrong; out-of-scope is the positive class of precision, recall "
                        "and F1; FPR@95 is the share of out-of-scope texts accepted at the threshold that keeps 95 % "
                        "of in-scope texts." + ("" if oos else " Without out-of-scope test texts only the in-scope "
                                                           "figures can be measured.")))
    extra = [(k, h) for k, h in OOS_COLUMNS if any(k in s for s in scorers.values())]
    header = ["Scorer", "Threshold", "In-scope kept", "In-scope accuracy", *(h for _, h in extra)]
    rows = []
    for name, s in scorers.items():
        label = f"**`{name}`** (deciding)" if name == deciding else f"`{name}`"
        rows.append([label, _number(s.get("threshold")), _pct(s.get("in_scope_kept")), _pct(s.get("in_scope_accuracy")),
                     *(_pct(s.get(k)) for k, _ in extra)])
    blocks.append(("table", header, set(range(1, len(header))), rows))
    hists = {k: v for k, v in r.get("histograms", {}).items() if v}
    if hists:
        figs["ood_histograms.png"] = plot_score_histograms(
            hists, deciding, {k: scorers.get(k, {}).get("threshold") for k in hists})
        blocks.append(("img", "ood_histograms.png", "Scores of in-scope and out-of-scope test texts, per scorer"))
    curves = {k: v for k, v in r.get("risk_coverage", {}).items() if v and v.get("coverage")}
    if curves:
        figs["risk_coverage.png"] = plot_risk_coverage(curves, deciding)
        blocks.append(("img", "risk_coverage.png", "Risk–coverage of in-scope test texts, per scorer"))
    return blocks


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

    if "calibration" in summary:
        blocks += calibration_blocks(summary["calibration"], figs)
    if "rejection" in summary:
        blocks += rejection_blocks(summary["rejection"], figs)

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
