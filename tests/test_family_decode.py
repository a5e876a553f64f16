"""Decode steps and batched decode of sequences of mixed lengths against transformers, for
the families whose attention is not the numba decode kernel's (sliding windows, partial
rotary, sinks) or who have recurrent layers (Qwen3.5's gated DeltaNet, whose state per
slot must follow each sequence and leave padding out): tiny random models, prompts longer
than their sliding windows, under torch-cpu and the family's CPU rule file (rules=None)."""

import pytest
import torch

import hybrid

from .tiny import make_tiny, reference_logits, rel_err

pytestmark = pytest.mark.usefixtures("cpu_machine")

IDS = [int(i) for i in torch.randint(0, 256, (41,), generator=torch.Generator().manual_seed(3))]


@pytest.fixture(scope="module", params=["gemma3_text", "glm4_moe", "gpt_oss", "qwen3_5_moe"])
def tiny(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    return directory, make_tiny(request.param, directory)


@pytest.mark.parametrize("rules", ["torch-cpu", None])
def test_decode_steps_match_transformers(tiny, rules):
    """A 5-token prefill, then one token a step to 41 tokens (Gemma 3's window: 8): each step's logits."""
    directory, ref_model = tiny
    ref = reference_logits(ref_model, IDS)
    model = hybrid.load(directory, rules=rules)
    ids = torch.tensor([IDS])
    cache = model.new_cache(1, 64)
    out = [model.forward(ids[:, :5], [0], [0], cache)[0]]
    for t in range(5, len(IDS)):
        out.append(model.forward(ids[:, t : t + 1], [t], [0], cache)[0])
    assert rel_err(torch.cat(out), ref) < 1e-4


@pytest.mark.parametrize("rules", ["torch-cpu", None])
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




def test_padded_batched_prefill_then_decode(tiny):
    """As the engine's batched prefill does: a row shorter than the call is padded at its
    end (its logits taken at its last real token); the padding must not clobber keys the
    row still needs (sliding windows: 8, padding 5, at position 20)."""
    directory, ref_model = tiny
    model = hybrid.load(directory, rules="torch-cpu")
    cache = model.new_cache(2, 64)
    a, b = IDS[:30], IDS[3:40]
    model.forward(torch.tensor([a[:20]]), [0], [0], cache)
    model.forward(torch.tensor([b[:20]]), [0], [1], cache)
    tokens = torch.tensor([a[20:23] + a[22:23] * 5, b[20:28]])  # row 0: 3 real tokens + 5 padding
    first = model.forward(tokens, [20, 20], [0, 1], cache, keep=[2, 7])
    got_a, got_b = [first[0]], [first[1]]
    for t in range(6):
        logits = model.forward(torch.tensor([[a[23 + t]], [b[28 + t]]]), [23 + t, 28 + t], [0, 1], cache)
        got_a.append(logits[0])
        got_b.append(logits[1])
    assert rel_err(torch.cat(got_a), reference_logits(ref_model, a[:29])[22:29]) < 1e-4
    assert rel_err(torch.cat(got_b), reference_logits(ref_model, b[:34])[27:34]) < 1e-4
