"""Model access shared by distillation, and student extraction from a teacher.

``extract_student`` initialises a k-layer student from a teacher: embeddings, the chosen
teacher layers (copied in order), and the LM head. Supported:

* BERT / RoBERTa -> the same architecture with fewer layers, or -> DistilBERT (the mapping
  folds the token-type-0 embedding into the position embeddings, and for RoBERTa shifts the
  positions by ``padding_idx + 1``, so a DistilBERT student with *all* teacher layers computes
  exactly the teacher's logits);
* DistilBERT -> fewer-layer DistilBERT;
* GPT-2 -> a shallower GPT-2.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from mergekit_lab.distill.io import resolve_ref
from mergekit_lab.errors import UserError

logger = logging.getLogger(__name__)

CAUSAL_TYPES = {"gpt2"}
MASKED_TYPES = {"bert", "roberta", "distilbert"}
STUDENT_ARCHS = ("same", "distilbert")


# --------------------------------------------------------------------------- model access
def is_causal_lm(model_or_config) -> bool:
    cfg = getattr(model_or_config, "config", model_or_config)
    return cfg.model_type in CAUSAL_TYPES


def base_model(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)  # DDP / accelerate wrappers
    for attr in ("bert", "roberta", "distilbert", "transformer"):
        if hasattr(model, attr):
            return getattr(model, attr)
    raise UserError(f"unsupported model class {type(model).__name__}", hint="use BERT, RoBERTa, DistilBERT or GPT-2")


def get_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks (whose outputs the intervention reads and writes)."""
    base = base_model(model)
    for path in ("encoder.layer", "transformer.layer", "h"):
        obj = base
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, nn.ModuleList):
            return obj
    raise UserError(f"cannot find the transformer layers of {type(model).__name__}")


def hidden_size(model: nn.Module) -> int:
    cfg = getattr(model, "module", model).config
    return int(getattr(cfg, "hidden_size", None) or getattr(cfg, "dim", None) or cfg.n_embd)


def num_heads(model: nn.Module) -> int:
    cfg = getattr(model, "module", model).config
    return int(getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_heads", None) or cfg.n_head)


def position_embedding_params(model: nn.Module) -> list[nn.Parameter]:
    base = base_model(model)
    emb = getattr(base, "embeddings", None)
    if emb is not None and hasattr(emb, "position_embeddings"):
        return list(emb.position_embeddings.parameters())
    if hasattr(base, "wpe"):
        return list(base.wpe.parameters())
    return []


def load_lm(ref: str | Path, *, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a masked or causal LM (with its LM head) from a folder, builtin: name or Hub id."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    path = resolve_ref(str(ref))
    try:
        cfg = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load model {ref!r}: {exc}") from exc
    if cfg.model_type not in CAUSAL_TYPES | MASKED_TYPES:
        raise UserError(
            f"model {ref!r} has type {cfg.model_type!r}",
            hint="distillation supports bert, roberta, distilbert (masked LM) and gpt2 (causal LM)",
        )
    cls = AutoModelForCausalLM if cfg.model_type in CAUSAL_TYPES else AutoModelForMaskedLM
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model, info = cls.from_pretrained(path, output_loading_info=True, **kwargs)
    missing = [k for k in info.get("missing_keys", []) if "position_ids" not in k]
    if missing:
        logger.warning(
            "model %s has no weights for %d tensors (e.g. %s): they are freshly initialised "
            "(a sentence encoder without an MLM head needs an MLM fine-tune first)",
            ref,
            len(missing),
            sorted(missing)[:3],
        )
    return model


# --------------------------------------------------------------------------- extraction
def default_layers(n_teacher: int, k: int) -> list[int]:
    """The original's choices for a 12-layer teacher, else evenly spread layers with the ends kept."""
    if n_teacher == 12 and k == 6:
        return [0, 2, 4, 7, 9, 11]
    if n_teacher == 12 and k == 3:
        return [0, 2, 4]
    if k > n_teacher:
        raise UserError(f"--num-layers {k} exceeds the teacher's {n_teacher} layers")
    if k == 1:
        return [0]
    return sorted({round(i * (n_teacher - 1) / (k - 1)) for i in range(k)})


def _check_layers(layers: Sequence[int], n_teacher: int) -> list[int]:
    layers = [int(x) for x in layers]
    if not layers:
        raise UserError("--layers is empty")
    bad = [x for x in layers if not 0 <= x < n_teacher]
    if bad:
        raise UserError(f"--layers {bad} out of range: the teacher has layers 0..{n_teacher - 1}")
    return layers


_LAYER_RE = re.compile(r"^(?P<pre>.*?(?:encoder\.layer|transformer\.layer|transformer\.h)\.)(?P<i>\d+)(?P<post>\..*)$")


def _same_arch(teacher: nn.Module, layers: list[int]) -> nn.Module:
    cfg = teacher.config.__class__.from_dict(teacher.config.to_dict())
    if cfg.model_type == "gpt2":
        cfg.n_layer = len(layers)
    elif cfg.model_type == "distilbert":
        cfg.n_layers = len(layers)
    else:
        cfg.num_hidden_layers = len(layers)
    student = type(teacher)(cfg)
    t_sd = teacher.state_dict()
    new_sd = {}
    for key in student.state_dict():
        m = _LAYER_RE.match(key)
        src = f"{m['pre']}{layers[int(m['i'])]}{m['post']}" if m else key
        if src not in t_sd:
            raise UserError(f"cannot initialise student tensor {key}: teacher has no {src}")
        new_sd[key] = t_sd[src].clone()
    student.load_state_dict(new_sd, strict=True)
    return student


_BERT_TO_DISTIL = {
    "attention.self.query": "attention.q_lin",
    "attention.self.key": "attention.k_lin",
    "attention.self.value": "attention.v_lin",
    "attention.output.dense": "attention.out_lin",
    "attention.output.LayerNorm": "sa_layer_norm",
    "intermediate.dense": "ffn.lin1",
    "output.dense": "ffn.lin2",
    "output.LayerNorm": "output_layer_norm",
}


def _to_distilbert(teacher: nn.Module, layers: list[int]) -> nn.Module:
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    tc = teacher.config
    mt = tc.model_type
    if mt not in ("bert", "roberta"):
        raise UserError(f"--student-arch distilbert needs a BERT or RoBERTa teacher, not {mt!r}")
    if getattr(tc, "hidden_act", "gelu") not in ("gelu", "relu"):
        raise UserError(f"DistilBERT supports gelu/relu activations, the teacher uses {tc.hidden_act!r}")
    prefix = "bert" if mt == "bert" else "roberta"
    offset = (tc.pad_token_id + 1) if mt == "roberta" else 0
    cfg = DistilBertConfig(
        vocab_size=tc.vocab_size,
        max_position_embeddings=tc.max_position_embeddings - offset,
        sinusoidal_pos_embds=False,
        n_layers=len(layers),
        n_heads=tc.num_attention_heads,
        dim=tc.hidden_size,
        hidden_dim=tc.intermediate_size,
        dropout=tc.hidden_dropout_prob,
        attention_dropout=tc.attention_probs_dropout_prob,
        activation=tc.hidden_act,
        initializer_range=tc.initializer_range,
        pad_token_id=tc.pad_token_id,
        tie_word_embeddings=getattr(tc, "tie_word_embeddings", True),
    )
    for name in ("bos_token_id", "eos_token_id"):
        if getattr(tc, name, None) is not None:
            setattr(cfg, name, getattr(tc, name))
    student = DistilBertForMaskedLM(cfg)
    t = teacher.state_dict()
    sd: dict[str, torch.Tensor] = {}
    e = f"{prefix}.embeddings"
    sd["distilbert.embeddings.word_embeddings.weight"] = t[f"{e}.word_embeddings.weight"]
    pos = t[f"{e}.position_embeddings.weight"][offset:]
    if f"{e}.token_type_embeddings.weight" in t:  # token type 0 is constant: fold it into positions
        pos = pos + t[f"{e}.token_type_embeddings.weight"][0]
    sd["distilbert.embeddings.position_embeddings.weight"] = pos
    sd["distilbert.embeddings.LayerNorm.weight"] = t[f"{e}.LayerNorm.weight"]
    sd["distilbert.embeddings.LayerNorm.bias"] = t[f"{e}.LayerNorm.bias"]
    for s_i, t_i in enumerate(layers):
        for src, dst in _BERT_TO_DISTIL.items():
            for p in ("weight", "bias"):
                sd[f"distilbert.transformer.layer.{s_i}.{dst}.{p}"] = t[f"{prefix}.encoder.layer.{t_i}.{src}.{p}"]
    if mt == "bert":
        head = {
            "vocab_transform": "cls.predictions.transform.dense",
            "vocab_layer_norm": "cls.predictions.transform.LayerNorm",
        }
        dec_w, dec_b = "cls.predictions.decoder.weight", "cls.predictions.bias"
    else:
        head = {"vocab_transform": "lm_head.dense", "vocab_layer_norm": "lm_head.layer_norm"}
        dec_w, dec_b = "lm_head.decoder.weight", "lm_head.bias"
    for dst, src in head.items():
        sd[f"{dst}.weight"] = t[f"{src}.weight"]
        sd[f"{dst}.bias"] = t[f"{src}.bias"]
    sd["vocab_projector.weight"] = t.get(dec_w, t[f"{e}.word_embeddings.weight"])
    sd["vocab_projector.bias"] = t[dec_b] if dec_b in t else t[dec_w.replace("weight", "bias")]
    sd = {k: v.clone() for k, v in sd.items()}
    missing, unexpected = student.load_state_dict(sd, strict=False)
    missing = [k for k in missing if "position_ids" not in k]
    if missing or unexpected:
        raise UserError(f"DistilBERT mapping incomplete: missing {missing}, unexpected {unexpected}")
    return student


def extract_student(
    teacher: nn.Module | str | Path,
    *,
    num_layers: int | None = None,
    layers: Sequence[int] | None = None,
    arch: str = "same",
) -> tuple[nn.Module, list[int]]:
    """Build a student from ``teacher``; return (student model, teacher layers used)."""
    if arch not in STUDENT_ARCHS:
        raise UserError(f"unknown student architecture {arch!r}", hint=f"choose one of {STUDENT_ARCHS}")
    if not isinstance(teacher, nn.Module):
        teacher = load_lm(teacher)
    n_teacher = len(get_layers(teacher))
    if layers is None:
        if num_layers is None:
            raise UserError("give --num-layers or --layers")
        layers = default_layers(n_teacher, int(num_layers))
    layers = _check_layers(layers, n_teacher)
    if num_layers is not None and len(layers) != int(num_layers):
        raise UserError(f"--layers has {len(layers)} entries but --num-layers is {num_layers}")
    with torch.no_grad():
        if arch == "distilbert" and teacher.config.model_type != "distilbert":
            student = _to_distilbert(teacher, layers)
        else:
            student = _same_arch(teacher, layers)
    return student, layers


def save_student(student: nn.Module, output: Path, *, tokenizer_ref: str | None = None, extra: dict | None = None) -> None:
    """Save a HF folder (safetensors); copy the teacher's tokenizer when given."""
    student.save_pretrained(output)
    if tokenizer_ref is not None:
        from transformers import AutoTokenizer

        try:
            AutoTokenizer.from_pretrained(resolve_ref(tokenizer_ref)).save_pretrained(output)
        except (OSError, ValueError) as exc:
            logger.warning("could not copy the tokenizer from %s: %s", tokenizer_ref, exc)
    if extra:
        from mergekit_lab.distill.io import write_json_atomic

        write_json_atomic(Path(output) / "mklab_student.json", extra)
