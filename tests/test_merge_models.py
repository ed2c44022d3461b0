"""End-to-end merges of tiny transformers models (built from configs), streaming and bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
    T5Config,
    T5ForSequenceClassification,
)

from mergekit_lab.errors import UserError
from mergekit_lab.merging import (
    StatisticsFile,
    compute_fisher,
    compute_grams,
    list_methods,
    merge_models,
    open_checkpoint,
    save_statistics,
    statistics_path,
)
from mergekit_lab.merging.statistics import META_KEY

VOCAB = 99


def tiny(arch: str, num_labels: int = 2, vocab: int = VOCAB):
    if arch == "bert":
        c = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, max_position_embeddings=64, num_labels=num_labels)
        return BertForSequenceClassification(c)
    if arch == "roberta":
        c = RobertaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64, max_position_embeddings=70, num_labels=num_labels, pad_token_id=1)
        return RobertaForSequenceClassification(c)
    if arch == "distilbert":
        c = DistilBertConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                             max_position_embeddings=64, num_labels=num_labels)
        return DistilBertForSequenceClassification(c)
    if arch == "gpt2":
        c = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64, num_labels=num_labels,
                       pad_token_id=0)
        return GPT2ForSequenceClassification(c)
    if arch == "t5":
        c = T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, num_labels=num_labels,
                     decoder_start_token_id=0, pad_token_id=0, eos_token_id=2)
        return T5ForSequenceClassification(c)
    if arch == "llama":
        c = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        num_labels=num_labels, pad_token_id=0)
        return LlamaForSequenceClassification(c)
    raise ValueError(arch)


def batches(n_batches: int = 3, bs: int = 4, seq: int = 10, seed: int = 0, num_labels: int = 2):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(3, VOCAB, (bs, seq), generator=g)
        lens = torch.randint(3, seq + 1, (bs,), generator=g)
        lens[0] = seq
        mask = (torch.arange(seq)[None, :] < lens[:, None]).long()
        ids = ids * mask  # pad id 0 on the right
        ids[torch.arange(bs), lens - 1] = 2  # an end-of-sequence token (T5 needs one)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, num_labels, (bs,), generator=g)})
    return out


def finetuned_variants(arch: str, root: Path, k: int = 2, num_labels: int = 2, save_base: bool = True) -> tuple[list[Path], Path]:
    """Save a 'pretrained' init and k perturbed copies (stand-ins for fine-tuned models)."""
    torch.manual_seed(0)
    model = tiny(arch, num_labels)
    base = root / f"{arch}-base"
    if save_base:
        model.save_pretrained(base)
    paths = []
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    for i in range(k):
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(init[n] + 0.02 * torch.randn(p.shape, generator=g))
        d = root / f"{arch}-ft{i}"
        model.save_pretrained(d)
        paths.append(d)
    return paths, base


def add_stats(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    grams, fishers = [], []
    for i, p in enumerate(paths):
        m = AutoModelForSequenceClassification.from_pretrained(p)
        g, info = compute_grams(m, batches(seed=i), progress=False)
        grams.append(save_statistics(statistics_path(p, "grams"), g, {"kind": "grams", **info}))
        f, finfo = compute_fisher(m, batches(seed=i), variant="hard", progress=False)
        fishers.append(save_statistics(statistics_path(p, "fisher", "hard"), f, {"kind": "fisher", "variant": "hard", **finfo}))
    return grams, fishers


ARCHS = ["bert", "roberta", "distilbert", "gpt2", "t5", "llama"]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_method_end_to_end(arch, tmp_path):
    paths, base = finetuned_variants(arch, tmp_path)
    grams, fishers = add_stats(paths)
    if arch == "gpt2":  # Conv1D layers are recorded with their layout
        meta = StatisticsFile(grams[0]).metadata
        assert meta["layouts"]["transformer.h.0.attn.c_attn"] == "conv1d"
        assert meta["layouts"]["score"] == "linear"
    sample = batches(1, seed=9)[0]
    sample.pop("labels")
    for method in list_methods():
        stats = grams if method == "regmean" else fishers if method == "fisher" else None
        out = tmp_path / f"out-{method}"
        r = merge_models(paths, method, output_dir=out, base_model=base, statistics=stats, progress=False)
        if method == "regmean":
            assert r.report["notes"]["counts"]["regmean"] > 0
        m = AutoModelForSequenceClassification.from_pretrained(r.outputs["merged"])
        for n, p in m.named_parameters():
            assert torch.isfinite(p).all(), (method, n)
        with torch.no_grad():
            logits = m(**sample).logits
        assert torch.isfinite(logits).all(), method
        assert (out / "mklab_merge.json").exists() and (out / "config.json").exists()


def test_regmean_merge_of_real_layers_matches_manual_solve(tmp_path):
    paths, _ = finetuned_variants("bert", tmp_path, save_base=False)
    grams, _ = add_stats(paths)
    r = merge_models(paths, "regmean", statistics=grams, output_dir=None, progress=False)
    name = "bert.encoder.layer.1.intermediate.dense"
    ws = [load_file(str(p / "model.safetensors"))[name + ".weight"].double() for p in paths]
    gs = [load_file(str(g))[name] for g in grams]
    expect = torch.linalg.solve(gs[0] + gs[1], gs[0] @ ws[0].T + gs[1] @ ws[1].T).T
    assert torch.allclose(r.state_dicts["merged"][name + ".weight"].double(), expect, atol=1e-5)
    bias = name + ".bias"
    b = [load_file(str(p / "model.safetensors"))[bias] for p in paths]
    assert torch.allclose(r.state_dicts["merged"][bias], (b[0] + b[1]) / 2)


def test_streaming_equals_in_memory_bit_for_bit(tmp_path):
    paths, base = finetuned_variants("bert", tmp_path, k=3)
    grams, fishers = add_stats(paths)
    sds = [load_file(str(p / "model.safetensors")) for p in paths]
    for method, stats in (("regmean", grams), ("fisher", fishers), ("ties", None), ("dare", None)):
        mem = merge_models(sds, method, statistics=stats, base_model=load_file(str(base / "model.safetensors")),
                           output_dir=None, progress=False).state_dicts["merged"]
        out = tmp_path / f"stream-{method}"
        merge_models(paths, method, statistics=stats, base_model=base, output_dir=out, max_shard_size="20KB", progress=False)
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 2
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in mem.values())
        disk = open_checkpoint(out)
        assert sorted(disk.keys()) == sorted(mem)
        for n, t in mem.items():
            assert torch.equal(disk.get(n), t), (method, n)


def test_bf16_and_bin_inputs(tmp_path):
    paths, _ = finetuned_variants("llama", tmp_path, save_base=False)
    sd = load_file(str(paths[1] / "model.safetensors"))
    bin_dir = tmp_path / "bin-model"
    bin_dir.mkdir()
    torch.save(sd, bin_dir / "pytorch_model.bin")
    (bin_dir / "config.json").write_text((paths[1] / "config.json").read_text())
    a = merge_models([paths[0], paths[1]], "average", output_dir=None, progress=False).state_dicts["merged"]
    b = merge_models([paths[0], bin_dir], "average", output_dir=None, progress=False).state_dicts["merged"]
    assert all(torch.equal(a[n], b[n]) for n in a)
    r = merge_models(paths, "average", output_dir=tmp_path / "bf16", out_dtype=torch.bfloat16, progress=False)
    m = AutoModelForSequenceClassification.from_pretrained(r.outputs["merged"], dtype=torch.bfloat16)
    assert next(m.parameters()).dtype == torch.bfloat16


def test_heads_keep_writes_one_model_per_task(tmp_path):
    torch.manual_seed(0)
    a, b = tiny("bert", 2), tiny("bert", 3)
    b.bert.load_state_dict(a.bert.state_dict())
    with torch.no_grad():
        for p in b.bert.parameters():
            p.add_(0.01)
    a.save_pretrained(tmp_path / "sst2")
    b.save_pretrained(tmp_path / "mnli")
    with pytest.raises(UserError, match="--heads keep"):
        merge_models([tmp_path / "sst2", tmp_path / "mnli"], "average", output_dir=tmp_path / "x")
    r = merge_models([tmp_path / "sst2", tmp_path / "mnli"], "average", heads="keep", output_dir=tmp_path / "kept",
                     progress=False)
    assert set(r.outputs) == {"sst2", "mnli"}
    ma = AutoModelForSequenceClassification.from_pretrained(r.outputs["sst2"])
    mb = AutoModelForSequenceClassification.from_pretrained(r.outputs["mnli"])
    assert ma.config.num_labels == 2 and mb.config.num_labels == 3
    assert torch.equal(mb.classifier.weight, b.classifier.weight)
    assert torch.equal(ma.classifier.weight, a.classifier.weight)
    w = "encoder.layer.0.output.dense.weight"
    expect = (a.bert.state_dict()[w] + b.bert.state_dict()[w]) / 2
    assert torch.allclose(ma.bert.state_dict()[w], expect) and torch.equal(ma.bert.state_dict()[w], mb.bert.state_dict()[w])


def test_multilabel_head_rows_averaged_over_annotating_models(tmp_path):
    paths, _ = finetuned_variants("bert", tmp_path, k=2, num_labels=4, save_base=False)
    grams, _ = add_stats(paths)
    masks = [[True, True, False, False], [True, False, True, False]]
    sds = [load_file(str(p / "model.safetensors")) for p in paths]
    W, B = "classifier.weight", "classifier.bias"
    for method, stats in (("average", None), ("regmean", grams)):
        r = merge_models(paths, method, statistics=stats, label_masks=masks, output_dir=None, progress=False)
        out = r.state_dicts["merged"]
        assert torch.allclose(out[W][1], sds[0][W][1], atol=1e-6)  # only model 0 annotates label 1
        assert torch.allclose(out[W][2], sds[1][W][2], atol=1e-6)
        assert torch.allclose(out[B][1], sds[0][B][1]) and torch.allclose(out[B][2], sds[1][B][2])
        assert torch.allclose(out[B][0], (sds[0][B][0] + sds[1][B][0]) / 2)
        assert torch.allclose(out[B][3], (sds[0][B][3] + sds[1][B][3]) / 2)  # annotated by none: all
    avg = merge_models(paths, "average", label_masks=masks, output_dir=None, progress=False).state_dicts["merged"]
    assert torch.allclose(avg[W][0], (sds[0][W][0] + sds[1][W][0]) / 2)


def test_bad_inputs(tmp_path):
    paths, base = finetuned_variants("bert", tmp_path)
    g2, _ = finetuned_variants("gpt2", tmp_path, k=1, save_base=False)
    with pytest.raises(UserError, match="different architectures"):
        merge_models([paths[0], g2[0]], "average", output_dir=tmp_path / "o1")
    torch.manual_seed(0)
    tiny("bert", vocab=120).save_pretrained(tmp_path / "bigvocab")
    with pytest.raises(UserError, match="vocabulary sizes"):
        merge_models([paths[0], tmp_path / "bigvocab"], "average", output_dir=tmp_path / "o2")
    with pytest.raises(UserError, match="at least 2 models"):
        merge_models([paths[0]], "average", output_dir=tmp_path / "o3")
    with pytest.raises(UserError, match="base model"):
        merge_models(paths, "task_arithmetic", output_dir=tmp_path / "o4")
    with pytest.raises(UserError, match="density"):
        merge_models(paths, "ties", {"density": 0}, base_model=base, output_dir=tmp_path / "o5")
    with pytest.raises(UserError, match="needs grams statistics"):
        merge_models(paths, "regmean", output_dir=tmp_path / "o6")
    with pytest.raises(UserError, match="does not exist"):
        merge_models([paths[0], tmp_path / "nope"], "average", output_dir=tmp_path / "o7")
    grams, fishers = add_stats(paths)
    t = load_file(str(grams[1]))
    t["bert.encoder.layer.0.attention.self.query"][0, 0] = float("nan")
    bad = tmp_path / "bad.safetensors"
    save_file(t, str(bad), metadata={META_KEY: json.dumps({"kind": "grams", "version": 1})})
    with pytest.raises(UserError, match="NaN"):
        merge_models(paths, "regmean", statistics=[grams[0], bad], output_dir=tmp_path / "o8")
    with pytest.raises(UserError, match="holds 'fisher' statistics"):
        merge_models(paths, "regmean", statistics=fishers, output_dir=tmp_path / "o9")
    for i in range(1, 10):
        assert not (tmp_path / f"o{i}").exists() or not any((tmp_path / f"o{i}").glob("*.safetensors"))


def test_side_files_copied_but_not_run_records(tmp_path):
    paths, _ = finetuned_variants("bert", tmp_path, save_base=False)
    (paths[0] / "results.json").write_text("{}")
    (paths[0] / "vocab.txt").write_text("[PAD]\n")
    r = merge_models(paths, "average", output_dir=tmp_path / "out", progress=False)
    out = r.outputs["merged"]
    assert (out / "vocab.txt").exists() and (out / "config.json").exists()
    assert not (out / "results.json").exists()  # a merged folder is not the individual model's run
