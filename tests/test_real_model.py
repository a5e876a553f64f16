"""The built-in model (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers reading the
same file, and the memory a quantized load takes."""

import json
import os
import subprocess
import sys

import pytest
import torch

import hybrid

from .tiny import rel_err

MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def reference(smollm_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = os.path.split(smollm_path)
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    return ids, logits


@pytest.mark.parametrize("rules", ["torch-cpu", None])
def test_logits_match_transformers_on_the_same_gguf(smollm_path, reference, rules):
    ids, ref = reference
    logits = hybrid.load(smollm_path, rules=rules).logits(ids)
    assert logits.shape == ref.shape
    assert rel_err(logits, ref) < 1e-3


def test_quantized_load_stays_close_to_file_size(smollm_path):
    """Peak resident memory added by loading (CPU rules: blocks stay memory-mapped)."""
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "load_memory.py")
    out = subprocess.run([sys.executable, script, smollm_path, "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["peak_added_bytes"] < 1.3 * report["file_bytes"], report
