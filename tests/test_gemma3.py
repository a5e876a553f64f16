"""Gemma 3: the sliding layers' ring cache on a tiny random model (its decode steps and
batched decode against transformers are in test_family_decode.py), and the real Gemma 3
270M (Q4_K_M GGUF) against transformers reading the same file, a golden greedy
continuation, `hybrid run` and `hybrid rules`."""

import os
import subprocess
import sys

import pytest
import torch

import hybrid
from hybrid.models.common import KVCache, SlidingKVCache
from hybrid.operators import CPUAttention

from .tiny import make_tiny, rel_err

pytestmark = pytest.mark.usefixtures("cpu_machine")

WINDOW = 8  # the tiny model's sliding_window (tests/tiny.py)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gemma3")
    return directory, make_tiny("gemma3_text", directory)


def test_sliding_layers_keep_only_their_window(tiny):
    directory, _ = tiny
    model = hybrid.load(directory, rules="torch-cpu")
    cache = model.new_cache(4, 4096)
    cfg = model.config
    kinds = [type(c) for c in cache]
    assert kinds == [SlidingKVCache] * 5 + [KVCache]
    rows = WINDOW + SlidingKVCache.PAD_ROOM  # room for a batched prefill's end padding
    assert all(c.k.shape == (4, cfg.num_key_value_heads, rows, cfg.head_dim) for c in cache[:5])
    assert cache[5].k.shape == (4, cfg.num_key_value_heads, 4096, cfg.head_dim)
    per_position = cfg.num_key_value_heads * 2 * cfg.head_dim * 4  # k and v, float32
    assert model.module.cache_bytes(4096, model.placement) == per_position * (5 * rows + 4096)
    assert [c.k.shape[2] for c in model.new_cache(1, 100)] == [100] * 6  # never more than the context
    with pytest.raises(ValueError, match="does not fit"):
        model.forward(torch.zeros(1, 3, dtype=torch.long), [4095], [0], cache)


def test_decode_kernel_reads_the_ring_past_its_wrap(tiny):
    """Under the family's CPU rules the decode steps' attention is the numba kernel
    (CPUAttention) on the sliding layers' rings too: 500 tokens prefilled, then decode steps
    over position 520 (a ring of 8 + PAD_ROOM rows wraps there): each step's logits those
    of torch-cpu on the same weights."""
    directory, _ = tiny
    kernel, torch_model = hybrid.load(directory), hybrid.load(directory, rules="torch-cpu")
    layers = kernel.module.model.layers
    assert all(isinstance(layer.self_attn, CPUAttention) for layer in layers)
    assert [layer.self_attn.sliding_window for layer in layers] == [WINDOW] * 5 + [None]
    ids = torch.randint(0, 256, (1, 530), generator=torch.Generator().manual_seed(5))
    caches = [m.new_cache(1, 600) for m in (kernel, torch_model)]
    assert caches[0][0].k.shape[2] == WINDOW + SlidingKVCache.PAD_ROOM == 520
    for model, cache in zip((kernel, torch_model), caches):
        model.forward(ids[:, :500], [0], [0], cache)
    for t in range(500, 530):
        got, want = (m.forward(ids[:, t : t + 1], [t], [0], c) for m, c in zip((kernel, torch_model), caches))
        assert rel_err(got, want) < 1e-4, t


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




def test_rules_command_states_the_kv_cache_per_slot(gemma3_path, capsys):
    """Gemma 3 270M: 18 layers of 1 KV head of 256, float32; 15 sliding layers hold their
    512 positions (+ PAD_ROOM), 3 full ones the whole 32768."""
    import json

    from hybrid.cli import main as cli

    assert cli.main(["rules", "--model", gemma3_path, "--json"]) == 0
    kv = json.loads(capsys.readouterr().out)["kv_cache"]
    per_position = 1 * 2 * 256 * 4
    rows = 512 + SlidingKVCache.PAD_ROOM
    assert kv == {"context": 32768, "bytes_per_slot": per_position * (15 * rows + 3 * 32768), "sliding_layers": 15,
                  "recurrent_layers": 0, "layers": 18}
