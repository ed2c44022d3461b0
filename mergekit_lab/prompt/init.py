"""Initialising the soft prompt (and, for transfer, A and B).

* ``text`` (default, as in DePT's code and PEFT's ``TEXT``): embeddings of the tokens of a text,
  truncated or repeated to ``m`` (exactly PEFT's rule, special tokens included);
* ``vocab``: embeddings of ``m`` token ids sampled uniformly (seeded) from the vocabulary;
* ``random``: uniform in [-0.5, 0.5] (Lester et al. 2021), seeded;
* :func:`init_from_module`: copy the prompt (and A, B) of a trained PT/DePT folder
  (parameter-efficient transfer; the task head is not copied).
"""

from __future__ import annotations

import logging
import math

import torch

from mergekit_lab.errors import UserError
from mergekit_lab.prompt.config import INIT_CHOICES
from mergekit_lab.prompt.io import LORA_A_KEY, LORA_B_KEY, PROMPT_KEY, read_prompt_config, read_prompt_tensors
from mergekit_lab.prompt.model import PromptTunedModel

logger = logging.getLogger(__name__)


def text_token_ids(tokenizer, text: str, n: int) -> list[int]:
    """PEFT's TEXT rule: tokenize, then truncate or repeat to ``n`` ids."""
    ids = list(tokenizer(text)["input_ids"])
    if not ids:
        raise UserError(f"the prompt init text {text!r} has no tokens", hint="pass a non-empty --init-text")
    if len(ids) < n:
        ids = ids * math.ceil(n / len(ids))
    return ids[:n]


@torch.no_grad()
def _set_prompt_from_ids(model: PromptTunedModel, ids) -> None:
    emb = model.word_embeddings
    ids = torch.as_tensor(ids, dtype=torch.long, device=emb.weight.device)
    model.prompt.copy_(emb(ids).detach().float())


@torch.no_grad()
def init_prompt(
    model: PromptTunedModel,
    how: str = "text",
    *,
    tokenizer=None,
    text: str | None = None,
    seed: int = 0,
) -> None:
    """Initialise the prompt rows of ``model`` in place (see the module docstring)."""
    n = model.prompt.shape[0]
    gen = torch.Generator().manual_seed(int(seed))
    if how == "text":
        if tokenizer is None or not text:
            raise UserError(
                "prompt init 'text' needs a tokenizer and a text",
                hint="set --init-text or use --prompt-init vocab",
            )
        _set_prompt_from_ids(model, text_token_ids(tokenizer, text, n))
    elif how == "vocab":
        vocab = model.word_embeddings.weight.shape[0]
        _set_prompt_from_ids(model, torch.randint(0, vocab, (n,), generator=gen))
    elif how == "random":
        model.prompt.copy_(torch.rand(model.prompt.shape, generator=gen) - 0.5)
    else:
        raise UserError(f"unknown prompt init {how!r}", hint=f"choose one of {', '.join(INIT_CHOICES)}")


@torch.no_grad()
def init_from_module(model: PromptTunedModel, directory) -> list[str]:
    """Copy the prompt (and A, B when both are DePT with equal shapes) from a trained folder.

    Returns the names of what was copied. The prompt lengths and hidden sizes must agree."""
    src_cfg = read_prompt_config(directory)
    tensors = read_prompt_tensors(directory)
    copied = []
    src_prompt = tensors[PROMPT_KEY][: int(src_cfg.num_virtual_tokens)]
    m = model.num_virtual_tokens
    if tuple(src_prompt.shape) != (m, model.prompt.shape[1]):
        raise UserError(
            f"--init-from {directory}: its prompt is {tuple(src_prompt.shape)}, this module's is "
            f"({m}, {model.prompt.shape[1]})",
            hint="use the same --prefix-length and base model as the source module",
        )
    model.prompt[:m].copy_(src_prompt.float())
    copied.append(PROMPT_KEY)
    if model.is_dept and LORA_A_KEY in tensors:
        a, b = tensors[LORA_A_KEY], tensors[LORA_B_KEY]
        if a.shape != model.lora_embedding_A.shape or b.shape != model.lora_embedding_B.shape:
            raise UserError(
                f"--init-from {directory}: A/B are {tuple(a.shape)}/{tuple(b.shape)}, this module's are "
                f"{tuple(model.lora_embedding_A.shape)}/{tuple(model.lora_embedding_B.shape)}",
                hint="use the same --r and --max-seq-length as the source module",
            )
        model.lora_embedding_A.copy_(a.float())
        model.lora_embedding_B.copy_(b.float())
        copied += [LORA_A_KEY, LORA_B_KEY]
    elif LORA_A_KEY in tensors:
        logger.warning(
            "--init-from %s: the source is DePT, this module is PT; only the prompt is copied", directory
        )
    return copied
