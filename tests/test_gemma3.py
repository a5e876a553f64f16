"""Gemma 3: a tiny random model against transformers through decode steps and batched
decode of sequences of mixed lengths, all longer than its sliding window; the sliding
layers' ring cache; and the real Gemma 3 270M (Q4_K_M GGUF) against transformers reading
the same file, a golden greedy continuation and `hybrid run`."""

import os
import subprocess
import sys

import pytest
import torch

import hybrid
from hybrid.models.common import KVCache, SlidingKVCache

from .tiny import make_tiny, reference_logits, rel_err

pytestmark = pytest.mark.usefixtures("cpu_machine")

IDS = [int(i) for i in torch.randint(0, 256, (41,), generator=torch.Generator().manual_seed(3))]
WINDOW = 8  # the tiny model's sliding_window (tests/tiny.py)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gemma3")
    return directory, make_tiny("gemma3_text", directory)


@pytest.mark.parametrize("rules", ["torch-cpu", "gemma3-cpu"])
def test_decode_steps_match_transformers(tiny, rules):
    """A 5-token prefill, then one token a step to 41 tokens (window 8): each step's logits."""
    directory, ref_model = tiny
    ref = reference_logits(ref_model, IDS)
    model = hybrid.load(directory, rules=rules)
    ids = torch.tensor([IDS])
    cache = model.new_cache(1, 64)
    out = [model.forward(ids[:, :5], [0], [0], cache)[0]]
    for t in range(5, len(IDS)):
        out.append(model.forward(ids[:, t : t + 1], [t], [0], cache)[0])
    assert rel_err(torch.cat(out), ref) < 1e-4


@pytest.mark.parametrize("rules", ["torch-cpu", "gemma3-cpu"])
def test_batched_decode_with_mixed_lengths(tiny, rules):
    """Three sequences (prompts of 30, 11 and 3 tokens, in slots 2, 0, 1) prefilled one by
    one, then decoded together for 6 steps, then two more prefilled in one batched call:
    every sequence's logits are its own reference's."""
    directory, ref_model = tiny
    model = hybrid.load(directory, rules=rules)
    seqs = [IDS[:39], IDS[1:21], IDS[5:15]]
    prompt_lens, slots = [30, 11, 3], [2, 0, 1]
    cache = model.new_cache(3, 64)
    got = [[] for _ in seqs]
    for b, (seq, n, slot) in enumerate(zip(seqs, prompt_lens, slots)):
        got[b].append(model.forward(torch.tensor([seq[:n]]), [0], [slot], cache)[0])
    for step in range(6):
        tokens = torch.tensor([[seq[n + step]] for seq, n in zip(seqs, prompt_lens)])
        logits = model.forward(tokens, [n + step for n in prompt_lens], slots, cache)
        for b in range(3):
            got[b].append(logits[b])
    # two rows of 3 new tokens at different starts in one call (a padded batched prefill)
    rows = [0, 1]
    tokens = torch.tensor([seqs[b][prompt_lens[b] + 6 : prompt_lens[b] + 9] for b in rows])
    logits = model.forward(tokens, [prompt_lens[b] + 6 for b in rows], [slots[b] for b in rows], cache)
    for b in rows:
        got[b].append(logits[b])
    for b, seq in enumerate(seqs):
        mine = torch.cat(got[b])
        assert rel_err(mine, reference_logits(ref_model, seq[: len(mine)])) < 1e-4, b


def test_sliding_layers_keep_only_their_window(tiny):
    directory, _ = tiny
    model = hybrid.load(directory, rules="torch-cpu")
    cache = model.new_cache(4, 512)
    cfg = model.config
    kinds = [type(c) for c in cache]
    assert kinds == [SlidingKVCache] * 5 + [KVCache]
    assert all(c.k.shape == (4, cfg.num_key_value_heads, WINDOW, cfg.head_dim) for c in cache[:5])
    assert cache[5].k.shape == (4, cfg.num_key_value_heads, 512, cfg.head_dim)
    per_position = cfg.num_key_value_heads * 2 * cfg.head_dim * 4  # k and v, float32
    assert model.module.cache_bytes(512, model.placement) == per_position * (5 * WINDOW + 512)
    with pytest.raises(ValueError, match="does not fit"):
        model.forward(torch.zeros(1, 3, dtype=torch.long), [511], [0], cache)


# ------------------------------------------------------------------ Gemma 3 270M

PROMPT = "The capital of France is Paris. The capital of Germany is"
GOLDEN = " Berlin. The capital of the United States is Washington, D.C.\n\nThe capital of the United Kingdom is London"
GOLDEN_TOKENS = [15687, 236761, 669, 5279, 529, 506, 3640, 4184, 563, 7693, 236764, 622, 236761, 236780, 236761, 108,
                 818, 5279, 529, 506, 3640, 15305, 563, 5860]


@pytest.fixture(scope="module")
def reference_270m(gemma3_path):
    from transformers import AutoModelForCausalLM

    directory, name = os.path.split(gemma3_path)
    tok = hybrid.load(gemma3_path, rules="torch-cpu").tokenizer
    ids = tok.encode(PROMPT, add_special_tokens=True)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    with torch.no_grad():
        return ids, model(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("rules", ["torch-cpu", None])
def test_270m_logits_match_transformers_on_the_same_gguf(gemma3_path, reference_270m, rules):
    ids, ref = reference_270m
    logits = hybrid.load(gemma3_path, rules=rules).logits(ids)
    assert logits.shape == ref.shape
    assert rel_err(logits, ref) < 1e-3


def test_270m_greedy_continuation_is_golden(gemma3_path):
    """Recorded from hybrid under gemma3-cpu; the same tokens as the argmax of a full
    forward pass at every step (whose logits match transformers above)."""
    model = hybrid.load(gemma3_path)
    events = list(model.generate(PROMPT, temperature=0, max_tokens=24))
    assert [e.token for e in events] == GOLDEN_TOKENS
    assert "".join(e.text for e in events) == GOLDEN


def test_hybrid_run_answers(gemma3_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "hybrid", "run", "--model", gemma3_path, "--raw", "--prompt", PROMPT,
                        "--temperature", "0", "--max-tokens", "8"], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(" Berlin.")
