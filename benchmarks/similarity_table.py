"""Markdown tables from the leave-one-out study's report.json (benchmarks/similarity_loo.py).

Few-shot dev scores per init (mean ± std over the k-shot seeds), paired differences against
the random init and the uniform average (the same k-shot sample and seed for every init, so the
difference per seed is paired; two-sided paired t-test over the seeds), the sources' own dev
scores and the seconds per source of every measure.

    python benchmarks/similarity_table.py /work/bench/similarity/report.json
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def _ms(vals: list[float]) -> str:
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):.3f} ± {sd:.3f}"


def _paired(a: list[float], b: list[float]) -> str:
    from scipy.stats import ttest_rel

    d = [x - y for x, y in zip(a, b)]
    if len(d) < 2 or all(x == 0 for x in d):
        return f"{statistics.mean(d):+.3f}"
    p = ttest_rel(a, b).pvalue
    return f"{statistics.mean(d):+.3f} ± {statistics.stdev(d):.3f} (p {p:.2f})"


def main(path: str) -> None:
    rep = json.loads(Path(path).read_text())
    out = []
    out.append("Sources (own full dev set):\n")
    out.append("| source | task | train examples | dev | seconds |")
    out.append("|---|---|---|---|---|")
    for name, s in rep["sources"].items():
        dev = ", ".join(f"{k} {v:.3f}" for k, v in s["dev"].items())
        out.append(f"| {name} | {s['task'].split('/')[-1]} | {s['train_examples']} | {dev} | {s['seconds']:.0f} |")
    for tname, t in rep["targets"].items():
        fs = t.get("fewshot", {})
        if not fs:
            continue
        metrics = [k for k in fs["random"]["summary"]]
        out.append(f"\nTarget {tname} ({t['task']}), own module left out: {', '.join(t['excluded']) or 'none'}\n")
        out.append("| init | " + " | ".join(f"{m} (mean ± std)" for m in metrics) +
                   f" | Δ{metrics[0]} vs random | Δ{metrics[0]} vs uniform | weights |")
        out.append("|---|" + "---|" * (len(metrics) + 3))
        m0 = metrics[0]
        rnd = [r[m0] for r in fs["random"]["runs"]]
        uni = [r[m0] for r in fs["uniform"]["runs"]]
        for label, e in fs.items():
            vals = {m: [r[m] for r in e["runs"]] for m in metrics}
            w = t["measures"].get(label, {}).get("weights")
            wtxt = ", ".join(f"{k} {v:.2f}" for k, v in w.items()) if w else ("uniform" if label == "uniform" else "")
            same = f" (= {e['same_init_as']})" if "same_init_as" in e else ""
            out.append(f"| {label}{same} | " + " | ".join(_ms(vals[m]) for m in metrics) +
                       f" | {_paired(vals[m0], rnd) if label != 'random' else ''}"
                       f" | {_paired(vals[m0], uni) if label not in ('random', 'uniform') else ''} | {wtxt} |")
        out.append("\nSeconds per source (scoring on "
                   f"{t['score_examples']} dev examples; reference tune {t['reference_tune_seconds']:.0f} s):\n")
        out.append("| measure | " + " | ".join(t["measures"][next(iter(t["measures"]))]["seconds_per_source"]) + " | mean |")
        out.append("|---|" + "---|" * (len(t["measures"][next(iter(t["measures"]))]["seconds_per_source"]) + 1))
        for m, e in t["measures"].items():
            out.append(f"| {m} | " + " | ".join(f"{v:.2f}" for v in e["seconds_per_source"].values()) +
                       f" | {e['mean_seconds_per_source']:.2f} |")
    if "loo" in rep:
        out.append(f"\nLeave-one-out matrix ({rep['loo']['measure']}), heatmap {rep['loo']['heatmap']}:\n")
        cols = sorted({c for row in rep["loo"]["matrix"].values() for c in row})
        out.append("| target | " + " | ".join(cols) + " |")
        out.append("|---|" + "---|" * len(cols))
        for t, row in rep["loo"]["matrix"].items():
            label = Path(t[5:]).name if t.startswith("file:") else t
            out.append(f"| {label} | " + " | ".join(f"{row[c]:.2f}" if c in row else "–" for c in cols) + " |")
    out.append(f"\nPhase seconds: {rep.get('phase_seconds')}")
    print("\n".join(out))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/work/bench/similarity/report.json")
