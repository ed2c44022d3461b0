"""Benchmark: `binarize` throughput (tokens/s, 1 and 2 workers) and the time to open a corpus.

Prints JSON. Tokenizes ``../shared/data/text/train.txt`` (or --files) with builtin:minilm using
1 and 2 worker processes, checks both outputs are identical, then measures opening: the real
binarized corpus, and a synthetic ~1 GB corpus (uint16 tokens) to show that opening costs
milliseconds and no resident memory (the arrays are memory-mapped).

    python benchmarks/distill_binarize.py [--files a.txt ...] [--large-gb 1.0] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "text" / "train.txt"


def rss_mb(kind: str = "RssAnon") -> float:
    """Resident memory of this process: RssAnon (private, what 'reading into RAM' costs) or
    RssFile (clean page-cache pages of mapped files: shared, dropped by the kernel under pressure)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(kind + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", nargs="*", default=[str(SHARED)])
    ap.add_argument("--tokenizer", default="builtin:minilm")
    ap.add_argument("--workers", nargs="*", type=int, default=[1, 2])
    ap.add_argument("--large-gb", type=float, default=1.0)
    args = ap.parse_args()
    for f in args.files:
        if not Path(f).exists():
            raise SystemExit(f"input {f} not found (the shared data folder is absent?)")

    from mergekit_lab.distill.binarize import BinarizedCorpus, TextSource, binarize

    tmp = Path(tempfile.mkdtemp(prefix="mklab-bench-"))
    out: dict = {"benchmark": "distill_binarize", "files": args.files, "tokenizer": args.tokenizer,
                 "input_mb": round(sum(Path(f).stat().st_size for f in args.files) / 2**20, 2), "runs": []}
    try:
        first = None
        for w in args.workers:
            t0 = time.perf_counter()
            h = binarize(TextSource(files=args.files), args.tokenizer, tmp / f"w{w}", num_proc=w)
            dt = time.perf_counter() - t0
            out["runs"].append({"num_proc": w, "seconds": round(dt, 2), "tokens": h["num_tokens"],
                                "sequences": h["num_sequences"], "tokens_per_second": round(h["num_tokens"] / dt)})
            c = BinarizedCorpus(tmp / f"w{w}")
            if first is None:
                first = c
            else:
                out["identical_outputs"] = bool(np.array_equal(first.tokens, c.tokens))
        # open the real corpus
        t0 = time.perf_counter()
        c = BinarizedCorpus(tmp / f"w{args.workers[0]}")
        out["open_real_ms"] = round((time.perf_counter() - t0) * 1e3, 2)
        # synthetic large corpus
        n = int(args.large_gb * 2**30 / 2)
        big = tmp / "big"
        big.mkdir()
        arr = np.lib.format.open_memmap(big / "tokens.npy", mode="w+", dtype=np.uint16, shape=(n,))
        block = 1 << 26
        rng = np.random.default_rng(0)
        chunk = rng.integers(0, 30522, block, dtype=np.uint16)
        for s in range(0, n, block):
            arr[s : s + block] = chunk[: min(block, n - s)]
        arr.flush()
        del arr
        seq_len = 128
        offsets = np.arange(0, n + 1, seq_len, dtype=np.int64)
        offsets[-1] = n
        np.save(big / "offsets.npy", offsets)
        header = dict(json.loads((tmp / f"w{args.workers[0]}" / "header.json").read_text()))
        header.update(num_sequences=int(offsets.size - 1), num_tokens=n, source={"kind": "synthetic"})
        (big / "header.json").write_text(json.dumps(header))
        rss0, file0 = rss_mb(), rss_mb("RssFile")
        t0 = time.perf_counter()
        bc = BinarizedCorpus(big)
        t_open = time.perf_counter() - t0
        rss1, file1 = rss_mb(), rss_mb("RssFile")
        t0 = time.perf_counter()
        idx = rng.integers(0, len(bc), 1000)
        total = sum(int(bc[int(i)].sum()) for i in idx)
        t_read = time.perf_counter() - t0
        out["large"] = {"gigabytes": round((big / "tokens.npy").stat().st_size / 2**30, 3), "tokens": n,
                        "sequences": len(bc), "open_ms": round(t_open * 1e3, 2),
                        "anon_rss_increase_on_open_mb": round(rss1 - rss0, 2),
                        "file_rss_increase_on_open_mb": round(file1 - file0, 2),
                        "random_1000_sequences_ms": round(t_read * 1e3, 2),
                        "anon_rss_increase_after_reads_mb": round(rss_mb() - rss0, 2),
                        "file_rss_increase_after_reads_mb": round(rss_mb("RssFile") - file0, 2),
                        "checksum": total % 1000}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
