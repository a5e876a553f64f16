"""The built-in model (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers reading the
same file."""

import os

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
