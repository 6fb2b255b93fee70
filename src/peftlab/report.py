"""report.md for a run: the seeds' per-epoch table (Epoch | Training Loss | Validation Loss | Accuracy | F1)
and the summary they assemble by hand. No torch import."""

from __future__ import annotations

from pathlib import Path

from .runs import write_text


def epoch_table(history: list[dict]) -> str:
    rows = ["| Epoch | Step | Training Loss | Validation Loss | Accuracy | F1 |",
            "|------:|-----:|--------------:|----------------:|---------:|---:|"]
    for h in history:
        rows.append(f"| {h['epoch']:g} | {h['step']} | {h['train_loss']:.4f} | {h['eval_loss']:.4f} | "
                    f"{100 * h['eval_accuracy']:.2f}% | {100 * h['eval_f1']:.2f}% |")
    return "\n".join(rows)


def render(summary: dict, history: list[dict]) -> str:
    lines = [f"# {summary['method']} on {summary['dataset']}", ""]
    for note in summary.get("notes", []):
        lines += [f"> **Note:** {note}", ""]
    lines += [
        "| Metric | Value |", "|---|---|",
        f"| Backbone | `{summary['backbone']}` |",
        f"| Trainable parameters | {summary['parameters']} |",
        f"| Splits (train / validation / test) | {summary['splits']['train']:,} / {summary['splits']['validation']:,}"
        f" / {summary['splits']['test']:,} |",
        f"| Optimizer steps | {summary['optimizer_steps']:,} |",
        f"| Best checkpoint | epoch {summary['best_epoch']}, step {summary['best_step']} |",
        f"| **Test accuracy** | **{100 * summary['test_accuracy']:.2f}%** |",
        f"| **Test macro-F1** | **{100 * summary['test_f1']:.2f}%** |",
        f"| Train time | {summary['train_seconds'] / 60:.1f} min ({summary['train_samples_per_second']:.0f} samples/s) |",
        f"| Peak memory | {summary['peak_memory_mb']:.0f} MB |",
        "", "## Training progress", "", epoch_table(history), "",
    ]
    if "adalora" in summary:
        a = summary["adalora"]
        lines += ["## AdaLoRA rank allocation", "",
                  f"Budget {a['budget']} = target_r × {a['modules']} modules; final ranks sum to {a['rank_sum']}; "
                  f"effective trainable parameters after pruning: {a['effective_trainable_parameters']:,}.", "",
                  "| Module | Final rank |", "|---|---:|"]
        lines += [f"| `{k}` | {v} |" for k, v in a["final_ranks"].items()]
        lines.append("")
    return "\n".join(lines)


def write_report(run_dir: Path, summary: dict, history: list[dict]) -> None:
    write_text(Path(run_dir) / "report.md", render(summary, history))
