"""`mklab binarize / count-tokens / extract-student / distill` end to end on tiny models."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from mergekit_lab.cli.app import app
from tests.factories import WORDS, make_tokenizer

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread avoids oversubscription on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)



def _cli(*args: str, ok: bool = True):
    res = runner.invoke(app, [str(a) for a in args])
    if ok:
        assert res.exit_code == 0, (res.output, res.exception)
    return res


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

    d = tmp_path_factory.mktemp("distill")
    tok = make_tokenizer(d / "teacher")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                     intermediate_size=48, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    BertForMaskedLM(cfg).save_pretrained(d / "teacher")
    g = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=4, n_head=2, n_positions=64,
                                   bos_token_id=2, eos_token_id=3, pad_token_id=0))
    g.save_pretrained(d / "gpt2")
    tok.save_pretrained(d / "gpt2")
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 40))) for _ in range(200)]
    (d / "corpus.txt").write_text("\n".join(docs) + "\n")
    _cli("binarize", "--files", d / "corpus.txt", "--tokenizer", d / "teacher", "--output", d / "bin", "--quiet")
    _cli("count-tokens", "--data", d / "bin", "--output", d / "counts", "--quiet")
    _cli("extract-student", "--teacher", d / "teacher", "--num-layers", "2", "--output", d / "student", "--quiet")
    _cli("extract-student", "--teacher", d / "gpt2", "--layers", "0", "3", "--output", d / "gpt2-student", "--quiet")
    return d


def _distill_args(d: Path, out: Path, *extra) -> list:
    return ["distill", "--teacher", d / "teacher", "--student", d / "student", "--data", d / "bin",
            "--token-counts", d / "counts", "--alpha-ce", "0.25", "--alpha-mlm", "0.25", "--alpha-cos", "0.25",
            "--alpha-causal-ce", "0.25", "--alpha-causal-cos", "0.1", "--interchange-prop", "0.3",
            "--max-seq-length", "32", "--per-device-train-batch-size", "4", "--gradient-accumulation-steps", "2",
            "--logging-steps", "1", "--output-dir", out, "--quiet", *extra]


def test_data_commands_write_results(setup):
    d = setup
    for sub in ("bin", "counts", "student"):
        res = json.loads((d / sub / "results.json").read_text())
        assert res["schema_version"] == 1 and res["metrics"]
    info = json.loads((d / "student" / "mklab_student.json").read_text())
    assert info["teacher_layers"] == [0, 3]
    from transformers import AutoModelForMaskedLM

    s = AutoModelForMaskedLM.from_pretrained(d / "student")
    assert s.config.num_hidden_layers == 2


def test_distill_diito_run_logs_every_term(setup, tmp_path):
    d = setup
    _cli(*_distill_args(d, tmp_path / "run", "--max-steps", "4", "--eval-data", d / "bin",
                        "--max-eval-sequences", "40"))
    out = tmp_path / "run"
    res = json.loads((out / "results.json").read_text())
    assert res["command"] == "distill" and res["distill"]["global_step"] == 4
    assert res["metrics"]["eval"]["perplexity"] > 1
    lines = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    for key in ("ce", "mlm", "cos", "causal_ce", "causal_cos", "loss", "lr", "tokens_per_second"):
        assert key in lines[-1]
    assert not (out / "checkpoints").exists()
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    s = AutoModelForMaskedLM.from_pretrained(out)  # a HF folder ready for mklab train/eval
    AutoTokenizer.from_pretrained(out)
    before = load_file(d / "student" / "model.safetensors")
    after = load_file(out / "model.safetensors")
    key = "bert.encoder.layer.1.output.dense.weight"
    assert not torch.equal(before[key], after[key])
    assert len(s.bert.encoder.layer) == 2


def test_resume_after_interruption_matches_uninterrupted(setup, tmp_path):
    d = setup
    common = ["--max-steps", "5", "--save-steps", "2", "--alpha-mse", "0.1"]
    _cli(*_distill_args(d, tmp_path / "full", *common))
    res = _cli(*_distill_args(d, tmp_path / "cut", *common, "--stop-after-steps", "3"), ok=False)
    assert res.exit_code != 0
    assert not (tmp_path / "cut").exists()
    assert (tmp_path / ".cut.incomplete" / "checkpoints" / "step-3" / "state.json").is_file()
    _cli(*_distill_args(d, tmp_path / "cut", *common, "--resume"))
    res = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert res["distill"]["resumed_from"] == 3 and res["distill"]["global_step"] == 5
    a = load_file(tmp_path / "full" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "model.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    log = [json.loads(x)["step"] for x in (tmp_path / "cut" / "train_log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4, 5]


def test_freeze_pos_embs_really_frozen(setup, tmp_path):
    d = setup
    _cli(*_distill_args(d, tmp_path / "frz", "--max-steps", "3", "--freeze-pos-embs", "--weight-decay", "0.1",
                        "--restrict-ce-to-mask"))
    before = load_file(d / "student" / "model.safetensors")
    after = load_file(tmp_path / "frz" / "model.safetensors")
    key = "bert.embeddings.position_embeddings.weight"
    assert torch.equal(before[key], after[key])
    assert not torch.equal(before["bert.embeddings.word_embeddings.weight"], after["bert.embeddings.word_embeddings.weight"])


def test_bad_mapping_is_a_clear_error_before_training(setup, tmp_path):
    d = setup
    nm = tmp_path / "bad.nm"
    nm.write_text(json.dumps({"interchange_variable_mappings": [
        {"teacher_variable_names": ["$L:2$H:[0:2]$[0:16]"], "student_variable_names": ["$L:3$H:[0:2]$[0:16]"]}]}))
    res = _cli(*_distill_args(d, tmp_path / "bad", "--max-steps", "2", "--neuron-mapping", nm), ok=False)
    assert res.exit_code == 2
    assert "layer range [3:4) is outside the student's 2 layers" in res.output.replace("\n", " ")
    assert not (tmp_path / "bad" / "train_log.jsonl").exists()


def test_gpt2_distillation_with_clm_and_causal_losses(setup, tmp_path):
    d = setup
    _cli("distill", "--teacher", d / "gpt2", "--student", d / "gpt2-student", "--data", d / "bin",
         "--alpha-ce", "0.5", "--alpha-clm", "0.5", "--alpha-causal-ce", "0.5", "--neuron-mapping", "multilayer",
         "--no-interchange-consecutive-only", "--max-seq-length", "32", "--per-device-train-batch-size", "4",
         "--gradient-accumulation-steps", "1", "--max-steps", "2", "--logging-steps", "1",
         "--output-dir", tmp_path / "g", "--quiet", "--eval-data", d / "bin", "--max-eval-sequences", "20")
    lines = [json.loads(x) for x in (tmp_path / "g" / "train_log.jsonl").read_text().splitlines()]
    assert {"ce", "clm", "causal_ce"} <= set(lines[-1])
    from transformers import AutoModelForCausalLM

    assert len(AutoModelForCausalLM.from_pretrained(tmp_path / "g").transformer.h) == 2


@pytest.mark.slow
def test_two_process_torchrun_distillation(setup, tmp_path):
    d = setup
    args = [str(a) for a in _distill_args(d, tmp_path / "ddp", "--max-steps", "3", "--cpu-only")]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "mergekit_lab", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert res["distill"]["num_processes"] == 2 and res["distill"]["global_step"] == 3
    lines = (tmp_path / "ddp" / "train_log.jsonl").read_text().splitlines()
    assert len(lines) == 3  # written once (rank 0), not once per process
    # tokens seen count both processes' batches
    assert json.loads(lines[-1])["tokens_seen"] == res["distill"]["tokens_seen"]


def test_fit_mlm_head_trains_only_the_head(setup, tmp_path):
    d = setup
    _cli("fit-mlm-head", "--model", d / "teacher", "--data", d / "bin", "--output", tmp_path / "h",
         "--max-steps", "30", "--batch-size", "8", "--max-seq-length", "32", "--learning-rate", "3e-3", "--quiet")
    before = load_file(d / "teacher" / "model.safetensors")
    after = load_file(tmp_path / "h" / "model.safetensors")
    assert torch.equal(before["bert.encoder.layer.3.output.dense.weight"], after["bert.encoder.layer.3.output.dense.weight"])
    assert torch.equal(before["bert.embeddings.word_embeddings.weight"], after["bert.embeddings.word_embeddings.weight"])
    assert not torch.equal(before["cls.predictions.transform.dense.weight"], after["cls.predictions.transform.dense.weight"])
    stats = json.loads((tmp_path / "h" / "results.json").read_text())["metrics"]
    assert stats["final_mlm_loss"] < stats["first_mlm_loss"]
