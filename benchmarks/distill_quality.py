"""Benchmark: standard distillation vs DIITO on real data with the embedded MiniLM teacher.

Prints JSON. Pipeline (all offline, CPU):

1. binarize ``../shared/data/text/train.txt`` and ``valid.txt`` with the MiniLM tokenizer, count tokens;
2. teacher: ``builtin:minilm`` with a fitted MLM head (``fit_mlm_head``; it ships without one);
3. a 3-layer student extracted from the teacher (layers [0, 2, 5]);
4. distil twice from the same student with the SAME batches/tokens: standard (ce, mlm, cos) and
   DIITO (+ causal_ce, single middle mapping, interchange_prop 0.3, consecutive);
5. MLM perplexity of teacher / initial student / both students on ``valid.txt`` (fixed masks);
6. SST-2 dev accuracy after fine-tuning each student the same way (``mklab train`` machinery).

The CPU budget forces a tiny run (``--distill-steps`` x ``--batch`` x ``--seq`` tokens); the KL
terms are restricted to the masked tokens (``restrict_ce_to_mask``, an option of the original
code) so the LM heads run on 15% of the positions. Figures from such a short run show the
pipeline works and how the two compare at equal tokens, not the paper's numbers.

    python benchmarks/distill_quality.py --workdir /tmp/dq [--distill-steps 100] [--sst2-steps 150]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/mklab-distill-quality")
    ap.add_argument("--head-steps", type=int, default=150)
    ap.add_argument("--head-lr", type=float, default=5e-4)
    ap.add_argument("--head-unfreeze", type=int, default=6, help="encoder blocks trained with the head (0: head only)")
    ap.add_argument("--distill-steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--sst2-steps", type=int, default=150)
    ap.add_argument("--sst2-train-samples", type=int, default=4000)
    ap.add_argument("--eval-sequences", type=int, default=500)
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()
    if not SHARED.is_dir():
        raise SystemExit(f"{SHARED} is absent: this benchmark needs the shared real data")

    from mergekit_lab.distill.binarize import BinarizedCorpus, TextSource, binarize, count_tokens
    from mergekit_lab.distill.evaluate import lm_perplexity
    from mergekit_lab.distill.mlm_head import fit_mlm_head
    from mergekit_lab.distill.run import run_distill
    from mergekit_lab.distill.settings import DistillSettings
    from mergekit_lab.distill.student import extract_student, load_lm, save_student

    wd = Path(args.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    out: dict = {"benchmark": "distill_quality", "config": vars(args), "seconds": {}}
    t0 = time.time()
    if not (wd / "train").exists():
        binarize(TextSource(files=[SHARED / "text" / "train.txt"]), "builtin:minilm", wd / "train", num_proc=2)
    if not (wd / "valid").exists():
        binarize(TextSource(files=[SHARED / "text" / "valid.txt"]), "builtin:minilm", wd / "valid")
    if not (wd / "counts").exists():
        count_tokens(wd / "train", wd / "counts")
    out["train_tokens_available"] = BinarizedCorpus(wd / "train").header["num_tokens"]
    out["seconds"]["data"] = round(time.time() - t0, 1)

    t0 = time.time()
    if not (wd / "teacher").exists():
        teacher, stats = fit_mlm_head("builtin:minilm", wd / "train", token_counts=wd / "counts",
                                      max_steps=args.head_steps, batch_size=16, max_seq_length=args.seq,
                                      learning_rate=args.head_lr, unfreeze_layers=args.head_unfreeze, seed=args.seed)
        save_student(teacher, wd / "teacher", tokenizer_ref="builtin:minilm", extra={"mlm_head": stats})
        out["mlm_head"] = stats
    out["seconds"]["mlm_head"] = round(time.time() - t0, 1)
    teacher = load_lm(wd / "teacher")
    if not (wd / "student0").exists():
        student, layers = extract_student(teacher, num_layers=3)
        save_student(student, wd / "student0", tokenizer_ref="builtin:minilm", extra={"teacher_layers": layers})

    def ppl(model_dir):
        m = load_lm(model_dir)
        return lm_perplexity(m, wd / "valid", max_len=args.seq * 2, max_sequences=args.eval_sequences, seed=0)

    out["perplexity_valid"] = {"teacher": ppl(wd / "teacher"), "student_init": ppl(wd / "student0")}

    runs = {}
    for name, causal in (("standard", 0.0), ("diito", 0.25)):
        t0 = time.time()
        settings = DistillSettings.model_validate({
            "run": {"output_dir": str(wd / f"run-{name}"), "seed": args.seed, "overwrite": True, "quiet": True},
            "models": {"teacher": str(wd / "teacher"), "student": str(wd / "student0")},
            "data": {"data": str(wd / "train"), "token_counts": str(wd / "counts"), "max_seq_length": args.seq},
            "losses": {"alpha_ce": 0.25, "alpha_mlm": 0.25, "alpha_cos": 0.25, "alpha_causal_ce": causal,
                       "restrict_ce_to_mask": True},
            "interchange": {"neuron_mapping": "single_middle", "interchange_prop": 0.3},
            "training": {"max_steps": args.distill_steps, "per_device_train_batch_size": args.batch,
                         "gradient_accumulation_steps": 1, "logging_steps": 10, "save_steps": 10_000,
                         "freeze_pos_embs": True},
        })
        res = run_distill(settings)
        runs[name] = {"tokens_seen": res["distill"]["tokens_seen"], "train_seconds": round(res["distill"]["train_seconds"], 1),
                      "final_losses": res["metrics"]["train"]}
        runs[name]["perplexity_valid"] = ppl(wd / f"run-{name}")
        out["seconds"][f"distill_{name}"] = round(time.time() - t0, 1)
    out["distill"] = runs

    from mergekit_lab.cli.train import TrainSettings, train_model

    sst2 = {}
    for name in ("student_init", "standard", "diito"):
        model_dir = wd / ("student0" if name == "student_init" else f"run-{name}")
        t0 = time.time()
        ts = TrainSettings.model_validate({
            "run": {"output_dir": str(wd / f"sst2-{name}"), "seed": args.seed, "overwrite": True, "quiet": True},
            "model": {"name_or_path": str(model_dir)},
            "data": {"task": "glue/sst2", "data_dir": str(SHARED / "glue"), "max_seq_length": 64,
                     "max_train_samples": args.sst2_train_samples},
            "training": {"max_steps": args.sst2_steps, "per_device_train_batch_size": 32, "learning_rate": 1e-4,
                         "warmup_ratio": 0.1, "logging_steps": 50},
        })
        res = train_model(ts)
        sst2[name] = res["metrics"]["validation"]
        out["seconds"][f"sst2_{name}"] = round(time.time() - t0, 1)
    out["sst2_dev"] = sst2
    print(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
