"""Bad model sources give one clear error that says what is wrong."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

import hybrid
from hybrid.files.checkpoint import CheckpointError
from hybrid.writers.convert import write_gguf

from .tiny import make_tiny


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    make_tiny("llama", d)
    return d


@pytest.fixture(scope="module")
def tiny_gguf(tiny_dir, tmp_path_factory):
    return write_gguf(tiny_dir, tmp_path_factory.mktemp("gguf") / "tiny.gguf", "Q8_0")


def copy_dir(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_truncated_gguf(tiny_gguf, tmp_path):
    data = tiny_gguf.read_bytes()
    for cut in (10, len(data) // 3, len(data) - 100):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated"):
            hybrid.load(bad)


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"this is not a model" * 10)
    with pytest.raises(CheckpointError, match="no GGUF magic number"):
        hybrid.load(bad)


def test_unknown_architecture_lists_supported(tmp_path):
    from gguf import GGUFWriter

    path = tmp_path / "rwkv.gguf"
    w = GGUFWriter(str(path), "rwkv6")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match=r"architecture 'rwkv6' is not supported; supported GGUF architectures: .*llama.*qwen2moe"):
        hybrid.load(path)


def test_unknown_model_type_lists_supported(tiny_dir, tmp_path):
    d = copy_dir(tiny_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model_type 'gpt_neox' is not supported; supported: deepseek_v2, .*qwen3_moe"):
        hybrid.load(d)


def test_missing_shard(tiny_dir, tmp_path):
    d = copy_dir(tiny_dir, tmp_path / "m")
    tensors = load_file(str(d / "model.safetensors"))
    names = sorted(tensors)
    save_file({n: tensors[n] for n in names[:5]}, str(d / "model-00001-of-00002.safetensors"))
    save_file({n: tensors[n] for n in names[5:]}, str(d / "model-00002-of-00002.safetensors"))
    (d / "model.safetensors").unlink()
    index = {"weight_map": {n: "model-00001-of-00002.safetensors" if i < 5 else "model-00002-of-00002.safetensors" for i, n in enumerate(names)}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    assert hybrid.load(d, rules="torch-cpu").logits([1, 2]).shape == (2, 256)  # sharded loads
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing shard.*model-00002-of-00002.safetensors"):
        hybrid.load(d)


def test_missing_split_gguf_part(tiny_gguf, tmp_path):
    first = tmp_path / "tiny-00001-of-00002.gguf"
    shutil.copy(tiny_gguf, first)
    with pytest.raises(CheckpointError, match="split GGUF is missing tiny-00002-of-00002.gguf"):
        hybrid.load(first)


def test_mis_shaped_tensor(tiny_dir, tmp_path):
    d = copy_dir(tiny_dir, tmp_path / "m")
    tensors = load_file(str(d / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:-1].clone()
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"tensor model.layers.1.mlp.up_proj.weight has shape \[95, 64\], the model expects \[96, 64\]"):
        hybrid.load(d, rules="torch-cpu")


def test_missing_and_unexpected_tensors(tiny_dir, tmp_path):
    d = copy_dir(tiny_dir, tmp_path / "m")
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["model.layers.0.self_attn.k_proj.weight"]
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="tensor model.layers.0.self_attn.k_proj.weight is missing"):
        hybrid.load(d, rules="torch-cpu")
    tensors = load_file(str(tiny_dir / "model.safetensors"))
    tensors["model.layers.0.extra.weight"] = tensors["model.norm.weight"].clone()
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected tensor.*model.layers.0.extra.weight"):
        hybrid.load(d, rules="torch-cpu")


def test_directory_with_nothing_loadable(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="nothing loadable here"):
        hybrid.load(tmp_path)


def test_config_without_weights(tiny_dir, tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(tiny_dir / "config.json", d)
    with pytest.raises(CheckpointError, match="no \\*.safetensors weights"):
        hybrid.load(d)


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or directory"):
        hybrid.load(tmp_path / "nope.gguf")


def test_directory_holding_one_gguf_loads(tiny_gguf, tmp_path):
    d = tmp_path / "dir"
    d.mkdir()
    shutil.copy(tiny_gguf, d / "model.gguf")
    assert hybrid.load(d).logits([3, 4, 5]).shape == (3, 256)
