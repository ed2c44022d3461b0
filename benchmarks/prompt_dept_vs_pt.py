"""DePT vs PT at equal trainable parameters, and our PT vs PEFT's own prompt tuning.

On builtin:minilm (d=384) and real GLUE inputs (../shared/data/glue SST-2 and RTE):

* cost: time per training step (forward + backward + AdamW step), time per inference batch
  and training memory, for PT with m=100 and DePT with (m, r) from ``--match-pt-length 100``
  (s = --max-seq-length), both on identical batches, variants interleaved round-robin so that
  load from other processes hits all of them alike (medians reported). Memory is the bytes of
  the tensors autograd saves for backward in one training step (exact, device independent),
  plus the CUDA peak when a GPU is used. Ratios DePT / PT (targets: <= 0.8 time, < 1.0 memory)
  and ours / PEFT for PT (target: <= 1.0).
* quality: dev accuracy of PT and DePT after the same number of steps through the real
  ``mklab prompt-tune`` code path (:func:`mergekit_lab.prompt.run.prompt_tune`).

Prints one JSON object. Example (CPU, modest)::

    python benchmarks/prompt_dept_vs_pt.py --tasks sst2 rte --quality-steps 150 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for backward while running ``fn`` (deduplicated)."""
    seen: dict[int, int] = {}

    def pack(t):
        try:
            key = t.untyped_storage().data_ptr()
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        except RuntimeError:
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def make_batches(task, tokenizer, split, n, bs, s, seed):
    from mergekit_lab.data import load_task_data, make_collator
    from mergekit_lab.settings import DataSettings

    data = DataSettings(task=task.name, data_dir=str(SHARED / "glue"), max_seq_length=s)
    ds = load_task_data(task, split, data, tokenizer, max_samples=n * bs, seed=seed)
    collate = make_collator(tokenizer)
    return [collate([ds[j] for j in range(i * bs, (i + 1) * bs)]) for i in range(n)]


def cost_benchmark(task_name, args, device):
    from peft import PromptTuningConfig, get_peft_model

    from mergekit_lab.models import load_model_for_task, load_tokenizer
    from mergekit_lab.prompt import build_prompt_model, match_pt_length, param_groups
    from mergekit_lab.settings import ModelSettings
    from mergekit_lab.tasks import get_task

    task = get_task(f"glue/{task_name}")
    ms = ModelSettings(name_or_path="builtin:minilm")
    tok = load_tokenizer(ms)
    base = load_model_for_task(ms, task, seed=0, tokenizer=tok)
    d = base.config.hidden_size
    s = args.max_seq_length
    choice = match_pt_length(args.pt_length, d, s).chosen
    train_batches = make_batches(task, tok, "train", args.batches, args.batch_size, s, seed=1)
    eval_batches = make_batches(task, tok, "validation", args.batches, args.eval_batch_size, s, seed=1)

    def ours(method, **kw):
        m = build_prompt_model(copy.deepcopy(base), method, tokenizer=tok, max_length=s, seed=0, **kw)
        return m

    variants = {
        "pt": ours("pt", num_virtual_tokens=args.pt_length),
        "dept": ours("dept", num_virtual_tokens=choice.m, r=choice.r),
        "dept_original_padding": ours(
            "dept", num_virtual_tokens=choice.m, r=choice.r, padding_mode="original"
        ),
    }
    peft = get_peft_model(
        copy.deepcopy(base),
        PromptTuningConfig(
            task_type="SEQ_CLS", num_virtual_tokens=args.pt_length, num_transformer_submodules=1
        ),
    )
    with torch.no_grad():
        peft.prompt_encoder["default"].embedding.weight.copy_(variants["pt"].prompt)
    variants["peft_pt"] = peft

    optims = {}
    counts = {}
    for name, m in variants.items():
        m.to(device)
        if name == "peft_pt":
            params = [p for p in m.parameters() if p.requires_grad]
            optims[name] = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-5)
        else:
            optims[name] = torch.optim.AdamW(param_groups(m, prompt_lr=0.3, lora_lr=5e-3, weight_decay=1e-5))
        counts[name] = sum(p.numel() for p in m.parameters() if p.requires_grad)

    def train_step(name, batch):
        m, opt = variants[name], optims[name]
        m.train()
        b = {k: v.to(device) for k, v in batch.items()}
        labels = b.pop("labels")
        loss = task.loss(m(**b).logits, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def infer(name, batch):
        m = variants[name]
        m.eval()
        b = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        return m(**b).logits

    for name in variants:  # warmup
        train_step(name, train_batches[0])
        infer(name, eval_batches[0])
    t_train = {n: [] for n in variants}
    t_inf = {n: [] for n in variants}
    for _ in range(args.reps):
        for i in range(len(train_batches)):
            for name in variants:
                _sync()
                t0 = time.perf_counter()
                train_step(name, train_batches[i])
                _sync()
                t_train[name].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                infer(name, eval_batches[i])
                _sync()
                t_inf[name].append(time.perf_counter() - t0)

    mem = {}
    cuda_peak = {}
    for name, m in variants.items():
        m.train()
        per = []
        for batch in train_batches:
            b = {k: v.to(device) for k, v in batch.items()}
            labels = b.pop("labels")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            nbytes, out = saved_bytes(lambda m=m, b=b: m(**b).logits)
            task.loss(out, labels).backward()
            optims[name].zero_grad(set_to_none=True)
            per.append(nbytes)
            if torch.cuda.is_available():
                cuda_peak.setdefault(name, []).append(torch.cuda.max_memory_allocated() / 2**20)
        mem[name] = statistics.mean(per) / 2**20

    med = {n: statistics.median(v) for n, v in t_train.items()}
    med_inf = {n: statistics.median(v) for n, v in t_inf.items()}
    lengths = [int(b["input_ids"].shape[1]) for b in train_batches]
    real = [int(b["attention_mask"].sum()) / b["attention_mask"].shape[0] for b in train_batches]
    out = {
        "task": task.name,
        "d": d,
        "s": s,
        "pt": {"m": args.pt_length, "trainable_params": counts["pt"]},
        "dept": {"m": choice.m, "r": choice.r, "trainable_params": counts["dept"]},
        "peft_pt_trainable_params": counts["peft_pt"],
        "batch_size": args.batch_size,
        "eval_batch_size": args.eval_batch_size,
        "padded_batch_lengths": lengths,
        "mean_real_tokens_per_example": round(statistics.mean(real), 1),
        "train_step_seconds": {n: round(v, 5) for n, v in med.items()},
        "inference_batch_seconds": {n: round(v, 5) for n, v in med_inf.items()},
        "train_activation_mb": {n: round(v, 2) for n, v in mem.items()},
        "ratios": {
            "dept_over_pt_train_time": round(med["dept"] / med["pt"], 3),
            "dept_over_pt_inference_time": round(med_inf["dept"] / med_inf["pt"], 3),
            "dept_over_pt_train_memory": round(mem["dept"] / mem["pt"], 3),
            "dept_original_padding_over_pt_train_time": round(med["dept_original_padding"] / med["pt"], 3),
            "ours_over_peft_pt_train_time": round(med["pt"] / med["peft_pt"], 3),
            "ours_over_peft_pt_inference_time": round(med_inf["pt"] / med_inf["peft_pt"], 3),
            "ours_over_peft_pt_train_memory": round(mem["pt"] / mem["peft_pt"], 3),
        },
        "samples": {
            "train_steps_per_variant": len(t_train["pt"]),
            "inference_batches_per_variant": len(t_inf["pt"]),
        },
    }
    if cuda_peak:
        out["train_peak_cuda_mb"] = {n: round(max(v), 1) for n, v in cuda_peak.items()}
        out["ratios"]["dept_over_pt_peak_cuda_memory"] = round(
            out["train_peak_cuda_mb"]["dept"] / out["train_peak_cuda_mb"]["pt"], 3
        )
    return out


def quality_benchmark(task_name, method, args, workdir: Path):
    from mergekit_lab.prompt.run import prompt_tune
    from mergekit_lab.prompt.settings import PromptTuneSettings
    from mergekit_lab.runtime import set_quiet

    set_quiet(True)
    s = PromptTuneSettings.model_validate(
        {
            "run": {
                "output_dir": str(workdir / f"{task_name}-{method}"),
                "seed": 42,
                "overwrite": True,
                "quiet": True,
            },
            "model": {"name_or_path": "builtin:minilm"},
            "data": {
                "task": f"glue/{task_name}",
                "data_dir": str(SHARED / "glue"),
                "max_seq_length": args.max_seq_length,
                "max_eval_samples": args.quality_eval_samples,
            },
            "training": {
                "max_steps": args.quality_steps,
                "per_device_train_batch_size": args.batch_size,
                "per_device_eval_batch_size": args.eval_batch_size,
                "learning_rate": args.quality_prompt_lr,
                "weight_decay": 1e-5,
                "warmup_ratio": 0.05,
                "eval_steps": max(args.quality_steps // 2, 1),
            },
            "prompt": {"method": method, "match_pt_length": args.pt_length, "lora_embedding_lr": args.quality_lora_lr,
                       "head_lr": args.quality_head_lr},
        }
    )
    res = prompt_tune(s)
    return {
        "task": f"glue/{task_name}",
        "method": method,
        "steps": res["timing"]["steps"],
        "m": res["prompt"]["m"],
        "r": res["prompt"]["r"],
        "trainable_params": res["metrics"]["trainable_params"],
        "dev_accuracy": res["metrics"]["validation"].get("accuracy"),
        "eval_examples": res["eval_examples"],
        "seconds_per_step": res["timing"]["seconds_per_step"],
        "tokens_per_second": res["timing"]["tokens_per_second"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=["sst2", "rte"])
    p.add_argument("--pt-length", type=int, default=100)
    p.add_argument("--max-seq-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--quality-steps", type=int, default=150)
    p.add_argument("--quality-eval-samples", type=int, default=None)
    p.add_argument("--quality-prompt-lr", type=float, default=0.3,
                   help="prompt learning rate of the quality runs (0.3 is DePT's T5 setting)")
    p.add_argument("--quality-lora-lr", type=float, default=5e-3,
                   help="learning rate of DePT's A/B in the quality runs (and of the head unless --quality-head-lr)")
    p.add_argument("--quality-head-lr", type=float, default=None,
                   help="learning rate of the classification head in the quality runs (default: --quality-lora-lr)")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--methods", nargs="+", choices=["pt", "dept"], default=["pt", "dept"],
                   help="quality runs to do (run pt and dept as two processes to use two cores)")
    p.add_argument("--skip-cost", action="store_true")
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (1 is steadiest on a shared CPU)"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="also write the (partial) JSON here after each part")
    args = p.parse_args(argv)
    if not (SHARED / "glue").is_dir():
        print(json.dumps({"skipped": f"{SHARED / 'glue'} is absent"}))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    device = torch.device(args.device)
    out = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(0),
        "torch_threads": torch.get_num_threads(),
        "model": "builtin:minilm",
        "settings": vars(args),
    }

    def checkpoint():
        if args.out:
            Path(args.out).write_text(json.dumps(out, indent=2) + "\n")

    if not args.skip_cost:
        out["cost"] = []
        for t in args.tasks:
            out["cost"].append(cost_benchmark(t, args, device))
            checkpoint()
    if not args.skip_quality:
        out["quality"] = []
        with tempfile.TemporaryDirectory() as tmp:
            for t in args.tasks:
                for m in args.methods:
                    out["quality"].append(quality_benchmark(t, m, args, Path(tmp)))
                    checkpoint()
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
