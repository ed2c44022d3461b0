"""Leave-one-out study: similarity-weighted LoRA ensembling as an initialisation (Lv et al. 2023).

builtin:minilm + LoRA (r 8, query/value) sources trained on real data from ../shared/data; for
each target: the target's own module is left out, every other module is scored against the
target, the pool is averaged (uniform and similarity-weighted per measure) and the average
initialises a k-shot fine-tuning run, compared with a random LoRA init. Prints one JSON object
(dev scores, weights, time per measure per source) and writes the weight heatmap.

The CPU is shared: source budgets are small (a few hundred examples, 2 epochs, 64 tokens) and
one seed is run, so differences of a few points are within noise; see the note in the README.

    python benchmarks/similarity_loo.py --out /tmp/sim_bench
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SOURCES = {"sst2": "glue/sst2", "cola": "glue/cola", "mrpc": "glue/mrpc", "rte": "glue/rte", "stsb": "glue/stsb",
           "isear": "emotion/isear"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/sim_bench")
    ap.add_argument("--targets", nargs="+", default=["glue/rte", "glue/mrpc"])
    ap.add_argument("--measures", nargs="+", default=["loss", "kl", "el2n", "grand", "cos_weights"])
    ap.add_argument("--train-examples", type=int, default=256, help="training examples per source module")
    ap.add_argument("--source-epochs", type=float, default=2.0)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--dev", type=int, default=200, help="target dev examples for scoring and evaluation")
    ap.add_argument("--ref-steps", type=int, default=50, help="steps of the reference tune (kl, cos_weights)")
    ap.add_argument("--k-shot", type=int, default=32)
    ap.add_argument("--fewshot-steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--fewshot-measures", nargs="+", default=None,
                    help="measures whose weighted average initialises a few-shot run (default: all scored)")
    ap.add_argument("--sources", nargs="+", default=list(SOURCES), choices=list(SOURCES))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a contended CPU)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if not DATA.is_dir():
        print(json.dumps({"skipped": f"{DATA} is absent"}))
        return

    from mergekit_lab.cli.train import TrainSettings, train_model
    from mergekit_lab.runtime import set_quiet
    from mergekit_lab.similarity.ensemble import ensemble_modules
    from mergekit_lab.similarity.plots import heatmap
    from mergekit_lab.similarity.run import run_similarity
    from mergekit_lab.similarity.settings import SimilaritySettings

    set_quiet(True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lora = {"peft": "lora", "lora_r": 8, "lora_alpha": 16}
    data = {"data_dir": str(DATA), "max_seq_length": args.seq}

    def train(task, output, *, delta, training, **data_extra):
        s = TrainSettings.model_validate({
            "run": {"output_dir": str(output), "quiet": True, "seed": args.seed, "overwrite": True},
            "model": {"name_or_path": "builtin:minilm"} if "peft_init" not in delta else {},
            "data": {"task": task, **data, **data_extra}, "training": training, "delta": delta})
        t0 = time.time()
        res = train_model(s)
        return res["metrics"]["validation"], time.time() - t0

    report: dict = {"settings": vars(args), "sources": {}, "targets": {}}
    pool = out / "pool"
    for name in args.sources:
        task = SOURCES[name]
        folder = pool / name
        if (folder / "results.json").exists():
            r = json.loads((folder / "results.json").read_text())
            report["sources"][name] = {"task": task, "dev": r["metrics"]["validation"], "seconds": r["wall_seconds"],
                                       "reused": True}
            continue
        metrics, secs = train(task, folder, delta=lora,
                              training={"num_train_epochs": args.source_epochs, "learning_rate": args.lr,
                                        "per_device_train_batch_size": 16, "per_device_eval_batch_size": 64},
                              max_train_samples=args.train_examples, max_eval_samples=args.dev)
        report["sources"][name] = {"task": task, "dev": metrics, "seconds": round(secs, 1)}
        print(f"source {name}: {metrics} in {secs:.0f}s", file=sys.stderr)

    matrix: dict[str, dict[str, dict[str, float | None]]] = {m: {} for m in args.measures}
    for target in args.targets:
        tname = target.split("/")[-1]
        sim_dir = out / "sim" / tname
        s = SimilaritySettings.model_validate({
            "run": {"output_dir": str(sim_dir), "quiet": True, "seed": args.seed, "overwrite": True},
            "data": {"task": target, **data, "k_shot": args.k_shot},
            "training": {"max_steps": args.ref_steps, "learning_rate": args.lr, "per_device_train_batch_size": 16,
                         "per_device_eval_batch_size": 64},
            "similarity": {"pool": [str(pool)], "measure": args.measures, "num_examples": args.dev}})
        t0 = time.time()
        run_similarity(s)
        sim_secs = time.time() - t0
        scores = json.loads((sim_dir / "scores.json").read_text())["targets"][target]
        entry: dict = {"excluded": scores["excluded"], "reference_tune_seconds": scores["reference_seconds"],
                       "similarity_seconds": round(sim_secs, 1), "measures": {}, "fewshot": {}}
        for m in args.measures:
            me = scores["measures"][m]
            entry["measures"][m] = {"scores": me["scores"], "weights": me["weights"],
                                    "seconds_per_source": me["seconds"]}
            matrix[m][tname] = {**me["weights"], **{x: None for x in scores["excluded"]}}
        members = [pool / n for n in args.sources]
        inits = {"random": None, "uniform": ("uniform", None)}
        for m in args.fewshot_measures or args.measures:
            wfile = sim_dir / ("weights.json" if m == args.measures[0] else f"weights_{m}.json")
            inits[m] = ("file", wfile)
        for label, how in inits.items():
            run_dir = out / "fewshot" / tname / label
            if how is None:
                delta = lora
            else:
                init_dir = out / "init" / tname / label
                if how[0] == "uniform":
                    keep = [p for p in members if p.name not in scores["excluded"]]
                    ensemble_modules(keep, init_dir)
                else:
                    ensemble_modules(members, init_dir, weights_file=how[1])
                delta = {"peft_init": str(init_dir)}
            metrics, secs = train(target, run_dir, delta=delta,
                                  training={"max_steps": args.fewshot_steps, "learning_rate": args.lr,
                                            "per_device_train_batch_size": 16, "eval_steps": args.fewshot_steps},
                                  k_shot=args.k_shot, max_eval_samples=args.dev)
            entry["fewshot"][label] = {**metrics, "seconds": round(secs, 1)}
            print(f"{target} {label}: {metrics}", file=sys.stderr)
        report["targets"][target] = entry
        (out / "report.json").write_text(json.dumps(report, indent=2))  # partial results survive a timeout
    names = list(args.sources)
    for m in args.measures:
        heatmap(matrix[m], names, out / f"heatmap_{m}.png", title=f"LoRA ensembling weights ({m})")
    report["heatmaps"] = {m: str(out / f"heatmap_{m}.png") for m in args.measures}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
