"""Give an encoder without an MLM head (e.g. the embedded sentence encoder ``builtin:minilm``) a
working masked-LM head, so it can serve as a distillation teacher.

``fit_mlm_head`` loads the model as ``*ForMaskedLM`` (the head's transform is freshly
initialised, the decoder is tied to the word embeddings), then trains with the MLM loss on a
binarized corpus: by default only the head (transform, LayerNorm, output bias), optionally the
last ``unfreeze_layers`` encoder blocks too. The result is a Hugging Face folder.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from mergekit_lab.distill.binarize import BinarizedCorpus, load_token_counts
from mergekit_lab.distill.data import (
    LengthGroupedBatches,
    LmSequences,
    MlmMasker,
    collate,
    token_probabilities,
)
from mergekit_lab.distill.student import base_model, get_layers, is_causal_lm, load_lm
from mergekit_lab.errors import UserError

HEAD_PREFIXES = ("cls.", "lm_head.", "vocab_transform", "vocab_layer_norm", "vocab_projector.bias")


def _head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The MLM head of BERT / RoBERTa / DistilBERT applied to (N, H) hidden states."""
    if hasattr(model, "cls"):
        return model.cls(hidden)
    if hasattr(model, "lm_head"):
        return model.lm_head(hidden)
    if hasattr(model, "vocab_transform"):
        x = model.activation(model.vocab_transform(hidden))
        return model.vocab_projector(model.vocab_layer_norm(x))
    raise UserError(f"no MLM head found on {type(model).__name__}")


def fit_mlm_head(
    model_ref: str,
    corpus: str | Path,
    *,
    token_counts: str | Path | None = None,
    max_steps: int = 300,
    batch_size: int = 32,
    max_seq_length: int = 128,
    learning_rate: float = 1e-3,
    unfreeze_layers: int = 0,
    seed: int = 0,
    progress=None,
) -> tuple[torch.nn.Module, dict]:
    """Train the MLM head (and optionally the top blocks); return (model, stats)."""
    torch.manual_seed(seed)
    model = load_lm(model_ref)
    if is_causal_lm(model):
        raise UserError("fit-mlm-head is for masked LMs (BERT, RoBERTa, DistilBERT)")
    c = BinarizedCorpus(corpus)
    special = c.special_token_ids
    if "mask_token" not in special:
        raise UserError(f"corpus {c.path} has no [MASK] token")
    if c.vocab_size != model.config.vocab_size:
        raise UserError(f"corpus vocabulary ({c.vocab_size}) differs from the model's ({model.config.vocab_size})")
    layers = get_layers(model)
    if not 0 <= unfreeze_layers <= len(layers):
        raise UserError(f"unfreeze_layers must be in 0..{len(layers)}")
    trainable_layers = {id(p) for layer in list(layers)[len(layers) - unfreeze_layers :] for p in layer.parameters()}
    emb = model.get_input_embeddings().weight
    params = []
    for name, p in model.named_parameters():
        train = name.startswith(HEAD_PREFIXES) or id(p) in trainable_layers
        if p is emb:  # the tied decoder: keep the pretrained embeddings
            train = False
        p.requires_grad_(train)
        if train:
            params.append(p)
    if not params:
        raise UserError("found no MLM head parameters to train")
    counts = load_token_counts(token_counts) if token_counts else None
    masker = MlmMasker(token_probabilities(c.vocab_size, counts, list(special.values())), special["mask_token"])
    max_len = min(max_seq_length, int(model.config.max_position_embeddings))
    seqs = LmSequences(c, max_len=max_len)
    sampler = LengthGroupedBatches(seqs.lengths, batch_size, seed=seed)
    opt = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    warm = max(1, max_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (max_steps - s) / max(1, max_steps - warm)))
    )
    model.train()
    step, epoch, losses = 0, 0, []
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    while step < max_steps:
        sampler.set_epoch(epoch)
        for idx in sampler:
            b = collate([seqs[i] for i in idx], special.get("pad_token", 0))
            ids, labels = masker(b["input_ids"], b["attention_mask"], generator=gen)
            sel = labels != -100
            # the vocabulary projection dominates the cost: apply the head to the masked tokens only
            with torch.set_grad_enabled(unfreeze_layers > 0):
                hidden = base_model(model)(input_ids=ids, attention_mask=b["attention_mask"]).last_hidden_state
            logits = _head_logits(model, hidden[sel])
            loss = torch.nn.functional.cross_entropy(logits.float(), labels[sel])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
            sched.step()
            opt.zero_grad()
            losses.append(loss.item())
            step += 1
            if progress is not None:
                progress(step, float(np.mean(losses[-20:])))
            if step >= max_steps:
                break
        epoch += 1
    for p in model.parameters():
        p.requires_grad_(True)
    tail = float(np.mean(losses[-20:])) if losses else float("nan")
    stats = {"steps": step, "final_mlm_loss": tail, "final_perplexity": math.exp(min(tail, 50)),
             "first_mlm_loss": losses[0] if losses else None, "seconds": time.time() - t0,
             "trained_parameters": sum(p.numel() for p in params), "unfreeze_layers": unfreeze_layers}
    return model, stats
