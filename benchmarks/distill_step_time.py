"""Benchmark: time per optimisation step of DIITO vs standard distillation (same batch, same models).

Prints JSON. Three schemes, each one full step (teacher forward, student forward + backward,
AdamW step) on the same masked batch:

* ``standard``: DistilBERT losses (ce, mlm, cos) - 1 teacher pass, 1 student pass;
* ``diito``: ours - standard + causal_ce from ONE pass per model (in-batch sources, batch
  doubled from the intervened block up; see mergekit_lab/distill/intervention.py);
* ``original``: the original code's scheme for reference - per model 3 full passes (base,
  source, intervened base), the student's with gradients.

Target: diito / standard <= 2.0.

    python benchmarks/distill_step_time.py                       # MiniLM-sized teacher (6x384), 3-layer student
    python benchmarks/distill_step_time.py --teacher-layers 12 --hidden 768 --heads 12   # BERT-base-sized
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher-layers", type=int, default=6)
    ap.add_argument("--student-layers", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=30522)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import BertConfig, BertForMaskedLM

    from mergekit_lab.distill.data import MlmMasker, token_probabilities
    from mergekit_lab.distill.intervention import (
        capture_block_outputs,
        forward_with_intervention,
        sample_plan,
        write_source,
    )
    from mergekit_lab.distill.losses import LossWeights, distillation_losses
    from mergekit_lab.distill.mapping import NeuronMapping
    from mergekit_lab.distill.student import extract_student, get_layers

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.teacher_layers,
                     num_attention_heads=args.heads, intermediate_size=4 * args.hidden, max_position_embeddings=512)
    teacher = BertForMaskedLM(cfg).eval().requires_grad_(False)
    student, layers = extract_student(teacher, num_layers=args.student_layers)
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, args.vocab, (args.batch, args.seq), generator=g)
    am = torch.ones_like(ids)
    lengths = torch.randint(args.seq // 2, args.seq + 1, (args.batch,), generator=g)
    lengths[0] = args.seq
    for i, n in enumerate(lengths.tolist()):
        am[i, n:] = 0
        ids[i, n:] = 0
    ids[:, 0] = 101
    masker = MlmMasker(token_probabilities(args.vocab, None, [0, 100, 101, 102, 103]), 103)
    ids, labels = masker(ids, am, generator=g)
    mapping = NeuronMapping.builtin("single_middle", args.teacher_layers, args.student_layers).resolve(teacher, student)
    pair = mapping.resolved[0]
    plan = sample_plan(am, prop=0.3, rng=np.random.default_rng(0))
    std_w = LossWeights(ce=0.25, mlm=0.25, cos=0.25)
    diito_w = LossWeights(ce=0.25, mlm=0.25, cos=0.25, causal_ce=0.25)

    def finish(loss):
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 5.0)
        opt.step()
        opt.zero_grad()

    def standard():
        with torch.no_grad():
            t = forward_with_intervention(teacher, ids, am)
        s = forward_with_intervention(student, ids, am)
        loss, _ = distillation_losses(s, t, attention_mask=am, labels=labels, weights=std_w)
        finish(loss)

    def diito():
        with torch.no_grad():
            t = forward_with_intervention(teacher, ids, am, plan, pair.teacher)
        s = forward_with_intervention(student, ids, am, plan, pair.student)
        loss, _ = distillation_losses(s, t, attention_mask=am, labels=labels, weights=diito_w)
        finish(loss)

    def intervened(model, src_acts, layer_idx):
        hooks = [get_layers(model)[j].register_forward_hook(
            lambda mod, a, o, j=j: write_source(o, src_acts[j], plan, layer_idx[j])) for j in layer_idx]
        try:
            return model(input_ids=ids, attention_mask=am).logits
        finally:
            for h in hooks:
                h.remove()

    def original():
        # the original: base, source and intervened base passes, all full length, per model
        with torch.no_grad():
            t = forward_with_intervention(teacher, ids, am)
            t_src = capture_block_outputs_full(teacher, pair.teacher)
            t_cf = intervened(teacher, t_src, pair.teacher)
        s = forward_with_intervention(student, ids, am)
        s_src = capture_block_outputs_full(student, pair.student)
        s_cf = intervened(student, s_src, pair.student)
        loss, _ = distillation_losses(s, t, attention_mask=am, labels=labels, weights=std_w)
        from mergekit_lab.distill.losses import kl_ce

        loss = loss + 0.25 * kl_ce(s_cf, t_cf, am.bool(), 2.0)
        finish(loss)

    def capture_block_outputs_full(model, layer_idx):
        out = {}
        hooks = [get_layers(model)[j].register_forward_hook(lambda mod, a, o, j=j: out.__setitem__(j, o)) for j in layer_idx]
        try:
            model(input_ids=ids, attention_mask=am)  # full pass, as the original (no early stop)
        finally:
            for h in hooks:
                h.remove()
        return out

    assert capture_block_outputs  # (the library's early-stopping capture, unused by the original scheme)
    times: dict[str, list[float]] = {"standard": [], "diito": [], "original": []}
    fns = {"standard": standard, "diito": diito, "original": original}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(args.repeats):
        for name, fn in fns.items():  # interleaved, so load changes hit all schemes alike
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({
        "benchmark": "distill_step_time",
        "config": vars(args) | {"student_teacher_layers": layers, "mapping": mapping.describe(),
                                "interchanged_positions": plan.num_positions, "tokens": int(am.sum()),
                                "torch_threads": torch.get_num_threads(), "device": "cpu"},
        "seconds_per_step_median": {k: round(v, 4) for k, v in med.items()},
        "seconds_per_step_all": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "ratio_diito_over_standard": round(med["diito"] / med["standard"], 3),
        "ratio_original_scheme_over_standard": round(med["original"] / med["standard"], 3),
        "target_ratio": 2.0,
    }, indent=2))


if __name__ == "__main__":
    main()
