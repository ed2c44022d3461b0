"""Lazy checkpoint reading and streaming, sharded safetensors writing.

Readers (:class:`TensorSource`) expose names, shapes and dtypes from file headers without
loading data, and return one tensor at a time. Safetensors files (single file or a sharded
``model.safetensors.index.json``) are read with positioned reads of exactly one tensor's bytes
(no ``mmap``, whose touched pages would stay resident); PyTorch ``.bin`` files are loaded
with ``torch.load(weights_only=True, mmap=True)`` so that nothing is unpickled and pages are only
touched when a tensor is used.

The writer (:class:`ShardedSafetensorsWriter`) plans shard boundaries up front from the list of
output tensors (names, shapes, dtypes are known before any merge work) and writes each shard's
header first, then the tensor bytes as they are produced, so peak memory stays at one output
tensor, not one output shard. The layout matches ``transformers``' ``save_pretrained``:
``model.safetensors`` when a single shard suffices, otherwise
``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from mergekit_lab.errors import UserError

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_ST_DTYPES_REV = {v: k for k, v in _ST_DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of one stored tensor (read from the file header, no data)."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


class TensorSource:
    """A read-only mapping name -> tensor that loads one tensor at a time."""

    label: str = "<tensors>"

    def keys(self) -> list[str]:  # pragma: no cover - interface
        raise NotImplementedError

    def info(self, name: str) -> TensorInfo:  # pragma: no cover - interface
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def __contains__(self, name: str) -> bool:
        return name in self._keyset()

    def _keyset(self) -> set[str]:
        ks = getattr(self, "_ks", None)
        if ks is None:
            ks = set(self.keys())
            self._ks = ks
        return ks

    def close(self) -> None:
        pass


class DictSource(TensorSource):
    """In-memory state dict as a :class:`TensorSource` (for tests and small models)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], label: str = "<state_dict>"):
        self._t = dict(tensors)
        self.label = label

    def keys(self) -> list[str]:
        return list(self._t)

    def info(self, name: str) -> TensorInfo:
        t = self._t[name]
        return TensorInfo(tuple(t.shape), t.dtype)

    def get(self, name: str) -> torch.Tensor:
        return self._t[name]


class SafetensorsFile:
    """One safetensors file read with positioned reads (``os.pread``), not ``mmap``.

    Reading a tensor copies exactly its bytes into a fresh buffer; nothing else of the file is
    mapped, so the process's resident memory holds only the tensors alive at the moment (a
    memory-mapped reader would keep every page it touched resident until the file is closed).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.infos, self.offsets, self.metadata, self._data_start = _parse_header(self.path)
        self._fd: int | None = None

    def keys(self) -> list[str]:
        return list(self.infos)

    def get(self, name: str) -> torch.Tensor:
        info = self.infos[name]
        start, end = self.offsets[name]
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        n = end - start
        if n == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        buf = torch.empty(n, dtype=torch.uint8)  # uninitialised: no zero-fill pass before the read
        view = memoryview(buf.numpy())
        got = 0
        while got < n:
            k = os.preadv(self._fd, [view[got:]], self._data_start + start + got)
            if k <= 0:
                raise UserError(f"{self.path} is truncated (tensor {name!r})")
            got += k
        return buf.view(info.dtype).reshape(info.shape)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


class SafetensorsSource(TensorSource):
    """One or several safetensors files read lazily (headers only until ``get``)."""

    def __init__(self, files: list[Path], label: str):
        self.label = label
        self._files: dict[Path, SafetensorsFile] = {}
        self._where: dict[str, SafetensorsFile] = {}
        self._order: list[str] = []
        for f in files:
            sf = SafetensorsFile(f)
            self._files[f] = sf
            for name in sf.keys():
                if name in self._where:
                    raise UserError(f"tensor {name!r} appears in two shards of {label}")
                self._where[name] = sf
                self._order.append(name)

    def keys(self) -> list[str]:
        return list(self._order)

    def info(self, name: str) -> TensorInfo:
        return self._where[name].infos[name]

    def get(self, name: str) -> torch.Tensor:
        return self._where[name].get(name)

    def close(self) -> None:
        for sf in self._files.values():
            sf.close()


class BinSource(TensorSource):
    """PyTorch ``.bin`` checkpoints loaded with ``weights_only=True`` (never unpickling code)
    and ``mmap=True`` (data paged in on use)."""

    def __init__(self, files: list[Path], label: str):
        self.label = label
        self._t: dict[str, torch.Tensor] = {}
        for f in files:
            try:
                sd = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
                sd = torch.load(str(f), map_location="cpu", weights_only=True)
            if not isinstance(sd, dict):
                raise UserError(f"{f} does not hold a state dict (got {type(sd).__name__})")
            self._t.update(sd)

    def keys(self) -> list[str]:
        return list(self._t)

    def info(self, name: str) -> TensorInfo:
        t = self._t[name]
        return TensorInfo(tuple(t.shape), t.dtype)

    def get(self, name: str) -> torch.Tensor:
        return self._t[name]

    def close(self) -> None:
        self._t.clear()


def _parse_header(path: Path):
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise UserError(f"{path} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise UserError(f"{path} is not a safetensors file (header size {n})")
        try:
            header = json.loads(fh.read(n))
        except ValueError:
            raise UserError(f"{path} is not a safetensors file (bad header)") from None
    infos: dict[str, TensorInfo] = {}
    offsets: dict[str, tuple[int, int]] = {}
    metadata = header.pop("__metadata__", None) or {}
    for name, meta in header.items():
        dt = _ST_DTYPES_REV.get(meta["dtype"])
        if dt is None:
            raise UserError(f"{path}: tensor {name!r} has unsupported dtype {meta['dtype']}")
        infos[name] = TensorInfo(tuple(meta["shape"]), dt)
        offsets[name] = (int(meta["data_offsets"][0]), int(meta["data_offsets"][1]))
    return infos, offsets, metadata, 8 + n


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Shapes and dtypes of every tensor in a safetensors file, from its JSON header only."""
    return _parse_header(Path(path))[0]


def weight_files(model_dir: Path) -> tuple[str, list[Path]]:
    """Find the weight files of a model folder: ("safetensors"|"bin", files)."""
    model_dir = Path(model_dir)
    if model_dir.is_file():
        if model_dir.suffix == ".safetensors":
            return "safetensors", [model_dir]
        if model_dir.suffix in (".bin", ".pt", ".pth"):
            return "bin", [model_dir]
        raise UserError(f"{model_dir}: unknown weight file type", hint="use .safetensors or .bin")
    if not model_dir.is_dir():
        raise UserError(f"model folder {model_dir} does not exist", hint="give a folder written by save_pretrained")
    for index, kind in ((SAFE_INDEX, "safetensors"), (BIN_INDEX, "bin")):
        p = model_dir / index
        if p.exists():
            wm = json.loads(p.read_text())["weight_map"]
            files = sorted({model_dir / f for f in wm.values()})
            return kind, files
    if (model_dir / SAFE_SINGLE).exists():
        return "safetensors", [model_dir / SAFE_SINGLE]
    if (model_dir / BIN_SINGLE).exists():
        return "bin", [model_dir / BIN_SINGLE]
    found = sorted(model_dir.glob("*.safetensors"))
    if found:
        return "safetensors", found
    raise UserError(
        f"no weights found in {model_dir}",
        hint=f"expected {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX}",
    )


def open_checkpoint(model_dir: str | Path) -> TensorSource:
    """Open a model folder (or a single weight file) lazily."""
    kind, files = weight_files(Path(model_dir))
    if kind == "safetensors":
        return SafetensorsSource(files, label=str(model_dir))
    return BinSource(files, label=str(model_dir))


def parse_size(size: int | str) -> int:
    """'2GB' -> 2e9 bytes; '500MB'; '1GiB'; ints pass through."""
    if isinstance(size, int):
        return size
    s = str(size).strip().upper()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for u, m in units.items():
        if s.endswith(u):
            return int(float(s[: -len(u)]) * m)
    return int(s)


class ShardedSafetensorsWriter:
    """Write a planned list of tensors into sharded safetensors files, streaming.

    ``plan`` is the ordered list of (name, TensorInfo) to write. Tensors must then be given
    with :meth:`write` in exactly that order. Each shard file's header is written when the
    shard is opened, and data bytes are appended as tensors arrive, so only the tensor being
    written is held in memory. Files are first written under temporary names and renamed by
    :meth:`close`; the index JSON is written when there is more than one shard.
    """

    def __init__(
        self,
        out_dir: Path,
        plan: list[tuple[str, TensorInfo]],
        max_shard_size: int | str = "2GB",
        metadata: dict[str, str] | None = None,
    ):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.metadata = {"format": "pt", **(metadata or {})}
        limit = parse_size(max_shard_size)
        shards: list[list[tuple[str, TensorInfo]]] = [[]]
        size = 0
        for name, info in plan:
            nb = info.nbytes
            if shards[-1] and size + nb > limit:
                shards.append([])
                size = 0
            shards[-1].append((name, info))
            size += nb
        self.shards = shards
        n = len(shards)
        self.names = [SAFE_SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.total_size = sum(info.nbytes for _, info in plan)
        self._queue = [(si, name, info) for si, shard in enumerate(shards) for name, info in shard]
        self._pos = 0
        self._cur = -1
        self._fh = None

    def _open_shard(self, si: int) -> None:
        if self._fh is not None:
            self._fh.close()
        header: dict[str, object] = {"__metadata__": self.metadata}
        off = 0
        for name, info in self.shards[si]:
            nb = info.nbytes
            header[name] = {"dtype": _ST_DTYPES[info.dtype], "shape": list(info.shape), "data_offsets": [off, off + nb]}
            off += nb
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * ((8 - len(hb) % 8) % 8)
        self._fh = open(self.out_dir / (self.names[si] + ".tmp"), "wb")
        self._fh.write(struct.pack("<Q", len(hb)))
        self._fh.write(hb)
        self._cur = si

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._pos >= len(self._queue):
            raise RuntimeError(f"unexpected tensor {name!r}: all planned tensors already written")
        si, exp, info = self._queue[self._pos]
        if name != exp:
            raise RuntimeError(f"tensor {name!r} written out of order (expected {exp!r})")
        if tuple(tensor.shape) != info.shape or tensor.dtype != info.dtype:
            raise RuntimeError(
                f"tensor {name!r}: got {tuple(tensor.shape)} {tensor.dtype}, planned {info.shape} {info.dtype}"
            )
        if si != self._cur:
            self._open_shard(si)
        t = tensor.detach().contiguous().cpu()
        if t.numel():
            self._fh.write(memoryview(t.view(-1).view(torch.uint8).numpy()))  # no extra copy
        self._pos += 1

    def close(self) -> list[str]:
        if self._pos != len(self._queue):
            raise RuntimeError(f"only {self._pos} of {len(self._queue)} planned tensors were written")
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        for nm in self.names:
            tmp = self.out_dir / (nm + ".tmp")
            if not tmp.exists():  # a shard with only empty tensors is still created
                self._open_shard(self.names.index(nm))
                self._fh.close()
                self._fh = None
            os.replace(tmp, self.out_dir / nm)
        if len(self.names) > 1:
            weight_map = {name: self.names[si] for si, name, _ in self._queue}
            index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
            (self.out_dir / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return list(self.names)


def save_state_dict_sharded(
    tensors: Mapping[str, torch.Tensor], out_dir: Path, max_shard_size: int | str = "2GB"
) -> list[str]:
    """Write an in-memory state dict in the same sharded layout (used by tests and benchmarks)."""
    plan = [(k, TensorInfo(tuple(v.shape), v.dtype)) for k, v in tensors.items()]
    w = ShardedSafetensorsWriter(Path(out_dir), plan, max_shard_size)
    for k, v in tensors.items():
        w.write(k, v)
    return w.close()

