"""Language-model perplexity of a (student) model on a binarized corpus.

Masked LMs: the standard 15% masking (80/10/10, uniform over non-special tokens) drawn with a
fixed seed, so every model is scored on exactly the same masked positions; perplexity =
exp(mean cross-entropy over the masked tokens). Causal LMs: next-token perplexity.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mergekit_lab.distill.binarize import BinarizedCorpus
from mergekit_lab.distill.data import LmSequences, MlmMasker, clm_labels, collate, token_probabilities
from mergekit_lab.distill.student import is_causal_lm


@torch.no_grad()
def lm_perplexity(
    model,
    corpus: BinarizedCorpus | str,
    *,
    max_len: int = 128,
    batch_size: int = 32,
    max_sequences: int | None = 2000,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    corpus = corpus if isinstance(corpus, BinarizedCorpus) else BinarizedCorpus(corpus)
    device = device or next(model.parameters()).device
    seqs = LmSequences(corpus, max_len=max_len, max_sequences=max_sequences)
    special = corpus.special_token_ids
    pad = special.get("pad_token", special.get("eos_token", 0))
    causal = is_causal_lm(model)
    masker = None
    if not causal:
        probs = token_probabilities(model.config.vocab_size, None, list(special.values()))
        masker = MlmMasker(probs, special["mask_token"])
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    order = np.argsort(seqs.lengths, kind="stable")
    gen = torch.Generator().manual_seed(seed)
    for s in range(0, len(order), batch_size):
        batch = collate([seqs[int(i)] for i in order[s : s + batch_size]], pad)
        ids, am = batch["input_ids"], batch["attention_mask"]
        if masker is not None:
            ids, labels = masker(ids, am, generator=gen)
        else:
            labels = clm_labels(ids, am)
        labels = labels.to(device)
        if causal:
            logits = model(input_ids=ids.to(device), attention_mask=am.to(device), use_cache=False).logits.float()
            logits, labels = logits[:, :-1], labels[:, 1:]
        else:  # the head at the masked positions only
            from mergekit_lab.distill.intervention import forward_with_intervention

            sel = labels != -100
            logits = forward_with_intervention(model, ids.to(device), am.to(device), logit_mask=sel).logits.float()
            labels = labels[sel]
        n = int((labels != -100).sum())
        if n == 0:
            continue
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=-100, reduction="sum")
        total += float(loss)
        count += n
    model.train(was_training)
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "predicted_tokens": count}
