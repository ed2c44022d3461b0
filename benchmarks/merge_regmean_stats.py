"""Benchmark: cost of RegMean statistics and of the RegMean solve.

On the embedded MiniLM (builtin:minilm, BERT 6x384) with a fresh 2-label head and N real SST-2
sentences from the shipped sample: the time of plain forward passes (eval, no_grad) over the N
examples, the time to collect the Gram matrices over the same examples (float64 and float32
accumulation), their ratio (target <= 1.3), the Fisher (hard) time, and the time to merge two
such models with RegMean (all linear layers solved) vs simple averaging. Prints one JSON object.

    python benchmarks/merge_regmean_stats.py --examples 512
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-seq-length", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="best of N timings")
    args = ap.parse_args()

    from torch.utils.data import DataLoader

    from mergekit_lab.data import load_task_data
    from mergekit_lab.merging import (
        compute_fisher,
        compute_grams,
        merge_models,
        save_statistics,
        statistics_path,
    )
    from mergekit_lab.models import load_tokenizer
    from mergekit_lab.settings import DataSettings, ModelSettings
    from mergekit_lab.tasks import get_task

    task = get_task("glue/sst2")
    ms = ModelSettings(name_or_path="builtin:minilm")
    tok = load_tokenizer(ms)
    data = DataSettings(task="glue/sst2", data_dir="builtin:sample", max_seq_length=args.max_seq_length)
    ds = load_task_data(task, "train", data, tok, max_samples=args.examples, seed=0)
    batches = list(DataLoader(ds, batch_size=args.batch_size, collate_fn=task.collator(tok)))
    n_tokens = int(sum(b["attention_mask"].sum() for b in batches))
    model = task.build_model(ms, seed=0, tokenizer=tok).eval()

    def best(fn):
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
        return min(times), out

    @torch.no_grad()
    def forward_only():
        for b in batches:
            model(**{k: v for k, v in b.items() if k not in ("labels", "label_mask")})

    t_fwd, _ = best(forward_only)
    t_g64, (grams, info) = best(lambda: compute_grams(model, batches, dtype=torch.float64, progress=False))
    t_g32, _ = best(lambda: compute_grams(model, batches, dtype=torch.float32, progress=False))
    t_fisher, _ = best(lambda: compute_fisher(model, batches, variant="hard", loss_fn=task.loss, progress=False))

    result = {
        "model": "builtin:minilm (BERT 6x384) + 2-label head",
        "examples": len(ds),
        "tokens": n_tokens,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "forward_s": round(t_fwd, 3),
        "grams_float64_s": round(t_g64, 3),
        "grams_float32_s": round(t_g32, 3),
        "ratio_grams_float64_over_forward": round(t_g64 / t_fwd, 3),
        "ratio_grams_float32_over_forward": round(t_g32 / t_fwd, 3),
        "fisher_hard_s": round(t_fisher, 3),
        "n_linear_layers": len(grams),
        "gram_mb_float64": round(sum(g.numel() * 8 for g in grams.values()) / 2**20, 1),
    }

    with tempfile.TemporaryDirectory(prefix="mklab-regmean-bench-") as tmp:
        tmp = Path(tmp)
        paths, stats = [], []
        for i in range(2):
            m = task.build_model(ms, seed=i, tokenizer=tok)
            with torch.no_grad():
                g = torch.Generator().manual_seed(10 + i)
                for p in m.parameters():
                    p.add_(1e-3 * torch.randn(p.shape, generator=g))
            d = tmp / f"m{i}"
            m.save_pretrained(d)
            gi, ii = compute_grams(m, batches[: max(1, len(batches) // 2)], progress=False)
            stats.append(save_statistics(statistics_path(d, "grams"), gi, {"kind": "grams", **ii}))
            paths.append(d)
        t_avg, _ = best(lambda: merge_models(paths, "average", output_dir=tmp / "avg", progress=False))
        t_reg, r = best(lambda: merge_models(paths, "regmean", statistics=stats, output_dir=tmp / "reg", progress=False))
        result.update(
            merge_average_s=round(t_avg, 3),
            merge_regmean_s=round(t_reg, 3),
            regmean_solved_layers=r.report["notes"]["counts"].get("regmean", 0),
            regmean_extra_over_average_s=round(t_reg - t_avg, 3),
            regmean_solve_ms_per_layer=round(1000 * (t_reg - t_avg) / max(1, r.report["notes"]["counts"].get("regmean", 1)), 2),
            ridge_fallbacks=len(r.report["notes"]["ridge_fallbacks"]),
        )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
