"""Tokenize a corpus once into a safe, memory-mappable format, and count tokens.

Layout of a binarized corpus (a folder)::

    tokens.npy    every sequence's token ids, concatenated (uint16 when the vocabulary fits, else int32)
    offsets.npy   int64, num_sequences + 1 entries: sequence i is tokens[offsets[i]:offsets[i+1]]
    header.json   {"format": "mklab-binarized", "version": 1, tokenizer, vocab_size, dtype, counts, ...}

Both arrays are plain ``.npy`` files opened with ``np.load(mmap_mode="r")``: opening a 1 GB
corpus reads two headers, not the data, and nothing is ever pickled (the original DIITO code
pickled a list of numpy arrays). Token counts (for MLM masking) are a folder with
``counts.npy`` (int64, one entry per vocabulary id) and ``header.json``.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mergekit_lab.distill.io import atomic_output_dir, read_json, resolve_ref, write_json_atomic
from mergekit_lab.errors import UserError

logger = logging.getLogger(__name__)

FORMAT = "mklab-binarized"
COUNTS_FORMAT = "mklab-token-counts"
VERSION = 1
WRAPS = ("auto", "cls-sep", "bos-eos", "none")

ProgressFn = Callable[[int, int], None]  # (documents done, tokens done) increments


# --------------------------------------------------------------------------- sources
@dataclass
class TextSource:
    """Where documents come from. Exactly one of ``files``, ``disk`` or ``dataset`` is set."""

    files: Sequence[str | Path] = ()
    disk: str | Path | None = None
    dataset: str | None = None
    dataset_config: str | None = None
    split: str = "train"
    text_field: str = "text"
    max_documents: int | None = None

    def describe(self) -> dict:
        if self.files:
            return {"kind": "files", "files": [str(f) for f in self.files]}
        if self.disk:
            return {"kind": "disk", "path": str(self.disk), "split": self.split, "text_field": self.text_field}
        return {
            "kind": "hub",
            "dataset": self.dataset,
            "config": self.dataset_config,
            "split": self.split,
            "text_field": self.text_field,
        }

    def validate(self) -> None:
        given = sum(bool(x) for x in (list(self.files), self.disk, self.dataset))
        if given != 1:
            raise UserError(
                "give exactly one text source",
                hint="--files PATH..., --from-disk FOLDER (datasets.save_to_disk) or --dataset NAME",
            )
        for f in self.files:
            if not Path(f).exists():
                raise UserError(f"input path {f} does not exist")

    def documents(self) -> Iterator[str]:
        """Yield non-empty documents (stripped), at most ``max_documents``."""
        self.validate()
        it = self._files() if self.files else self._dataset()
        for n, doc in enumerate(it):
            if self.max_documents is not None and n >= self.max_documents:
                return
            yield doc

    def _files(self) -> Iterator[str]:
        for path in _expand_files(self.files):
            with open(path, encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    line = line.strip()
                    if line:
                        yield line

    def _dataset(self) -> Iterator[str]:
        import datasets

        if self.disk:
            path = Path(self.disk)
            if not path.exists():
                raise UserError(f"dataset folder {path} does not exist")
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if self.split not in ds:
                    raise UserError(f"split {self.split!r} not in {path}", hint=f"splits: {sorted(ds)}")
                ds = ds[self.split]
        else:  # a Hub dataset: needs a network (or the HF cache)
            try:
                ds = datasets.load_dataset(self.dataset, self.dataset_config, split=self.split)
            except Exception as exc:  # noqa: BLE001 - many failure types (network, missing config)
                raise UserError(
                    f"cannot load dataset {self.dataset!r} (config {self.dataset_config!r}, split {self.split!r}): {exc}"
                ) from exc
        fields = [f.strip() for f in self.text_field.split("+") if f.strip()]
        missing = [f for f in fields if f not in ds.column_names]
        if missing:
            raise UserError(f"text field(s) {missing} not in the dataset", hint=f"columns: {ds.column_names}")
        for row in ds.select_columns(fields):
            text = " ".join(str(row[f]) for f in fields if row[f] is not None).strip()
            if text:
                yield text


def _expand_files(paths: Iterable[str | Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith("."))
            if not found:
                raise UserError(f"folder {p} holds no files")
            out.extend(found)
        else:
            out.append(p)
    return out


# --------------------------------------------------------------------------- tokenizing
def wrap_ids(tokenizer, wrap: str = "auto") -> tuple[list[int], list[int], str]:
    """Prefix/suffix ids around each sequence: [CLS] ... [SEP] for encoders, BOS ... EOS for LMs."""
    if wrap not in WRAPS:
        raise UserError(f"unknown wrap {wrap!r}", hint=f"choose one of {WRAPS}")
    if wrap == "auto":
        if tokenizer.cls_token_id is not None and tokenizer.sep_token_id is not None:
            wrap = "cls-sep"
        elif tokenizer.bos_token_id is not None or tokenizer.eos_token_id is not None:
            wrap = "bos-eos"
        else:
            wrap = "none"
    if wrap == "cls-sep":
        if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
            raise UserError("the tokenizer has no [CLS]/[SEP] tokens", hint="use --wrap bos-eos or none")
        return [tokenizer.cls_token_id], [tokenizer.sep_token_id], wrap
    if wrap == "bos-eos":
        pre = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        post = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        if not pre and not post:
            raise UserError("the tokenizer has no BOS/EOS tokens", hint="use --wrap none")
        return pre, post, wrap
    return [], [], "none"


_WORKER: dict = {}


def _init_worker(tokenizer_path: str, pre: list[int], post: list[int], dtype: str) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    tok.model_max_length = 1 << 62  # documents are split later; silence the length warning
    _WORKER.update(tok=tok, pre=pre, post=post, dtype=np.dtype(dtype))


def _encode_chunk(docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    tok, pre, post, dtype = _WORKER["tok"], _WORKER["pre"], _WORKER["post"], _WORKER["dtype"]
    ids = tok(docs, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    seqs = [pre + x + post for x in ids]
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    flat = np.fromiter((t for s in seqs for t in s), dtype=dtype, count=int(lengths.sum()))
    return flat, lengths


def _chunks(it: Iterable[str], size: int) -> Iterator[list[str]]:
    buf: list[str] = []
    for doc in it:
        buf.append(doc)
        if len(buf) >= size:
            yield buf
            buf = []
    if buf:
        yield buf


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


def binarize(
    source: TextSource,
    tokenizer_ref: str,
    output: str | Path,
    *,
    num_proc: int = 1,
    wrap: str = "auto",
    chunk_size: int = 1000,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
) -> dict:
    """Tokenize ``source`` with ``tokenizer_ref`` into the folder ``output``; return its header.

    Documents are tokenized in chunks by ``num_proc`` worker processes (in order, so the
    output is identical for any ``num_proc``) and streamed to disk: memory stays bounded by a
    few chunks whatever the corpus size. The folder appears atomically when complete.
    """
    from transformers import AutoTokenizer

    if num_proc < 1:
        raise UserError("--num-proc must be at least 1")
    source.validate()
    tok_path = resolve_ref(tokenizer_ref)
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_path)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load tokenizer {tokenizer_ref!r}: {exc}") from exc
    pre, post, wrap = wrap_ids(tokenizer, wrap)
    vocab_size = len(tokenizer)
    dtype = token_dtype(vocab_size)
    output = Path(output)

    with atomic_output_dir(output, overwrite=overwrite) as tmp:
        raw_path = tmp / "tokens.raw"
        lengths_parts: list[np.ndarray] = []
        n_tokens = 0
        max_id = -1
        docs = _chunks(source.documents(), chunk_size)
        with open(raw_path, "wb") as raw:

            def consume(flat: np.ndarray, lengths: np.ndarray) -> None:
                nonlocal n_tokens, max_id
                raw.write(flat.tobytes())
                lengths_parts.append(lengths)
                n_tokens += int(flat.size)
                if flat.size:
                    max_id = max(max_id, int(flat.max()))
                if progress is not None:
                    progress(len(lengths), int(flat.size))

            if num_proc == 1:
                _init_worker(tok_path, pre, post, dtype.str)
                for chunk in docs:
                    consume(*_encode_chunk(chunk))
            else:
                # fork is fast (no re-import) and safe here: workers only run the Rust tokenizer, which
                # turns its own thread pool off in a forked child; elsewhere spawn.
                ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
                with ctx.Pool(num_proc, initializer=_init_worker, initargs=(tok_path, pre, post, dtype.str)) as pool:
                    for flat, lengths in pool.imap(_encode_chunk, docs, chunksize=1):
                        consume(flat, lengths)
        lengths = np.concatenate(lengths_parts) if lengths_parts else np.zeros(0, dtype=np.int64)
        if lengths.size == 0:
            raise UserError(f"no documents found in {source.describe()}")
        offsets = np.zeros(lengths.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        _raw_to_npy(raw_path, tmp / "tokens.npy", dtype, n_tokens)
        np.save(tmp / "offsets.npy", offsets, allow_pickle=False)
        header = {
            "format": FORMAT,
            "version": VERSION,
            "tokenizer": str(tokenizer_ref),
            "tokenizer_class": type(tokenizer).__name__,
            "vocab_size": vocab_size,
            "dtype": dtype.name,
            "num_sequences": int(lengths.size),
            "num_tokens": int(n_tokens),
            "max_token_id": int(max_id),
            "wrap": wrap,
            "special_token_ids": _special_ids(tokenizer),
            "source": source.describe(),
        }
        write_json_atomic(tmp / "header.json", header)
    logger.info("binarized %d sequences, %d tokens into %s", lengths.size, n_tokens, output)
    return header


def _raw_to_npy(raw_path: Path, npy_path: Path, dtype: np.dtype, n: int, block: int = 1 << 24) -> None:
    """Copy a raw little-endian token file into a .npy file without loading it whole."""
    out = np.lib.format.open_memmap(npy_path, mode="w+", dtype=dtype, shape=(n,))
    if n:
        src = np.memmap(raw_path, dtype=dtype, mode="r", shape=(n,))
        for start in range(0, n, block):
            out[start : start + block] = src[start : start + block]
        del src
    out.flush()
    del out
    raw_path.unlink()


def _special_ids(tokenizer) -> dict[str, int]:
    out = {}
    for name in ("cls_token", "sep_token", "pad_token", "mask_token", "unk_token", "bos_token", "eos_token"):
        idx = getattr(tokenizer, f"{name}_id", None)
        if idx is not None:
            out[name] = int(idx)
    return out


# --------------------------------------------------------------------------- reading
class BinarizedCorpus:
    """A binarized corpus opened lazily: arrays are memory-mapped, never read whole."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise UserError(f"binarized corpus {self.path} not found", hint="create it with `mklab binarize`")
        self.header = read_json(self.path / "header.json")
        if self.header.get("format") != FORMAT:
            raise UserError(f"{self.path} is not a binarized corpus (format {self.header.get('format')!r})")
        if int(self.header.get("version", 0)) > VERSION:
            raise UserError(f"{self.path} was written by a newer mklab (version {self.header['version']})")
        self.tokens = np.load(self.path / "tokens.npy", mmap_mode="r", allow_pickle=False)
        self.offsets = np.load(self.path / "offsets.npy", mmap_mode="r", allow_pickle=False)
        if self.offsets.shape[0] != self.header["num_sequences"] + 1 or int(self.offsets[-1]) != self.tokens.shape[0]:
            raise UserError(f"{self.path} is inconsistent (offsets do not match tokens)", hint="binarize again")

    def __len__(self) -> int:
        return self.offsets.shape[0] - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.tokens[int(self.offsets[i]) : int(self.offsets[i + 1])]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def vocab_size(self) -> int:
        return int(self.header["vocab_size"])

    @property
    def special_token_ids(self) -> dict[str, int]:
        return dict(self.header.get("special_token_ids", {}))


def combine(inputs: Sequence[str | Path], output: str | Path, *, overwrite: bool = False) -> dict:
    """Concatenate several binarized corpora made with the same tokenizer into one."""
    if len(inputs) < 1:
        raise UserError("--combine needs at least one binarized corpus")
    corpora = [BinarizedCorpus(p) for p in inputs]
    first = corpora[0].header
    for c in corpora[1:]:
        for key in ("vocab_size", "dtype", "tokenizer_class", "special_token_ids"):
            if c.header.get(key) != first.get(key):
                raise UserError(
                    f"cannot combine {c.path} with {corpora[0].path}: different {key} "
                    f"({c.header.get(key)!r} vs {first.get(key)!r})",
                    hint="binarize every part with the same tokenizer",
                )
    dtype = np.dtype(first["dtype"])
    n_tokens = sum(int(c.tokens.shape[0]) for c in corpora)
    with atomic_output_dir(Path(output), overwrite=overwrite) as tmp:
        out = np.lib.format.open_memmap(tmp / "tokens.npy", mode="w+", dtype=dtype, shape=(n_tokens,))
        offsets = [np.zeros(1, dtype=np.int64)]
        pos = 0
        block = 1 << 24
        for c in corpora:
            n = int(c.tokens.shape[0])
            for s in range(0, n, block):
                out[pos + s : pos + min(n, s + block)] = c.tokens[s : s + block]
            offsets.append(np.asarray(c.offsets[1:], dtype=np.int64) + pos)
            pos += n
        out.flush()
        del out
        offsets_arr = np.concatenate(offsets)
        np.save(tmp / "offsets.npy", offsets_arr, allow_pickle=False)
        header = dict(first)
        header.update(
            num_sequences=int(offsets_arr.size - 1),
            num_tokens=int(n_tokens),
            max_token_id=max(int(c.header.get("max_token_id", -1)) for c in corpora),
            source={"kind": "combine", "inputs": [str(c.path) for c in corpora]},
        )
        write_json_atomic(tmp / "header.json", header)
    return header


# --------------------------------------------------------------------------- token counts
def count_tokens(
    corpus: str | Path | BinarizedCorpus,
    output: str | Path,
    *,
    overwrite: bool = False,
    block: int = 1 << 24,
    progress: ProgressFn | None = None,
) -> dict:
    """Count occurrences of every vocabulary id; write ``counts.npy`` + ``header.json``."""
    c = corpus if isinstance(corpus, BinarizedCorpus) else BinarizedCorpus(corpus)
    counts = np.zeros(c.vocab_size, dtype=np.int64)
    n = int(c.tokens.shape[0])
    for s in range(0, n, block):
        part = np.asarray(c.tokens[s : s + block])
        counts += np.bincount(part, minlength=c.vocab_size)[: c.vocab_size].astype(np.int64)
        if progress is not None:
            progress(0, int(part.size))
    with atomic_output_dir(Path(output), overwrite=overwrite) as tmp:
        np.save(tmp / "counts.npy", counts, allow_pickle=False)
        header = {
            "format": COUNTS_FORMAT,
            "version": VERSION,
            "tokenizer": c.header.get("tokenizer"),
            "vocab_size": c.vocab_size,
            "num_tokens": n,
            "corpus": str(c.path),
        }
        write_json_atomic(tmp / "header.json", header)
    return header


def load_token_counts(path: str | Path) -> np.ndarray:
    """Load counts written by :func:`count_tokens` (a folder, or its counts.npy)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    header = read_json(folder / "header.json")
    if header.get("format") != COUNTS_FORMAT:
        raise UserError(f"{folder} is not a token-counts folder", hint="create it with `mklab count-tokens`")
    counts = np.load(folder / "counts.npy", allow_pickle=False)
    if counts.shape != (header["vocab_size"],):
        raise UserError(f"{folder}/counts.npy has shape {counts.shape}, expected ({header['vocab_size']},)")
    return counts
