"""Out-of-scope rejection and calibration on Banking77 (issue: 'know when it does not know').

Trains the default LoRA config on the embedded model under the open-intent protocol (data.known_intents)
for each ratio and seed, each run in a fresh process, and prints for every scorer the mean ± std over seeds
of in-scope accuracy, out-of-scope F1, AUROC and FPR@95 on the test set (thresholds chosen on validation),
plus the closed-set accuracy and the calibration of each run. A finished run is reused.

    python bench/ood.py --data-dir ../shared/data --out /tmp/ood-runs [--ratios 0.25,0.5,0.75] [--seeds 42,43,44]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

SCORERS = ("softmax", "msp", "energy", "mahalanobis", "knn")  # softmax: uncalibrated, the baseline
COLUMNS = ("in_scope_accuracy", "oos_f1", "auroc", "fpr_at_95")


def train(data_dir: str, out: Path, ratio: float | None, seed: int, method: str, extra: list[str]) -> dict:
    name = f"known{ratio}-seed{seed}-{method}" if ratio else f"all-seed{seed}-{method}"
    summary = out / name / "summary.json"
    if not summary.is_file():
        over = [f"train.seed={seed}", f"ood.method={method}", f"output_dir={out}", f"run_name={name}", *extra]
        if ratio:
            over.append(f"data.known_intents={ratio}")
        subprocess.run([sys.executable, "-m", "peftlab", "train", "--data-dir", data_dir, *over], check=True)
    return json.loads(summary.read_text())


def fmt(values: list[float], scale: float = 100) -> str:
    m = statistics.fmean(values) * scale
    return f"{m:.2f} ± {statistics.stdev(values) * scale:.2f}" if len(values) > 1 else f"{m:.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--ratios", default="0.25,0.5,0.75")
    ap.add_argument("--seeds", default="42,43,44")
    ap.add_argument("--method", default="mahalanobis", help="ood.method of the runs (every scorer is reported)")
    ap.add_argument("--calibration-seeds", default="42", help="seeds of the all-intents runs for calibration")
    ap.add_argument("extra", nargs="*", help="more config overrides (key=value) for every run")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    print("| known intents | scorer | in-scope accuracy | OOS F1 | AUROC | FPR@95 | closed-set accuracy |")
    print("|---|---|---:|---:|---:|---:|---:|")
    verdicts = []
    for ratio in (float(r) for r in args.ratios.split(",")):
        runs = [train(args.data_dir, args.out, ratio, s, args.method, args.extra) for s in seeds]
        closed = fmt([r["test_accuracy"] for r in runs])
        auroc = {}
        for scorer in SCORERS:
            cells = [fmt([r["rejection"]["scorers"][scorer][c] for r in runs]) for c in COLUMNS]
            auroc[scorer] = statistics.fmean(r["rejection"]["scorers"][scorer]["auroc"] for r in runs)
            print(f"| {ratio:g} | {scorer} | {' | '.join(cells)} | {closed} |")
        best = max((s for s in SCORERS if s != "softmax"), key=auroc.get)
        verdicts.append(f"known intents {ratio:g}: best AUROC {best} {100 * auroc[best]:.2f} % vs uncalibrated softmax "
                        f"{100 * auroc['softmax']:.2f} % ({100 * (auroc[best] - auroc['softmax']):+.2f} points)")
    print("", *verdicts, sep="\n")
    print("\n| run | temperature | ECE before | ECE after | Brier before | Brier after | test accuracy |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for seed in (int(s) for s in args.calibration_seeds.split(",")):
        r = train(args.data_dir, args.out, None, seed, "msp", args.extra)
        c = r["calibration"]
        print(f"| all intents, seed {seed} | {c['temperature']:.3f} | {100 * c['ece_before']:.2f} % | "
              f"{100 * c['ece_after']:.2f} % | {c['brier_before']:.4f} | {c['brier_after']:.4f} | "
              f"{100 * r['test_accuracy']:.2f} % |")
        rej = r["rejection"]["scorers"]["msp"]
        print(f"  msp threshold {rej['threshold']:.4f} keeps {100 * rej['in_scope_kept']:.2f} % of in-scope test texts "
              f"({rej['selected_by']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
