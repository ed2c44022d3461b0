"""Causal distillation library: binarize, counts, students, masking, mappings, interventions, losses."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from mergekit_lab.distill.binarize import (
    BinarizedCorpus,
    TextSource,
    binarize,
    combine,
    count_tokens,
    load_token_counts,
)
from mergekit_lab.distill.data import (
    LengthGroupedBatches,
    LmSequences,
    MlmMasker,
    collate,
    token_probabilities,
)
from mergekit_lab.distill.intervention import (
    capture_block_outputs,
    forward_with_intervention,
    sample_plan,
    write_source,
)
from mergekit_lab.distill.losses import LossWeights, distillation_losses
from mergekit_lab.distill.mapping import NeuronMapping, Variable
from mergekit_lab.distill.student import extract_student, get_layers
from mergekit_lab.errors import UserError
from tests.factories import WORDS, make_tokenizer

# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread avoids oversubscription on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

def _docs(n: int, seed: int = 0, min_words: int = 3, max_words: int = 40) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) for _ in range(n)]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    make_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory, tok_dir):
    d = tmp_path_factory.mktemp("corpus")
    (d / "a.txt").write_text("\n".join(_docs(150, 0)) + "\n\n")
    out = d / "bin"
    binarize(TextSource(files=[d / "a.txt"]), str(tok_dir), out)
    return out


def _bert(vocab: int, layers: int = 4, hidden: int = 32, heads: int = 2, seed: int = 0, dropout: float = 0.1):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=48, max_position_embeddings=128, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout)
    return BertForMaskedLM(cfg)


def _gpt2(vocab: int, layers: int = 4, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=layers, n_head=2, n_positions=64,
                                      bos_token_id=0, eos_token_id=0))


def _batch(vocab: int, B: int = 4, L: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (B, L), generator=g)
    am = torch.ones(B, L, dtype=torch.long)
    for i, n in enumerate([L, L - 3, L - 5, L - 1][:B]):
        am[i, n:] = 0
        ids[i, n:] = 0
    return ids, am


# ----------------------------------------------------------------------------- binarize
def test_binarize_round_trip_mmap_and_workers(tmp_path, tok_dir):
    from transformers import AutoTokenizer

    docs = _docs(60, 1)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "p1.txt").write_text("\n".join(docs[:30]) + "\n")
    (tmp_path / "in" / "p2.txt").write_text("\n\n".join(docs[30:]))  # blank lines are skipped
    h1 = binarize(TextSource(files=[tmp_path / "in"]), str(tok_dir), tmp_path / "b1", chunk_size=7)
    h2 = binarize(TextSource(files=[tmp_path / "in"]), str(tok_dir), tmp_path / "b2", chunk_size=7, num_proc=2)
    c1, c2 = BinarizedCorpus(tmp_path / "b1"), BinarizedCorpus(tmp_path / "b2")
    assert isinstance(c1.tokens, np.memmap) and isinstance(c1.offsets, np.memmap)  # never read whole
    assert c1.tokens.dtype == np.uint16 and h1["dtype"] == "uint16"
    assert np.array_equal(c1.tokens, c2.tokens) and np.array_equal(c1.offsets, c2.offsets)
    assert h1["num_sequences"] == h2["num_sequences"] == len(docs)
    assert h1["num_tokens"] == int(c1.offsets[-1])
    tok = AutoTokenizer.from_pretrained(tok_dir)
    for i, doc in enumerate(docs):
        seq = c1[i].tolist()
        assert seq[0] == tok.cls_token_id and seq[-1] == tok.sep_token_id
        assert tok.decode(seq[1:-1]) == doc
    # atomic: no temporary folders left; existing output refused without overwrite
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with pytest.raises(UserError, match="already exists"):
        binarize(TextSource(files=[tmp_path / "in"]), str(tok_dir), tmp_path / "b1")


def test_binarize_save_to_disk_fields_and_combine(tmp_path, tok_dir):
    import datasets

    ds = datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"q": ["the cat sat", "a dog ran"], "c": ["on the mat", ""], "n": [1, 2]})})
    ds.save_to_disk(str(tmp_path / "ds"))
    h = binarize(TextSource(disk=tmp_path / "ds", text_field="q+c"), str(tok_dir), tmp_path / "d")
    assert h["num_sequences"] == 2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    c = BinarizedCorpus(tmp_path / "d")
    assert tok.decode(c[0].tolist(), skip_special_tokens=True) == "the cat sat on the mat"
    with pytest.raises(UserError, match="not in the dataset"):
        binarize(TextSource(disk=tmp_path / "ds", text_field="nope"), str(tok_dir), tmp_path / "e")
    both = combine([tmp_path / "d", tmp_path / "d"], tmp_path / "dd")
    cc = BinarizedCorpus(tmp_path / "dd")
    assert both["num_sequences"] == 4 and np.array_equal(cc[2], c[0]) and np.array_equal(cc[3], c[1])


def test_count_tokens_sum_and_values(tmp_path, corpus_dir):
    c = BinarizedCorpus(corpus_dir)
    h = count_tokens(corpus_dir, tmp_path / "counts", block=97)  # several blocks
    counts = load_token_counts(tmp_path / "counts")
    assert counts.dtype == np.int64 and counts.shape == (c.vocab_size,)
    assert counts.sum() == c.tokens.shape[0] == h["num_tokens"]
    assert np.array_equal(counts, np.bincount(np.asarray(c.tokens), minlength=c.vocab_size))
    assert json.loads((tmp_path / "counts" / "header.json").read_text())["format"] == "mklab-token-counts"


def test_sequences_split_and_filters(corpus_dir):
    c = BinarizedCorpus(corpus_dir)
    seqs = LmSequences(c, max_len=16, min_len=12)
    cls, sep = c.special_token_ids["cls_token"], c.special_token_ids["sep_token"]
    assert len(seqs) > 0
    for i in range(len(seqs)):
        s = seqs[i]
        assert 12 <= len(s) <= 16 and s[0] == cls and s[-1] == sep
    # every content token of long-enough documents is kept, in order
    body = np.concatenate([seqs[i][1:-1] for i in range(len(seqs))])
    assert body.size == int(sum(seqs.lengths - 2))


def test_sequences_drop_short_and_unknown(tmp_path, tok_dir):
    good = " ".join(["the cat sat on the mat"] * 3)
    (tmp_path / "t.txt").write_text("\n".join([good, "the cat", "1 2 3 4 5 6 7 8 9 0 1 2 3 the cat"]) + "\n")
    binarize(TextSource(files=[tmp_path / "t.txt"]), str(tok_dir), tmp_path / "b")
    c = BinarizedCorpus(tmp_path / "b")
    assert len(c) == 3
    seqs = LmSequences(c, max_len=64)
    assert len(seqs) == 1 and np.array_equal(seqs[0], c[0])
    assert len(LmSequences(c, max_len=64, max_unk_fraction=1.0)) == 2


def test_length_grouped_batches_shard_evenly(corpus_dir):
    lengths = np.random.default_rng(0).integers(5, 100, 103)
    shards = [LengthGroupedBatches(lengths, 4, seed=1, rank=r, world_size=2, group=5) for r in range(2)]
    b0, b1 = list(shards[0]), list(shards[1])
    assert len(b0) == len(b1) == len(shards[0])
    flat = [i for b in b0 + b1 for i in b]
    assert len(flat) == len(set(flat))  # disjoint
    spread = np.mean([np.ptp(lengths[b]) for b in b0])
    random_spread = np.mean([np.ptp(lengths[np.random.default_rng(i).choice(103, 4)]) for i in range(50)])
    assert spread < random_spread / 2  # grouped by length
    shards[0].set_epoch(0, skip=2)
    assert list(shards[0]) == b0[2:]


# ----------------------------------------------------------------------------- masking
def test_mlm_masking_proportions_and_rare_tokens():
    vocab = 50
    counts = np.full(vocab, 1000)
    counts[7] = 1  # rare
    special = [0, 1, 2, 3, 4]
    probs = token_probabilities(vocab, counts, special)
    assert probs[:5].sum() == 0 and torch.isclose(probs[7], torch.tensor(1.0))
    masker = MlmMasker(probs, mask_id=4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (64, 100), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3  # [CLS] ... [SEP]
    ids[:, 5::10] = 7
    am = torch.ones_like(ids)
    am[:, 90:] = 0
    ids[:, 90:] = 0
    new, labels = masker(ids, am, generator=g)
    pred = labels != -100
    n_real = int(am.sum())
    assert pred.sum() == int(np.ceil(0.15 * n_real))
    assert not pred[am == 0].any() and not pred[:, 0].any()
    assert not pred[ids < 5].any()  # specials and padding never chosen
    assert torch.equal(labels[pred], ids[pred])
    frac_mask = (new[pred] == 4).float().mean().item()
    frac_keep = (new[pred] == ids[pred]).float().mean().item()
    assert abs(frac_mask - 0.8) < 0.05 and 0.05 < frac_keep < 0.17
    assert torch.equal(new[~pred], ids[~pred])
    rare_rate = pred[ids == 7].float().mean()
    common_rate = pred[(ids >= 8) & (am == 1)].float().mean()
    assert rare_rate > 3 * common_rate  # rare tokens favoured (count^-0.7)


# ----------------------------------------------------------------------------- students
def test_extract_student_layers_equal_teacher_layers():
    t = _bert(60, layers=12, hidden=16)
    s, layers = extract_student(t, num_layers=6)
    assert layers == [0, 2, 4, 7, 9, 11]
    assert extract_student(t, num_layers=3)[1] == [0, 2, 4]
    ts, ss = t.state_dict(), s.state_dict()
    for si, ti in enumerate(layers):
        for k, v in ss.items():
            if f"encoder.layer.{si}." in k:
                assert torch.equal(v, ts[k.replace(f"layer.{si}.", f"layer.{ti}.")])
    for k in ("bert.embeddings.word_embeddings.weight", "cls.predictions.transform.dense.weight", "cls.predictions.bias"):
        assert torch.equal(ss[k], ts[k])
    with pytest.raises(UserError, match="out of range"):
        extract_student(t, layers=[0, 12])


def test_extract_distilbert_and_gpt2_students(tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    t = _bert(60, layers=3).eval()
    ids, am = _batch(60)
    full, _ = extract_student(t, layers=[0, 1, 2], arch="distilbert")
    full.eval()
    assert type(full).__name__ == "DistilBertForMaskedLM"
    m = am.bool()
    assert torch.allclose(full(input_ids=ids, attention_mask=am).logits[m], t(input_ids=ids, attention_mask=am).logits[m], atol=1e-5)
    small, _ = extract_student(t, layers=[0, 2], arch="distilbert")
    small.save_pretrained(tmp_path / "db")
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "db")
    assert len(get_layers(loaded)) == 2
    assert torch.equal(loaded.distilbert.transformer.layer[1].attention.q_lin.weight,
                       t.bert.encoder.layer[2].attention.self.query.weight)
    g = _gpt2(60, layers=4)
    gs, layers = extract_student(g, num_layers=2)
    gs.save_pretrained(tmp_path / "g")
    g2 = AutoModelForCausalLM.from_pretrained(tmp_path / "g")
    assert layers == [0, 3] and len(g2.transformer.h) == 2
    assert torch.equal(g2.transformer.h[1].attn.c_attn.weight, g.transformer.h[3].attn.c_attn.weight)


# ----------------------------------------------------------------------------- mappings
def test_neuron_mapping_parse_builtins_and_errors(tmp_path):
    v = Variable.parse("$L:6$H:[0:12]$[0:64]")
    assert v.layers == (6, 7) and v.heads == (0, 12) and v.dims == (0, 64)
    assert Variable.parse("$L:[0:4]$H:3$[8:16]").layers == (0, 4)
    idx = Variable.parse("$L:1$H:[1:2]$[2:5]").resolve(4, 2, 32, "teacher")[1]
    assert idx.tolist() == [18, 19, 20]  # head 1 (size 16), dims 2..4
    assert NeuronMapping.builtin("single_middle", 12, 6).pairs[0].teacher[0].layers == (6, 7)
    assert NeuronMapping.builtin("single_middle", 12, 6).pairs[0].student[0].layers == (3, 4)
    assert NeuronMapping.builtin("late", 12, 3).pairs[0].teacher[0].layers == (10, 11)
    ml = NeuronMapping.builtin("multilayer", 12, 6)
    assert [p.teacher[0].layers for p in ml.pairs] == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10), (10, 12)]
    t, s = _bert(60, layers=4), _bert(60, layers=2)
    nm = tmp_path / "m.nm"
    nm.write_text(json.dumps({"interchange_variable_mappings": [
        {"teacher_variable_names": ["$L:2$H:[0:2]$[0:16]"], "student_variable_names": ["$L:1$H:[0:2]$[0:16]"]}]}))
    mp = NeuronMapping.load(str(nm), 4, 2).resolve(t, s)
    assert list(mp.resolved[0].teacher) == [2] and mp.resolved[0].student[1].numel() == 32
    bad_layer = {"interchange_variable_mappings": [
        {"teacher_variable_names": ["$L:2$H:[0:2]$[0:16]"], "student_variable_names": ["$L:5$H:[0:2]$[0:16]"]}]}
    with pytest.raises(UserError, match="layer range .* student's 2 layers"):
        NeuronMapping.from_dict(bad_layer).resolve(t, s)
    bad_head = {"interchange_variable_mappings": [
        {"teacher_variable_names": ["$L:2$H:[0:12]$[0:64]"], "student_variable_names": ["$L:1"]}]}
    with pytest.raises(UserError, match="head range"):
        NeuronMapping.from_dict(bad_head).resolve(t, s)
    with pytest.raises(UserError, match="cannot parse"):
        Variable.parse("$X:1")
    with pytest.raises(UserError, match="neither a built-in nor a file"):
        NeuronMapping.load("nope", 4, 2)


# ----------------------------------------------------------------------------- interventions
@pytest.mark.parametrize("mode", ["consecutive", "random"])
def test_plan_positions_never_padding(mode):
    _, am = _batch(60, B=4, L=20)
    for seed in range(5):
        plan = sample_plan(am, prop=0.3, mode=mode, rng=np.random.default_rng(seed))
        assert not (plan.base_mask & (am == 0)).any()
        assert not (plan.source_mask & (am[plan.perm] == 0)).any()
        assert torch.equal(plan.base_mask.sum(1), plan.source_mask.sum(1))
        lens = am.sum(1)
        k = (torch.minimum(lens, lens[plan.perm]).float() * 0.3).long().clamp(min=1)
        assert torch.equal(plan.base_mask.sum(1), k)
        assert (plan.perm != torch.arange(4)).all()
        if mode == "consecutive":
            for row in plan.base_mask:
                pos = row.nonzero().flatten()
                assert (pos.diff() == 1).all()
    capped = sample_plan(am, prop=1.0, max_tokens=2, rng=np.random.default_rng(0))
    assert capped.base_mask.sum(1).max() == 2


def test_intervention_writes_exactly_the_mapped_slice():
    m = _bert(60, layers=4).eval()
    ids, am = _batch(60)
    plan = sample_plan(am, prop=0.4, mode="random", rng=np.random.default_rng(3))
    idx = Variable.parse("$L:2$H:1$[2:6]").resolve(4, 2, 32, "student")
    out = forward_with_intervention(m, ids, am, plan, idx, capture=(2,))
    h = out.captured[2]
    B = ids.shape[0]
    clean, inter = h[:B], h[B:]
    changed = (inter != clean)
    expected = torch.zeros_like(changed)
    cols = torch.zeros(32, dtype=torch.bool)
    cols[idx[2]] = True
    expected[plan.base_mask] = cols
    assert torch.equal(changed, expected)  # exactly the slice at the chosen positions, nothing else
    s_rows, s_pos = plan.source_mask.nonzero(as_tuple=True)
    b_rows, b_pos = plan.base_mask.nonzero(as_tuple=True)
    assert torch.equal(inter[b_rows, b_pos][:, idx[2]], clean[plan.perm[s_rows], s_pos][:, idx[2]])
    # the standard half is the plain forward; the counterfactual half equals a naive 2-pass run
    plain = m(input_ids=ids, attention_mask=am).logits
    mk = am.bool()
    assert torch.allclose(out.logits[mk], plain[mk], atol=1e-5)
    src = capture_block_outputs(m, ids, am, (2,))
    hook = get_layers(m)[2].register_forward_hook(lambda mod, a, o: write_source(o, src[2], plan, idx[2]))
    naive = m(input_ids=ids, attention_mask=am).logits
    hook.remove()
    assert torch.allclose(out.cf_logits[mk], naive[mk], atol=1e-5)
    assert not torch.allclose(out.cf_logits[mk], plain[mk], atol=1e-3)


def test_multilayer_intervention_matches_naive_gpt2():
    m = _gpt2(60, layers=4).eval()
    ids, am = _batch(60)
    plan = sample_plan(am, prop=0.5, rng=np.random.default_rng(1))
    idx = Variable.parse("$L:[1:3]").resolve(4, 2, 32, "teacher")
    out = forward_with_intervention(m, ids, am, plan, idx)
    src = capture_block_outputs(m, ids, am, (1, 2))
    hooks = [get_layers(m)[j].register_forward_hook(lambda mod, a, o, j=j: write_source(o, src[j], plan, idx[j]))
             for j in (1, 2)]
    naive = m(input_ids=ids, attention_mask=am, use_cache=False).logits
    for h in hooks:
        h.remove()
    mk = am.bool()
    assert torch.allclose(out.cf_logits[mk], naive[mk], atol=1e-5)


# ----------------------------------------------------------------------------- losses
@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_identical_student_and_teacher_give_zero_distillation_losses(kind):
    m = (_bert(60, layers=4) if kind == "bert" else _gpt2(60, layers=4)).eval()
    ids, am = _batch(60)
    plan = sample_plan(am, prop=0.3, rng=np.random.default_rng(0))
    mp = NeuronMapping.builtin("single_middle", 4, 4).resolve(m, m).resolved[0]
    t_out = forward_with_intervention(m, ids, am, plan, mp.teacher)
    s_out = forward_with_intervention(m, ids, am, plan, mp.student)
    labels = ids.masked_fill(am == 0, -100)
    w = LossWeights(ce=1, mse=1, cos=1, causal_ce=1, causal_cos=1, **({"mlm": 1} if kind == "bert" else {"clm": 1}))
    total, terms = distillation_losses(s_out, t_out, attention_mask=am, labels=labels, weights=w)
    for name in ("ce", "mse", "cos", "causal_ce", "causal_cos"):
        assert abs(float(terms[name])) < 1e-5, (name, terms[name])
    assert float(terms["mlm" if kind == "bert" else "clm"]) > 1.0  # the task loss is not a distillation loss
    # a different student gives positive losses, and the intervention changes the causal targets
    other = (_bert(60, layers=4, seed=1) if kind == "bert" else _gpt2(60, layers=4, seed=1)).eval()
    o_out = forward_with_intervention(other, ids, am, plan, mp.student)
    _, terms2 = distillation_losses(o_out, t_out, attention_mask=am, labels=labels, weights=w)
    assert all(float(terms2[n]) > 1e-3 for n in ("ce", "cos", "causal_ce", "causal_cos"))


def test_restrict_ce_to_mask_uses_only_masked_tokens():
    t, s = _bert(60, seed=0).eval(), _bert(60, seed=1).eval()
    ids, am = _batch(60)
    to, so = forward_with_intervention(t, ids, am), forward_with_intervention(s, ids, am)
    labels = torch.full_like(ids, -100)
    labels[0, 3] = ids[0, 3]
    _, all_tok = distillation_losses(so, to, attention_mask=am, labels=labels, weights=LossWeights(ce=1))
    _, masked = distillation_losses(so, to, attention_mask=am, labels=labels, weights=LossWeights(ce=1),
                                    restrict_ce_to_mask=True)
    from mergekit_lab.distill.losses import kl_ce

    one = torch.zeros_like(am)
    one[0, 3] = 1
    assert torch.isclose(masked["ce"], kl_ce(so.logits, to.logits, one, 2.0))
    assert not torch.isclose(masked["ce"], all_tok["ce"])


def test_collate_pads_and_masks():
    b = collate([np.array([5, 6, 7]), np.array([8])], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


@pytest.mark.parametrize("arch", ["same", "distilbert"])
def test_head_at_masked_positions_only_matches_full_logits(arch):
    t = _bert(60, layers=4).eval()
    s = extract_student(t, layers=[0, 3], arch=arch)[0].eval()
    ids, am = _batch(60)
    labels = torch.full_like(ids, -100)
    labels[0, 2], labels[1, 5], labels[3, 1] = ids[0, 2], ids[1, 5], ids[3, 1]
    sel = labels != -100
    plan = sample_plan(am, prop=0.3, rng=np.random.default_rng(0))
    mp = NeuronMapping.builtin("single_middle", 4, 2).resolve(t, s).resolved[0]
    w = LossWeights(ce=1, mlm=1, mse=1, causal_ce=1)
    outs = {}
    for name, lm in (("dense", None), ("sparse", sel)):
        to = forward_with_intervention(t, ids, am, plan, mp.teacher, logit_mask=lm)
        so = forward_with_intervention(s, ids, am, plan, mp.student, logit_mask=lm)
        outs[name] = (to, so, distillation_losses(so, to, attention_mask=am, labels=labels, weights=w,
                                                 restrict_ce_to_mask=True)[1])
    (td, sd, ld), (ts, ss, ls) = outs["dense"], outs["sparse"]
    assert ts.logits.shape == (3, 60) and ss.cf_logits.shape == (3, 60)
    assert torch.allclose(ts.logits, td.logits[sel], atol=1e-5)
    assert torch.allclose(ss.cf_logits, sd.cf_logits[sel], atol=1e-5)
    for k in ld:
        assert torch.isclose(ld[k], ls[k], atol=1e-5), k


def test_plan_masked_positions_only():
    _, am = _batch(60, B=4, L=20)
    labels = torch.full_like(am, -100)
    labels[:, 1:6] = 7
    labels[2, 1:6] = -100
    labels[2, 3] = 7
    plan = sample_plan(am, prop=1.0, mode="masked", mlm_labels=labels, rng=np.random.default_rng(0))
    assert not (plan.base_mask & (labels == -100)).any()
    assert not (plan.source_mask & (labels[plan.perm] == -100)).any()
    assert torch.equal(plan.base_mask.sum(1), plan.source_mask.sum(1))
    with pytest.raises(UserError, match="need MLM labels"):
        sample_plan(am, mode="masked")
