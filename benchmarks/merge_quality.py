"""Benchmark: merge quality on real data (in-domain and out-of-domain).

Runs ``mklab merge`` twice and prints the per-model summary (mean primary metric in-domain and
OOD, and every row) as JSON:

1. ``--preset quickstart``: MiniLM fine-tuned on the shipped SST-2 and CoLA samples, heads kept,
   average / Fisher / RegMean against the individual models and their ensemble;
2. a real pairwise emotion merge: MiniLM fine-tuned on two domains of ``../shared/data/emotion``
   (16 multi-label outputs, heads merged with label-aware rows), evaluated on both domains and on
   held-out domains, RegMean alpha 0.1 as in the paper, against the individual models, their
   ensemble and the multi-task model trained on the union of the two domains.

    python benchmarks/merge_quality.py --workdir /tmp/mklab-quality [--only quickstart|emotion]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def run(args: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mergekit_lab", "merge", *args, "--quiet", "--overwrite"], check=True)
    return time.perf_counter() - t


def summary(out: Path) -> dict:
    res = json.loads((out / "results.json").read_text())
    rows = [{k: r[k] for k in ("model", "kind", "task", "domain", "metrics")} for r in res["rows"]]
    return {"summary": res["summary"], "rows": rows, "timings": res["timings"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/mklab-quality")
    ap.add_argument("--only", choices=["quickstart", "emotion"], default=None)
    ap.add_argument("--domains", nargs=2, default=["isear", "emoint"])
    ap.add_argument("--ood", nargs="*", default=["tec", "emobank"])
    ap.add_argument("--max-train-samples", type=int, default=2000)
    args = ap.parse_args()
    wd = Path(args.workdir)
    result: dict = {}
    if args.only in (None, "quickstart"):
        out = wd / "quickstart"
        wall = run(["--preset", "quickstart", "--output-dir", str(out), "--zoo-dir", str(wd / "zoo")])
        result["quickstart"] = {"wall_s": round(wall, 1), **summary(out)}
    if args.only in (None, "emotion"):
        if not (SHARED / "emotion").is_dir():
            result["emotion"] = {"skipped": f"{SHARED / 'emotion'} is absent"}
        else:
            a, b = args.domains
            out = wd / f"emotion-{a}-{b}"
            specs = "{" + ", ".join(f"{d}: {{task: emotion/{d}}}" for d in (a, b)) + "}"
            wall = run([
                "--models", a, b, "--model-specs", specs, "--base-model", "builtin:minilm",
                "--data-dir", str(SHARED / "emotion"),
                "--eval-tasks", *[f"emotion/{d}" for d in (a, b, *args.ood)],
                "--max-train-samples", str(args.max_train_samples), "--max-seq-length", "64",
                "--max-eval-samples", "1000",
                "--method", "average", "fisher", "regmean", "--method-params", "{regmean: {alpha: 0.1}}",
                "--heads", "merge", "--baselines", "individual", "ensemble", "multitask",
                "--stats-examples", "512", "--num-train-epochs", "2", "--learning-rate", "1e-4",
                "--warmup-ratio", "0.06", "--zoo-dir", str(wd / "zoo"), "--output-dir", str(out),
            ])
            result["emotion"] = {"wall_s": round(wall, 1), **summary(out)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
