"""Training sequences from a binarized corpus, length-grouped batches, and MLM masking.

As in the original ``LmSeqsDataset``: sequences longer than ``max_len`` are cut into chunks
(each re-wrapped in [CLS]/[SEP] or BOS/EOS), sequences of ``min_len - 1`` (11) tokens or fewer
and sequences that are at least 50% [UNK] are dropped. The token ids stay in the memory-mapped
corpus; this class only holds (start, end) offsets.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from mergekit_lab.distill.binarize import BinarizedCorpus
from mergekit_lab.errors import UserError


class LmSequences:
    def __init__(
        self,
        corpus: BinarizedCorpus,
        *,
        max_len: int = 512,
        min_len: int = 12,
        max_unk_fraction: float = 0.5,
        max_sequences: int | None = None,
    ):
        self.corpus = corpus
        special = corpus.special_token_ids
        wrap = corpus.header.get("wrap", "none")
        if wrap == "cls-sep":
            self.pre, self.post = [special["cls_token"]], [special["sep_token"]]
        elif wrap == "bos-eos":
            self.pre = [special["bos_token"]] if "bos_token" in special else []
            self.post = [special["eos_token"]] if "eos_token" in special else []
        else:
            self.pre, self.post = [], []
        n_extra = len(self.pre) + len(self.post)
        if max_len <= n_extra + 1:
            raise UserError(f"max sequence length {max_len} is too small")
        self.max_len = max_len
        offsets = np.asarray(corpus.offsets, dtype=np.int64)
        starts, ends = offsets[:-1], offsets[1:]
        lengths = ends - starts
        # content region (without the wrap tokens the binarizer added)
        c_starts = starts + np.minimum(len(self.pre), lengths)
        c_ends = np.maximum(ends - len(self.post), c_starts)
        step = max_len - n_extra
        n_chunks = np.maximum(1, -(-(c_ends - c_starts) // step))
        seq_id = np.repeat(np.arange(lengths.size), n_chunks)
        first = np.repeat(np.cumsum(n_chunks) - n_chunks, n_chunks)
        k = np.arange(seq_id.size) - first
        self.starts = c_starts[seq_id] + k * step
        self.ends = np.minimum(self.starts + step, c_ends[seq_id])
        self.lengths = (self.ends - self.starts) + n_extra
        keep = self.lengths >= min_len
        unk = special.get("unk_token")
        if unk is not None and max_unk_fraction < 1.0:
            unk_counts = self._count_in_ranges(unk)
            keep &= unk_counts < max_unk_fraction * self.lengths
        idx = np.flatnonzero(keep)
        if max_sequences is not None:
            idx = idx[:max_sequences]
        self.starts, self.ends, self.lengths = self.starts[idx], self.ends[idx], self.lengths[idx]
        self.num_dropped = int(keep.size - idx.size) if max_sequences is None else int((~keep).sum())
        if self.lengths.size == 0:
            raise UserError(f"no usable sequences in {corpus.path} (all shorter than {min_len} tokens or mostly [UNK])")

    def _count_in_ranges(self, token_id: int, block: int = 1 << 24) -> np.ndarray:
        tokens = self.corpus.tokens
        positions = []
        for s in range(0, tokens.shape[0], block):
            positions.append(np.flatnonzero(np.asarray(tokens[s : s + block]) == token_id) + s)
        pos = np.concatenate(positions) if positions else np.zeros(0, dtype=np.int64)
        return np.searchsorted(pos, self.ends) - np.searchsorted(pos, self.starts)

    def __len__(self) -> int:
        return int(self.lengths.size)

    def __getitem__(self, i: int) -> np.ndarray:
        body = np.asarray(self.corpus.tokens[int(self.starts[i]) : int(self.ends[i])], dtype=np.int64)
        if self.pre or self.post:
            body = np.concatenate([np.asarray(self.pre, dtype=np.int64), body, np.asarray(self.post, dtype=np.int64)])
        return body

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())


class LengthGroupedBatches:
    """Batches of similar lengths, shuffled per epoch, sharded over ranks.

    Each epoch: shuffle all indices (seed + epoch), cut into mega-batches of ``group`` batches,
    sort each mega-batch by length, cut into batches, shuffle the batch order. Every rank gets the
    same number of batches (the remainder is dropped), as DDP requires. ``skip`` batches can be
    skipped at the start (resume in the middle of an epoch).
    """

    def __init__(
        self,
        lengths: Sequence[int] | np.ndarray,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        group: int = 50,
        group_by_length: bool = True,
    ):
        if batch_size < 1:
            raise UserError("batch size must be at least 1")
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.group = group
        self.group_by_length = group_by_length
        self.epoch = 0
        self.skip = 0
        if len(self) == 0:
            raise UserError(
                f"not enough sequences ({self.lengths.size}) for one batch of {batch_size} on each of {world_size} process(es)"
            )

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def _all_batches(self) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, self.epoch])
        perm = rng.permutation(self.lengths.size)
        batches = []
        mega = self.batch_size * self.group
        for s in range(0, perm.size, mega):
            chunk = perm[s : s + mega]
            if self.group_by_length:
                chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            for b in range(0, chunk.size - self.batch_size + 1, self.batch_size):
                batches.append(chunk[b : b + self.batch_size])
        order = rng.permutation(len(batches))
        batches = [batches[i] for i in order]
        n = (len(batches) // self.world_size) * self.world_size
        return batches[:n][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        for i, b in enumerate(self._all_batches()):
            if i >= self.skip:
                yield b.tolist()

    def __len__(self) -> int:
        full = 0
        mega = self.batch_size * self.group
        n = self.lengths.size
        for s in range(0, n, mega):
            full += min(mega, n - s) // self.batch_size
        return full // self.world_size


def collate(seqs: list[np.ndarray], pad_id: int) -> dict[str, torch.Tensor]:
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    L = int(lengths.max())
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.from_numpy(np.asarray(s, dtype=np.int64))
    mask = (torch.arange(L)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids, "attention_mask": mask, "lengths": lengths}


def token_probabilities(
    vocab_size: int, counts: np.ndarray | None, special_ids: Sequence[int], smoothing: float = 0.7
) -> torch.Tensor:
    """Masking weight per vocabulary id: max(count, 1) ** -smoothing, 0 for special tokens."""
    if counts is None:
        probs = np.ones(vocab_size, dtype=np.float64)
    else:
        counts = np.asarray(counts)
        if counts.shape[0] != vocab_size:
            raise UserError(f"token counts cover {counts.shape[0]} ids but the vocabulary has {vocab_size}")
        probs = np.maximum(counts, 1).astype(np.float64) ** (-smoothing)
    for s in special_ids:
        if s is not None and 0 <= s < vocab_size:
            probs[s] = 0.0
    return torch.tensor(probs, dtype=torch.float32)


class MlmMasker:
    """The paper's masking: mask_prop (15%) of the real tokens, chosen with probability ~ token
    weight; of those, 80% -> [MASK], 10% kept, 10% random token. Labels are -100 elsewhere."""

    def __init__(
        self,
        token_probs: torch.Tensor,
        mask_id: int,
        *,
        mask_prop: float = 0.15,
        word_mask: float = 0.8,
        word_keep: float = 0.1,
        word_rand: float = 0.1,
    ):
        if not 0.0 <= mask_prop <= 1.0:
            raise UserError(f"mlm mask proportion {mask_prop} must be in [0, 1]")
        if abs(word_mask + word_keep + word_rand - 1.0) > 1e-6:
            raise UserError("word_mask + word_keep + word_rand must sum to 1")
        self.token_probs = token_probs
        self.mask_id = mask_id
        self.mask_prop = mask_prop
        self.pred_probs = torch.tensor([word_mask, word_keep, word_rand], dtype=torch.float32)
        self.vocab_size = token_probs.numel()

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, generator=None):
        ids = input_ids.clone()
        labels = input_ids.clone()
        weights = self.token_probs.to(ids.device)[ids.flatten()] * attention_mask.flatten().float()
        n_real = int(attention_mask.sum())
        n_tgt = min(math.ceil(self.mask_prop * n_real), int((weights > 0).sum()))
        pred = torch.zeros(ids.numel(), dtype=torch.bool, device=ids.device)
        if n_tgt > 0:
            tgt = torch.multinomial(weights / weights.sum(), n_tgt, replacement=False, generator=generator)
            pred[tgt] = True
        pred = pred.view_as(ids)
        real = ids[pred]
        choice = torch.multinomial(self.pred_probs, real.numel(), replacement=True, generator=generator).to(ids.device)
        rand = torch.randint(self.vocab_size, real.shape, device=ids.device, generator=generator)
        new = torch.where(choice == 0, torch.full_like(real, self.mask_id), torch.where(choice == 1, real, rand))
        ids[pred] = new
        labels[~pred] = -100
        return ids, labels


def clm_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    labels = input_ids.clone()
    labels[attention_mask == 0] = -100
    return labels
