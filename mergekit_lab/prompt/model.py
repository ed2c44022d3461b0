"""The prompt-tuned model: a frozen Transformers model with a soft prompt (PT) and, for DePT, a
low-rank update of its input token embeddings.

One wrapper serves both methods so that PT and DePT run the same code path (fair timing):

* the soft prompt is PEFT's own :class:`peft.tuners.prompt_tuning.PromptEmbedding`, configured
  by a :class:`peft.PromptTuningConfig` (PT) or :class:`~mergekit_lab.prompt.config.DePTConfig`;
* DePT adds ``scale * (A @ B)[position]`` to the token embeddings, ``A: (s x r)`` kaiming-uniform,
  ``B: (r x d)`` zeros, ``scale = lora_alpha / sqrt(r)``. By default the update is skipped at
  padding positions and the row of ``A`` is the token's index among the real tokens (so left or
  right padding give the same result, and batches are padded dynamically). ``padding_mode=
  "original"`` pads inputs to ``s`` and adds the update at all ``s`` positions, as the reference
  code does.

Backbones (``config.task_type``): ``SEQ_2_SEQ_LM`` (T5: the prompt goes on the encoder input),
``SEQ_CLS`` on encoders (BERT, RoBERTa, MiniLM; the classification head is trained, as PEFT
does) and on decoder-only models (GPT-2, Llama: the batch is left-aligned so that the head reads
the last real token), ``CAUSAL_LM`` (labels of the prompt positions are -100; returned logits
are those of the input positions) and ``FEATURE_EXTRACTION``.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from peft import PromptTuningConfig
from peft.tuners.prompt_tuning import PromptEmbedding, PromptTuningInit
from torch import nn

from mergekit_lab.errors import UserError
from mergekit_lab.prompt.config import HEAD_MODULE_NAMES, DePTConfig

TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "FEATURE_EXTRACTION")


def is_decoder_only(model: nn.Module) -> bool:
    """True for causal LMs (GPT-2, Llama, ...): in Transformers' causal-LM mapping but not in the
    masked-LM one (BERT/RoBERTa are in both), and not encoder-decoder."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    cfg = model.config
    if getattr(cfg, "is_encoder_decoder", False):
        return False
    mt = getattr(cfg, "model_type", "")
    return mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def infer_task_type(model: nn.Module) -> str:
    """PEFT task type for a Transformers model, from its class and config."""
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if getattr(model.config, "is_encoder_decoder", False):
        return "SEQ_2_SEQ_LM"
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "CAUSAL_LM"
    return "FEATURE_EXTRACTION"


def hidden_size(model: nn.Module) -> int:
    return int(model.get_input_embeddings().weight.shape[1])


class PromptTunedModel(nn.Module):
    """A frozen base model plus a PT or DePT prompt module (see the module docstring)."""

    def __init__(self, base_model: nn.Module, config: PromptTuningConfig):
        super().__init__()
        if config.task_type not in TASK_TYPES:
            raise UserError(
                f"prompt tuning does not support task type {config.task_type!r}",
                hint=f"supported: {', '.join(TASK_TYPES)}",
            )
        d = hidden_size(base_model)
        if config.token_dim is None:
            config.token_dim = d
        if int(config.token_dim) != d:
            raise UserError(
                f"prompt module token_dim {config.token_dim} does not match the model's hidden size {d}"
            )
        if config.num_transformer_submodules is None:
            config.num_transformer_submodules = 1
        self.base_model = base_model
        self.peft_config = config
        self.config = base_model.config  # what training/evaluation code reads (num_labels, ...)
        for p in base_model.parameters():
            p.requires_grad_(False)

        # PEFT's PromptEmbedding; our own init functions fill it (mergekit_lab.prompt.init), so it is
        # built with RANDOM (PEFT's TEXT init would load a tokenizer by name).
        build_cfg = dataclasses.replace(
            config, prompt_tuning_init=PromptTuningInit.RANDOM, tokenizer_kwargs=None
        )
        self.prompt_encoder = PromptEmbedding(build_cfg, base_model.get_input_embeddings())
        self.prompt_encoder.embedding.weight.data = self.prompt_encoder.embedding.weight.data.float()

        self.is_dept = isinstance(config, DePTConfig)
        if self.is_dept:
            s, r = int(config.max_length), int(config.r)
            self.lora_embedding_A = nn.Parameter(torch.empty(s, r))
            self.lora_embedding_B = nn.Parameter(torch.zeros(r, d))
            nn.init.kaiming_uniform_(self.lora_embedding_A, a=math.sqrt(5))
            self.scale = config.scale

        self.decoder_only = is_decoder_only(base_model)
        self.head_names: list[str] = []
        if config.task_type == "SEQ_CLS":
            for name, module in base_model.named_children():
                if name in HEAD_MODULE_NAMES:
                    self.head_names.append(name)
                    for p in module.parameters():
                        p.requires_grad_(True)
            if not self.head_names:
                raise UserError(
                    f"no classification head found on {type(base_model).__name__}",
                    hint=f"expected a child module named one of {', '.join(HEAD_MODULE_NAMES)}",
                )
            config.modules_to_save = list(self.head_names)

    # ------------------------------------------------------------------ parameters
    @property
    def num_virtual_tokens(self) -> int:
        return int(self.peft_config.num_virtual_tokens)

    @property
    def word_embeddings(self) -> nn.Module:
        return self.base_model.get_input_embeddings()

    @property
    def prompt(self) -> nn.Parameter:
        return self.prompt_encoder.embedding.weight

    def head_parameters(self) -> list[tuple[str, nn.Parameter]]:
        out = []
        for name in self.head_names:
            for pname, p in getattr(self.base_model, name).named_parameters():
                out.append((f"{name}.{pname}", p))
        return out

    def trainable_parameter_count(self) -> int:
        """Exact number of trainable parameters (prompt, A, B, head)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def prompt_parameter_count(self) -> int:
        """Trainable parameters of the prompt module alone (no head)."""
        n = self.prompt.numel()
        if self.is_dept:
            n += self.lora_embedding_A.numel() + self.lora_embedding_B.numel()
        return n

    def get_base_model(self) -> nn.Module:
        return self.base_model

    # ------------------------------------------------------------------ forward
    def _pad_to_max_length(self, input_ids, attention_mask, token_type_ids, labels):
        s = int(self.peft_config.max_length)
        T = input_ids.shape[1]
        if T > s:
            raise UserError(
                f"input length {T} exceeds DePT max_length s={s}",
                hint="lower --max-seq-length or raise the module's max length",
            )
        if T == s:
            return input_ids, attention_mask, token_type_ids, labels
        pad = s - T
        pad_id = self.base_model.config.pad_token_id
        pad_id = 0 if pad_id is None else int(pad_id)
        input_ids = F.pad(input_ids, (0, pad), value=pad_id)
        attention_mask = F.pad(attention_mask, (0, pad), value=0)
        if token_type_ids is not None:
            token_type_ids = F.pad(token_type_ids, (0, pad), value=0)
        if labels is not None and self.peft_config.task_type == "CAUSAL_LM":
            labels = F.pad(labels, (0, pad), value=-100)
        return input_ids, attention_mask, token_type_ids, labels

    def embedding_update(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """DePT's ``scale * (A @ B)[pos]`` for a batch, shape ``(batch, T, d)``, fp32."""
        s = int(self.peft_config.max_length)
        delta = (self.lora_embedding_A @ self.lora_embedding_B) * self.scale  # (s, d)
        T = attention_mask.shape[1]
        if self.peft_config.padding_mode == "original":
            return delta[:T].unsqueeze(0).expand(attention_mask.shape[0], -1, -1)
        mask = attention_mask.to(torch.long)
        if int(mask.sum(dim=1).max()) > s:
            raise UserError(
                f"an input has {int(mask.sum(dim=1).max())} tokens, more than DePT max_length s={s}",
                hint="lower --max-seq-length to at most s",
            )
        pos = (mask.cumsum(dim=1) - 1).clamp(min=0)  # index among the real tokens
        return F.embedding(pos, delta) * mask.unsqueeze(-1).to(delta.dtype)

    def embed_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Input token embeddings as the base model receives them (after DePT's update)."""
        emb = self.word_embeddings(input_ids)
        if self.is_dept:
            emb = emb + self.embedding_update(attention_mask).to(emb.dtype)
        return emb

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ):
        if input_ids is None:
            raise ValueError("PromptTunedModel.forward needs input_ids")
        kwargs.pop("inputs_embeds", None)
        kwargs.pop("position_ids", None)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self.is_dept and self.peft_config.padding_mode == "original":
            input_ids, attention_mask, token_type_ids, labels = self._pad_to_max_length(
                input_ids, attention_mask, token_type_ids, labels
            )
        task = self.peft_config.task_type
        b = input_ids.shape[0]
        m = self.num_virtual_tokens
        emb = self.embed_inputs(input_ids, attention_mask)
        prompts = self.prompt[:m].to(emb.dtype).unsqueeze(0).expand(b, -1, -1)
        inputs_embeds = torch.cat([prompts, emb], dim=1)
        mask = torch.cat([attention_mask.new_ones(b, m), attention_mask], dim=1)

        if task == "SEQ_2_SEQ_LM":
            return self.base_model(inputs_embeds=inputs_embeds, attention_mask=mask, labels=labels, **kwargs)

        if token_type_ids is not None:
            token_type_ids = torch.cat([token_type_ids.new_zeros(b, m), token_type_ids], dim=1)
            kwargs["token_type_ids"] = token_type_ids

        if self.decoder_only:
            if task == "SEQ_CLS":
                # The head of a decoder-only classifier reads the last position when it gets
                # inputs_embeds, so move padding to the left (stable: order kept).
                order = torch.sort(mask, dim=1, stable=True).indices
                inputs_embeds = torch.gather(
                    inputs_embeds, 1, order.unsqueeze(-1).expand(-1, -1, inputs_embeds.shape[-1])
                )
                mask = torch.gather(mask, 1, order)
            kwargs["position_ids"] = (mask.long().cumsum(dim=1) - 1).clamp(min=0)

        if task == "CAUSAL_LM":
            if labels is not None:
                labels = torch.cat([labels.new_full((b, m), -100), labels], dim=1)
            out = self.base_model(inputs_embeds=inputs_embeds, attention_mask=mask, labels=labels, **kwargs)
            if getattr(out, "logits", None) is not None:
                out.logits = out.logits[:, m:]
            return out
        if task == "SEQ_CLS":
            return self.base_model(inputs_embeds=inputs_embeds, attention_mask=mask, labels=labels, **kwargs)
        return self.base_model(inputs_embeds=inputs_embeds, attention_mask=mask, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """Generation for T5 (prompt on the encoder) and causal LMs (returns the new tokens only)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self.is_dept and self.peft_config.padding_mode == "original":
            input_ids, attention_mask, _, _ = self._pad_to_max_length(input_ids, attention_mask, None, None)
        b, m = input_ids.shape[0], self.num_virtual_tokens
        emb = self.embed_inputs(input_ids, attention_mask)
        prompts = self.prompt[:m].to(emb.dtype).unsqueeze(0).expand(b, -1, -1)
        inputs_embeds = torch.cat([prompts, emb], dim=1)
        mask = torch.cat([attention_mask.new_ones(b, m), attention_mask], dim=1)
        return self.base_model.generate(inputs_embeds=inputs_embeds, attention_mask=mask, **kwargs)

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, save_directory, **kwargs) -> None:
        from mergekit_lab.prompt.io import save_prompt_module

        save_prompt_module(self, save_directory)
