"""The GGUF reader takes model files as untrusted input: a truncated file, or a header whose
counts, lengths, type ids or offsets were flipped, gives a CheckpointError naming the file,
never another exception, a crash or a large allocation."""

from __future__ import annotations

import random
import struct
import tracemalloc

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter

from hybrid.files.checkpoint import CheckpointError, open_gguf

LIMIT = 16 * 1024 * 1024   # bytes any open of these ~2 KB files may allocate


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory):
    """Metadata of every kind (scalars, a string, string and number arrays, a nested array)
    and three tensors: F32, F16 and Q8_0."""
    path = tmp_path_factory.mktemp("gguf") / "small.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_uint32("llama.block_count", 2)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_string("general.name", "fuzz")
    w.add_bool("general.flag", True)
    w.add_array("tokenizer.ggml.tokens", ["a", "bc", "<s>"])
    w.add_array("tokenizer.ggml.scores", [0.0, -1.0, -2.0])
    w.add_array("general.nested", [[1, 2], [3]])
    rng = np.random.default_rng(0)
    w.add_tensor("a.weight", rng.standard_normal((4, 8)).astype(np.float32))
    w.add_tensor("b.weight", rng.standard_normal((2, 16)).astype(np.float16))
    q8 = np.ones((2, 34), np.uint8)     # 2 rows of one Q8_0 block (32 weights)
    w.add_tensor("c.weight", q8, raw_dtype=GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def traced():
    tracemalloc.start()
    yield
    tracemalloc.stop()


def _opens_or_fails_cleanly(path) -> bool:
    """True if it opened, False if CheckpointError; anything else fails the test (run under
    the `traced` fixture: the allocation peak is checked too)."""
    tracemalloc.reset_peak()
    try:
        g = open_gguf(path)
        for t in g.tensors:
            np.asarray(t.data).sum()   # the mapped bytes are really there
        return True
    except CheckpointError as e:
        assert str(path) in str(e)
        return False
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        assert peak < LIMIT, f"opening {path} allocated {peak} bytes"


def test_the_small_file_reads(small_gguf):
    g = open_gguf(small_gguf)
    assert g.metadata["general.name"] == "fuzz" and g.metadata["general.nested"] == [[1, 2], [3]]
    assert [(t.name, t.shape) for t in g.tensors] == [("a.weight", (4, 8)), ("b.weight", (2, 16)),
                                                      ("c.weight", (2, 32))]


def test_truncated_at_every_offset(small_gguf, tmp_path, traced):
    data = small_gguf.read_bytes()
    end = len(data.rstrip(b"\0"))      # past the last tensor's bytes is only alignment padding
    bad = tmp_path / "cut.gguf"
    for cut in range(end):
        bad.write_bytes(data[:cut])
        assert not _opens_or_fails_cleanly(bad), f"a file cut at {cut} of {len(data)} bytes was accepted"


HOSTILE = [0, 2**31 - 1, 2**64 - 1, 0x1F, 0x100000]


def test_flipped_header_fields(small_gguf, tmp_path, traced):
    """At every header offset, overwrite 8 bytes with an extreme value (in turn) and 4 bytes
    with a random one: the counts, string and array lengths, type ids, dims and offsets all
    get hit."""
    data = small_gguf.read_bytes()
    header_end = data.index(b"c.weight") + 64
    rng = random.Random(1)
    bad = tmp_path / "flip.gguf"
    opened = failed = 0
    for pos in range(4, header_end):
        for fmt, v in (("<Q", HOSTILE[pos % len(HOSTILE)]), ("<I", rng.getrandbits(32))):
            buf = bytearray(data)
            buf[pos:pos + struct.calcsize(fmt)] = struct.pack(fmt, v)
            bad.write_bytes(bytes(buf))
            if _opens_or_fails_cleanly(bad):
                opened += 1
            else:
                failed += 1
    assert failed > 500 and opened > 0


@pytest.mark.parametrize("version,expect", [(1, "version 1"), (99, "version 99")])
def test_unknown_versions_are_refused(small_gguf, tmp_path, version, expect):
    data = bytearray(small_gguf.read_bytes())
    data[4:8] = struct.pack("<I", version)
    bad = tmp_path / "v.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=expect) as e:
        open_gguf(bad)
    assert str(bad) in str(e.value) and "version" in str(e.value)


def test_huge_tensor_count_names_the_field(small_gguf, tmp_path):
    data = bytearray(small_gguf.read_bytes())
    data[8:16] = struct.pack("<Q", 2**64 - 1)
    bad = tmp_path / "count.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="tensor_count"):
        open_gguf(bad)


def test_truncated_safetensors_names_the_file(tmp_path):
    import torch
    from safetensors.torch import save_file

    from hybrid.files.checkpoint import safetensors_tensors

    good = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(4, 4)}, str(good))
    data = good.read_bytes()
    for cut in (0, 4, 8, 20, len(data) - 8):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="not a readable safetensors file") as e:
            safetensors_tensors([bad], {})
        assert str(bad) in str(e.value)
