"""Benchmark: peak memory and wall time of merging two ~1B-parameter Llama checkpoints.

Generates a synthetic Llama-shaped "pretrained" checkpoint and two "fine-tuned" variants
(bf16, sharded safetensors, TinyLlama-1.1B shapes) under a temporary folder, then merges them
with a linear average and with TIES (density 0.2, the base as reference) in four ways, each in
a fresh child process whose peak RSS (ru_maxrss) and wall time are recorded:

- ``mklab``: :func:`mergekit_lab.merging.merge_models` (streaming, one tensor per input),
- ``naive``: load every checkpoint fully into memory, merge, save (the same per-tensor math),
- ``mergekit``: ``mergekit-yaml`` from a separate venv (default /work/venv-mergekit), when there.

Prints one JSON object. Generated files are deleted at the end (``--keep`` keeps them).

    python benchmarks/merge_memory.py                 # ~1.1B params, needs ~15 GB of /tmp
    python benchmarks/merge_memory.py --size small    # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import zlib
from pathlib import Path

import torch

from mergekit_lab.merging.io import ShardedSafetensorsWriter, TensorInfo

SIZES = {
    # TinyLlama-1.1B shapes
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    "small": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=4000),
}


def llama_plan(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    plan = [("model.embed_tokens.weight", (v, h))]
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        plan += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]
    plan += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return plan


def make_checkpoint(out: Path, c: dict, variant: int | None) -> int:
    """Write the base (variant None) or a fine-tuned variant, streaming; returns bytes."""
    plan = llama_plan(c)
    infos = [(n, TensorInfo(s, torch.bfloat16)) for n, s in plan]
    w = ShardedSafetensorsWriter(out, infos, max_shard_size="1GB")
    for name, shape in plan:
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        t = (torch.ones(shape) if name.endswith("norm.weight") else torch.zeros(shape)) + 0.02 * torch.randn(shape, generator=g)
        if variant is not None:
            g2 = torch.Generator().manual_seed(zlib.crc32(name.encode()) + 1000 * (variant + 1))
            t += 0.002 * torch.randn(shape, generator=g2)
        w.write(name, t.to(torch.bfloat16))
        del t
    w.close()
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16", "dtype": "bfloat16",
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", **c,
    }
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return w.total_size


MKLAB_CHILD = textwrap.dedent("""
    import sys, json
    from mergekit_lab.merging import merge_models
    method, out, base, a, b = sys.argv[1:6]
    params = {"density": 0.2} if method == "ties" else {}
    m = "average" if method == "linear" else method
    r = merge_models([a, b], m, params, base_model=base if method == "ties" else None, output_dir=out, progress=False)
""")

NAIVE_CHILD = textwrap.dedent("""
    import sys, torch
    from safetensors.torch import load_file
    from mergekit_lab.merging import merge_models, save_state_dict_sharded
    from mergekit_lab.merging.io import weight_files
    method, out, base, a, b = sys.argv[1:6]
    def load(d):
        sd = {}
        for f in weight_files(d)[1]:
            sd.update(load_file(str(f)))
        return sd
    sds = [load(a), load(b)]
    bsd = load(base) if method == "ties" else None
    m = "average" if method == "linear" else method
    params = {"density": 0.2} if method == "ties" else {}
    merged = merge_models(sds, m, params, base_model=bsd, output_dir=None, progress=False).state_dicts["merged"]
    save_state_dict_sharded(merged, out)
""")


def measure(cmd: list[str]) -> dict:
    """Run cmd in a wrapper process; report its wall time and the peak RSS of the command."""
    wrapper = (
        "import json, resource, subprocess, sys, time\n"
        "t = time.perf_counter(); r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)\n"
        "w = time.perf_counter() - t\n"
        "print(json.dumps({'rc': r.returncode, 'wall_s': round(w, 2),"
        " 'peak_rss_mb': round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),"
        " 'stderr_tail': r.stderr.decode(errors='replace')[-400:] if r.returncode else ''}))\n"
    )
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def mergekit_config(method: str, base: Path, a: Path, b: Path) -> str:
    if method == "linear":
        return textwrap.dedent(f"""
            merge_method: linear
            models:
              - model: {a}
                parameters: {{weight: 1.0}}
              - model: {b}
                parameters: {{weight: 1.0}}
            dtype: bfloat16
        """)
    return textwrap.dedent(f"""
        merge_method: ties
        base_model: {base}
        models:
          - model: {a}
            parameters: {{density: 0.2, weight: 1.0}}
          - model: {b}
            parameters: {{density: 0.2, weight: 1.0}}
        parameters: {{normalize: true}}
        dtype: bfloat16
    """)


def max_abs_diff(d1: Path, d2: Path, names: list[str]) -> float:
    from mergekit_lab.merging import open_checkpoint

    s1, s2 = open_checkpoint(d1), open_checkpoint(d2)
    return max(float((s1.get(n).float() - s2.get(n).float()).abs().max()) for n in names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="1b")
    ap.add_argument("--workdir", default=None, help="where checkpoints are generated (default: a new /tmp folder)")
    ap.add_argument("--mergekit-venv", default="/work/venv-mergekit")
    ap.add_argument("--skip", nargs="*", default=[], help="any of: mklab naive mergekit linear ties")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each tool this many times, interleaved (mklab, naive, mergekit, mklab, ...) so "
                         "that load from other processes hits them alike; the median wall time is reported")
    args = ap.parse_args()

    root = Path(args.workdir or tempfile.mkdtemp(prefix="mklab-merge-bench-", dir="/tmp"))
    root.mkdir(parents=True, exist_ok=True)
    c = SIZES[args.size]
    result: dict = {"size": args.size, "config": c}
    try:
        base, a, b = root / "base", root / "ft0", root / "ft1"
        nbytes = 0
        for d, v in ((base, None), (a, 0), (b, 1)):
            if (d / "config.json").exists():  # generated by an earlier (interrupted) run in --workdir
                nbytes = sum(f.stat().st_size for f in d.glob("*.safetensors"))
            else:
                nbytes = make_checkpoint(d, c, v)
        n_params = sum(torch.Size(s).numel() for _, s in llama_plan(c))
        result.update(n_params=n_params, model_size_mb=round(nbytes / 2**20, 1))
        mk_bin = Path(args.mergekit_venv) / "bin" / "mergekit-yaml"
        runs: dict = {}
        for method in ("linear", "ties"):
            if method in args.skip:
                continue
            for rep, tool in [(r, t) for r in range(args.repeat) for t in ("mklab", "naive", "mergekit")]:
                if tool in args.skip:
                    continue
                out = root / f"out-{tool}-{method}"
                if tool == "mklab":
                    cmd = [sys.executable, "-c", MKLAB_CHILD, method, str(out), str(base), str(a), str(b)]
                elif tool == "naive":
                    cmd = [sys.executable, "-c", NAIVE_CHILD, method, str(out), str(base), str(a), str(b)]
                else:
                    if not mk_bin.exists():
                        runs[f"{tool}-{method}"] = {"skipped": f"{mk_bin} not found (pip install mergekit into a separate venv)"}
                        continue
                    cfg = root / f"mergekit-{method}.yml"
                    cfg.write_text(mergekit_config(method, base, a, b))
                    cmd = [str(mk_bin), str(cfg), str(out), "--quiet"]
                if rep:
                    shutil.rmtree(out, ignore_errors=True)
                r = measure(cmd)
                print(json.dumps({f"{tool}-{method}": r}), file=sys.stderr, flush=True)
                prev = runs.get(f"{tool}-{method}")
                if prev is None:
                    runs[f"{tool}-{method}"] = {**r, "wall_s_runs": [r["wall_s"]]}
                else:
                    walls = prev["wall_s_runs"] + [r["wall_s"]]
                    runs[f"{tool}-{method}"] = {**r, "wall_s_runs": walls, "wall_s": statistics.median(walls),
                                                "peak_rss_mb": max(prev["peak_rss_mb"], r["peak_rss_mb"])}
            # agreement on a few tensors
            names = ["model.layers.0.self_attn.q_proj.weight", "model.norm.weight", "lm_head.weight"]
            ref = root / f"out-mklab-{method}"
            for tool in ("naive", "mergekit"):
                o = root / f"out-{tool}-{method}"
                if ref.exists() and o.exists() and runs.get(f"{tool}-{method}", {}).get("rc") == 0:
                    runs[f"{tool}-{method}"]["max_abs_diff_vs_mklab"] = max_abs_diff(ref, o, names)
            for tool in ("mklab", "naive", "mergekit"):
                shutil.rmtree(root / f"out-{tool}-{method}", ignore_errors=True)
        result["runs"] = runs
        result["cpu_count"] = os.cpu_count()
        result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
