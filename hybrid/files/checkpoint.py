"""Model files: find what a source path holds, read its configuration, and index its
tensors under Hugging Face names without reading them.

A `TensorRef` hands a tensor out either raw (GGUF blocks as stored, for the numba
kernels) or as a dequantized torch tensor (for modules that stay in torch).
"""

from __future__ import annotations

import json
import math
import mmap
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

Q = GGMLQuantizationType
_TORCH_TYPES = {torch.float32: Q.F32, torch.float16: Q.F16, torch.bfloat16: Q.BF16}
_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")


class CheckpointError(ValueError):
    """A model file or directory that cannot be loaded; the message says why and what to do."""


@dataclass
class TensorRef:
    """One tensor of a checkpoint. `shape` is the logical torch shape ([out, in] for
    weights); `raw()` returns the stored form: uint8 blocks [*shape[:-1], row_bytes] for
    quantized types, float32/float16 arrays, or uint16 bits for bf16."""

    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    raw: Callable[[], np.ndarray]
    permute_heads: int = 0  # >0: undo llama.cpp's q/k row interleave for this many heads

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape)) // block * size

    def numpy(self) -> np.ndarray:
        """Dequantized float32 array of `shape`."""
        data = self.raw()
        if self.qtype == Q.BF16:
            out = (data.astype(np.uint32) << 16).view(np.float32)
        elif self.qtype in (Q.F32, Q.F16):
            out = data.astype(np.float32)
        else:
            out = dequantize(data, self.qtype)
        out = out.reshape(self.shape)
        return unpermute_rows(out, self.permute_heads) if self.permute_heads else out

    def tensor(self, dtype=torch.float32, device="cpu") -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.numpy())).to(device=device, dtype=dtype)

    def raw_rows(self) -> np.ndarray:
        """`raw()` with q/k rows put back in Hugging Face order (rows move whole, so the
        blocks inside them are untouched)."""
        data = self.raw()
        return unpermute_rows(data, self.permute_heads) if self.permute_heads else data


def unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute`: within each head, rows were reordered from
    (half, pair) to (pair, half) for its interleaved rotary kernel."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------- sources


@dataclass
class Source:
    """What a path holds: GGUF files, or a Hugging Face directory of safetensors."""

    path: Path
    gguf_files: list[Path] = field(default_factory=list)
    safetensors_files: list[Path] = field(default_factory=list)

    @property
    def is_gguf(self) -> bool:
        return bool(self.gguf_files)


def find_source(path) -> Source:
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix != ".gguf":
            raise CheckpointError(f"{path}: not a .gguf file; pass a GGUF file or a model directory")
        return Source(path, gguf_files=_split_files(path))
    if (path / "config.json").exists():
        return Source(path, safetensors_files=_safetensors_files(path))
    ggufs = sorted(path.glob("*.gguf"))
    firsts = [p for p in ggufs if not _SPLIT.search(p.name) or _SPLIT.search(p.name).group(1) == "00001"]
    if len(firsts) == 1:
        return Source(path, gguf_files=_split_files(firsts[0]))
    if len(firsts) > 1:
        names = ", ".join(p.name for p in firsts)
        raise CheckpointError(f"{path}: holds several GGUF models ({names}); pass one file")
    raise CheckpointError(
        f"{path}: nothing loadable here: expected a .gguf file, or a Hugging Face checkpoint "
        "(config.json with *.safetensors)"
    )


def _split_files(first: Path) -> list[Path]:
    m = _SPLIT.search(first.name)
    if not m:
        return [first]
    count = int(m.group(2))
    files = [first.with_name(_SPLIT.sub(f"-{i:05d}-of-{count:05d}.gguf", first.name)) for i in range(1, count + 1)]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise CheckpointError(f"{first.parent}: split GGUF is missing {', '.join(missing)}")
    return files


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (directory / s).exists()]
        if missing:
            raise CheckpointError(f"{directory}: missing shard(s) listed in {index.name}: {', '.join(missing)}")
        return [directory / s for s in shards]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: config.json found but no *.safetensors weights")
    return files


# ----------------------------------------------------------------------------- GGUF


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # logical torch order (GGUF stores dims innermost first)
    qtype: GGMLQuantizationType
    data: np.ndarray  # memory-mapped: uint8 blocks [*shape[:-1], row_bytes], or float arrays


@dataclass
class GGUFFile:
    """A GGUF file's metadata as Python values and its tensors as memory-mapped arrays.

    Read with a small header parser rather than `gguf.GGUFReader`, whose per-string numpy
    views of a large vocabulary cost more memory than a small model's weights."""

    path: Path
    metadata: dict
    tensors: list[GGUFTensor]


_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_GGUF_VERSIONS = (2, 3)        # 1 had 32-bit counts and is not read
_MAX_DIMS = 4                  # GGML_MAX_DIMS
_MAX_ARRAY_NESTING = 8


_U64 = struct.Struct("<Q")


class _Corrupt(Exception):
    """A header field that cannot be right: `field` names it, the message says why."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")


class _Cursor:
    """Reads little-endian GGUF header values from a bytes-like buffer. Every read checks
    that its bytes are in the file first, and every count is checked against the bytes left
    before anything is allocated for it: a header is untrusted input."""

    def __init__(self, buf):
        self.buf, self.pos, self.size = buf, 0, len(buf)

    def left(self) -> int:
        return self.size - self.pos

    def need(self, n: int, field: str) -> None:
        if n > self.left():
            raise _Corrupt(field, f"needs {n} bytes at offset {self.pos}, the file has {self.left()} left "
                                  f"(truncated?)")

    def scalar(self, code: int, field: str):
        fmt = "<" + _SCALARS[code]
        n = struct.calcsize(fmt)
        self.need(n, field)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def count(self, field: str, item_bytes: int) -> int:
        """A uint64 count of items of at least `item_bytes` bytes each, checked against the file."""
        n = self.scalar(10, field)
        if n * item_bytes > self.left():
            raise _Corrupt(field, f"{n} items of at least {item_bytes} bytes do not fit in the {self.left()} "
                                  f"bytes left in the file")
        return n

    def string(self, field: str) -> str:
        n = self.count(f"{field} (string length)", 1)
        start = self.pos
        self.pos = start + n
        return self.buf[start : self.pos].decode("utf-8", errors="replace")

    def strings(self, field: str, count: int) -> list[str]:
        """An array of `count` strings (a vocabulary: 50-150k of them). One tight loop; on a
        string that does not fit, the checked reads again from the array's start, for their
        message naming the item."""
        buf, pos, size, out = self.buf, self.pos, self.size, []
        length = _U64.unpack_from
        for _ in range(count):
            if pos + 8 > size:
                break
            (n,) = length(buf, pos)
            if n > size - pos - 8:
                break
            out.append(buf[pos + 8 : pos + 8 + n].decode("utf-8", errors="replace"))
            pos += 8 + n
        else:
            self.pos = pos
            return out
        return [self.string(f"{field}[{i}]") for i in range(count)]

    def type_code(self, field: str) -> int:
        code = self.scalar(4, field)
        if code not in _SCALARS and code not in (_STRING, _ARRAY):
            raise _Corrupt(field, f"unknown value type {code}")
        return code

    def value(self, code: int, field: str, depth: int = 0):
        if code == _STRING:
            return self.string(field)
        if code == _ARRAY:
            if depth >= _MAX_ARRAY_NESTING:
                raise _Corrupt(field, f"arrays nested more than {_MAX_ARRAY_NESTING} deep")
            item = self.type_code(f"{field} (array item type)")
            size = 12 if item == _ARRAY else 8 if item == _STRING else struct.calcsize(_SCALARS[item])
            count = self.count(f"{field} (array length)", size)
            if item == _STRING:
                return self.strings(field, count)
            if item == _ARRAY:
                return [self.value(_ARRAY, f"{field}[{i}]", depth + 1) for i in range(count)]
            dt = np.dtype("<" + _SCALARS[item])
            values = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos)
            self.pos += dt.itemsize * count
            return values.tolist()
        return self.scalar(code, field)


def open_gguf(path: Path) -> GGUFFile:
    """Read a GGUF file's header and map its tensors. Anything the header says is checked
    against the file before it is used: a wrong, truncated or hostile file gives a
    CheckpointError naming the file and the field, never a huge allocation."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if not f.seek(0, 2):
                raise CheckpointError(f"{path}: the file is empty; is it a GGUF file?")
            header = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the file ({e})") from e
    try:
        meta, infos, start = _read_header(header)
        size = len(header)
    except _Corrupt as e:
        raise CheckpointError(f"{path}: not a readable GGUF file: {e}; is it truncated or corrupt?") from None
    finally:
        header.close()
    buf = np.memmap(path, mode="r") if infos else np.zeros(0, np.uint8)
    tensors = []
    for name, shape, qtype, offset in infos:
        block, type_size = GGML_QUANT_SIZES[qtype]
        row_bytes = shape[-1] // block * type_size
        n_bytes = math.prod(shape[:-1]) * row_bytes
        begin = start + offset
        if begin + n_bytes > size:
            raise CheckpointError(f"{path}: tensor {name} (offset {offset}, {n_bytes} bytes) runs past the end "
                                  f"of the file ({size} bytes); the file is truncated")
        raw = buf[begin : begin + n_bytes]
        if qtype in (Q.F32, Q.F16):
            data = raw.view(np.float32 if qtype == Q.F32 else np.float16).reshape(shape)
        elif qtype == Q.BF16:
            data = raw.view(np.uint16).reshape(shape)
        else:
            data = raw.reshape(*shape[:-1], row_bytes)
        tensors.append(GGUFTensor(name, shape, qtype, data))
    return GGUFFile(path, meta, tensors)


def _read_header(buf) -> tuple[dict, list, int]:
    """(metadata, [(name, shape, type, offset)], where tensor data starts), or _Corrupt."""
    cur = _Cursor(buf)
    cur.need(4, "magic")
    if buf[:4] != b"GGUF":
        raise _Corrupt("magic", "no GGUF magic number at the start")
    cur.pos = 4
    version = cur.scalar(4, "version")
    if version not in _GGUF_VERSIONS:
        known = " or ".join(map(str, _GGUF_VERSIONS))
        raise _Corrupt("version", f"GGUF version {version} is not supported (this reader knows {known})")
    # a tensor info takes at least 8 (name length) + 4 (dims) + 8 (one dim) + 4 (type) + 8 (offset) bytes,
    # a metadata pair at least 8 (key length) + 4 (type) + 1 (value)
    n_tensors, n_kv = cur.count("tensor_count", 32), cur.count("metadata_kv_count", 13)
    meta = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key {i}")
        if key in meta:
            raise _Corrupt(f"metadata key {key!r}", "appears twice")
        meta[key] = cur.value(cur.type_code(f"metadata {key!r} (value type)"), f"metadata {key!r}")
    align = meta.get("general.alignment", 32)
    if isinstance(align, bool) or not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise _Corrupt("metadata 'general.alignment'", f"must be a power of two, got {align!r}")
    infos, names = [], set()
    for i in range(n_tensors):
        name = cur.string(f"tensor {i} name")
        field = f"tensor {name!r}"
        if name in names:
            raise _Corrupt(field, "appears twice")
        names.add(name)
        n_dims = cur.scalar(4, f"{field} n_dims")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise _Corrupt(f"{field} n_dims", f"must be 1 to {_MAX_DIMS}, got {n_dims}")
        dims = [cur.scalar(10, f"{field} dimension {d}") for d in range(n_dims)]
        if any(d < 1 for d in dims) or math.prod(dims) >= 2**63:
            raise _Corrupt(f"{field} dimensions", f"{dims} are not a valid shape")
        code = cur.scalar(4, f"{field} type")
        try:
            qtype = Q(code)
        except ValueError:
            raise _Corrupt(f"{field} type", f"unknown tensor type {code}") from None
        if qtype not in GGML_QUANT_SIZES:
            raise _Corrupt(f"{field} type", f"tensor type {qtype.name} has no known block size")
        block = GGML_QUANT_SIZES[qtype][0]
        if dims[0] % block:
            raise _Corrupt(f"{field} dimensions", f"rows of {dims[0]} are not whole {qtype.name} blocks "
                                                  f"of {block}")
        offset = cur.scalar(10, f"{field} offset")
        if offset % align:
            raise _Corrupt(f"{field} offset", f"{offset} is not a multiple of the alignment {align}")
        infos.append((name, tuple(reversed(dims)), qtype, offset))
    start = -(-cur.pos // align) * align
    return meta, infos, start


# -------------------------------------------------------------------------- indexing


def _templates_to_regex(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)") + "$")


def gguf_tensors(files: list[GGUFFile], names: dict[str, str], permuted: dict[str, int]) -> dict[str, TensorRef]:
    """Index GGUF tensors under Hugging Face names using a family's name table
    (HF template -> GGUF template). Unknown GGUF names keep their own name, so the
    strict check later reports them."""
    table = [(_templates_to_regex(g), hf) for hf, g in names.items()]
    refs = {}
    for f in files:
        for t in f.tensors:
            hf_name = t.name
            for pattern, hf in table:
                m = pattern.match(t.name)
                if m:
                    hf_name = hf.format(**m.groupdict())
                    break
            refs[hf_name] = TensorRef(
                hf_name, t.shape, t.qtype, (lambda d=t.data: d), permuted.get(_untemplate(hf_name), 0)
            )
    return refs


def _untemplate(name: str) -> str:
    return re.sub(r"\.\d+\.", ".{i}.", name, count=1)


def safetensors_tensors(files: list[Path], stacked: dict[str, str]) -> dict[str, TensorRef]:
    """Index safetensors tensors; per-expert checkpoint tensors named by a family's
    `stacked` table (our stacked name -> checkpoint template with {i} and {e}) become one
    [E, ...] tensor."""
    from safetensors import safe_open

    refs: dict[str, TensorRef] = {}
    handles = []
    for f in files:
        try:   # the library checks the header (its length, offsets, dtypes) against the file
            handles.append((f, safe_open(str(f), framework="pt")))
        except Exception as e:   # safetensors' own error type is not a ValueError
            raise CheckpointError(f"{f}: not a readable safetensors file ({e}); is it truncated or corrupt?") from None
    for f, h in handles:
        for name in h.keys():
            sl = h.get_slice(name)
            dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(sl.get_dtype())
            if dtype is None:
                raise CheckpointError(f"{f}: tensor {name}: dtype {sl.get_dtype()} is not supported "
                                      f"(F32, F16, BF16)")
            refs[name] = TensorRef(name, tuple(sl.get_shape()), _TORCH_TYPES[dtype], (lambda h=h, n=name: _np(h.get_tensor(n))))
    for ours, template in stacked.items():
        pattern = _templates_to_regex(template)
        groups: dict[str, dict[int, TensorRef]] = {}
        for name in list(refs):
            m = pattern.match(name)
            if m:
                target = ours.format(i=m.group("i"))
                groups.setdefault(target, {})[int(m.group("e"))] = refs.pop(name)
        for target, parts in groups.items():
            experts = [parts[e] for e in sorted(parts)]
            if sorted(parts) != list(range(len(parts))):
                raise CheckpointError(f"{target}: experts {sorted(parts)} are not numbered 0..{len(parts) - 1}")
            refs[target] = TensorRef(
                target,
                (len(experts), *experts[0].shape),
                experts[0].qtype,
                (lambda ex=experts: np.stack([r.raw() for r in ex])),
            )
    return refs


def _np(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy()
    return t.numpy()
