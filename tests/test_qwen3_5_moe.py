"""Qwen3.5 MoE beyond the family runner (test_families.py, test_family_decode.py): the
checkpoint forms it loads (the multimodal checkpoint's text model, fused experts), its
recurrent state only going forward, and the engine serving it: the prefix cache off,
batched prefill with padding and batched decode giving transformers' greedy tokens."""

import json

import pytest
import torch
from safetensors.torch import save_file

import hybrid
from hybrid.engine.sampling import SamplingParams
from hybrid.engine.scheduler import Engine

from .tiny import COMMON, TINY, add_byte_tokenizer, make_tiny, reference_logits, rel_err

pytestmark = pytest.mark.usefixtures("cpu_machine")

IDS = [int(i) for i in torch.randint(0, 256, (29,), generator=torch.Generator().manual_seed(7))]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen3_5_moe")
    return directory, make_tiny("qwen3_5_moe", directory)


def test_the_multimodal_checkpoints_text_model_loads(tmp_path):
    """Qwen3_5MoeForConditionalGeneration (how Qwen3.5 is published): config nested under
    text_config, weights under model.language_model, a vision tower that is dropped."""
    import transformers

    text = {**COMMON, **TINY["qwen3_5_moe"][2]}
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
                  num_position_embeddings=16)
    torch.manual_seed(0)
    ref = transformers.Qwen3_5MoeForConditionalGeneration(
        transformers.Qwen3_5MoeConfig(text_config=text, vision_config=vision)).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.1)
    ref.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "qwen3_5_moe"
    for rules in ("torch-cpu", None):
        assert rel_err(hybrid.load(tmp_path, rules=rules).logits(IDS), reference_logits(ref, IDS)) < 1e-4


def test_fused_experts_checkpoint_loads(tiny, tmp_path):
    """Experts stored as transformers 5 holds them: gate_up_proj [E, 2I, H], down_proj [E, H, I]."""
    directory, ref = tiny
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    assert rel_err(hybrid.load(tmp_path, rules="torch-cpu").logits(IDS), reference_logits(ref, IDS)) < 1e-4


def test_a_recurrent_state_only_goes_forward(tiny):
    directory, _ = tiny
    model = hybrid.load(directory, rules="torch-cpu")
    ids = torch.tensor([IDS[:12]])
    cache = model.new_cache(2, 32)
    first = model.forward(ids, [0], [1], cache)
    model.forward(ids[:, :4], [12], [1], cache)
    with pytest.raises(ValueError, match=r"slot 1's recurrent state holds positions 0\.\.15; a step cannot start at 8"):
        model.forward(ids[:, :4], [8], [1], cache)
    # starting at 0 starts the slot afresh
    torch.testing.assert_close(model.forward(ids, [0], [1], cache), first, rtol=0, atol=0)


def greedy_reference(ref_model, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(ref_model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]


def test_engine_serves_it_with_the_prefix_cache_off(tiny, caplog):
    """Prompts of 13 and 21 tokens prefilled in chunks of 8 (the shorter one padded in a
    shared forward, then decoding while the other still prefills), two slots decoding
    together: each gets transformers' greedy tokens. The prefix cache asked for is off."""
    directory, ref_model = tiny
    add_byte_tokenizer(directory)
    model = hybrid.load(directory)
    engine = Engine(model, slots=2, ctx=64, prefill_chunk=8, prefix_cache=8 << 20, prefix_block=4)
    assert engine.prefix.stats()["budget_bytes"] == 0
    assert "prefix cache off" in caplog.text
    prompts = [IDS[:13], IDS[2:23]]
    for _ in range(2):  # twice: a slot used before starts afresh
        streams = [engine.submit(p, SamplingParams(temperature=0, max_tokens=6)) for p in prompts]
        got = [[e.token for e in s if e.token is not None] for s in streams]
        assert got == [greedy_reference(ref_model, p, 6) for p in prompts]
    assert engine.prefix.stats()["hits"] == 0


def test_rules_plan_counts_the_recurrent_state_once_per_slot(tiny, capsys):
    """Layer 3's KV cache grows with tokens (2 heads x (32 + 32) x float32 = 512 B each); the
    three DeltaNet layers' state does not (conv 192 channels x 3 taps + 4 heads x 16 x 32,
    float32 = 10,496 B each), and the prefix cache is off."""
    from hybrid.cli import main as cli

    directory, _ = tiny
    assert cli.main(["rules", "--model", str(directory), "--rules", "qwen3_5_moe-cpu", "--json", "--slots", "2",
                     "--ctx", "100"]) == 0
    plan = json.loads(capsys.readouterr().out)
    state = 3 * 4 * (192 * 3 + 4 * 16 * 32)
    assert plan["kv_cache"]["recurrent_layers"] == 3 and plan["kv_cache"]["bytes_per_slot"] == 512 * 512 + state
    assert plan["prefix_cache"]["budget_bytes"] == 0
    rss = plan["expected_rss"]
    assert (rss["kv_bytes_per_token"], rss["state_bytes_per_slot"]) == (512, state)
    assert rss["kv_full_bytes"] - rss["at_start_bytes"] == (512 * 100 + state) * 2


def test_gguf_with_the_multi_token_prediction_layer_loads_without_it(tiny, tmp_path):
    """llama.cpp's converter writes Qwen3.5's MTP layer as one more block (block_count + 1,
    nextn_predict_layers 1: its layer's tensors and blk.N.nextn.*); decoding does not use it."""
    import gguf
    import numpy as np

    from hybrid.writers.convert import write_gguf

    directory, ref = tiny
    plain = gguf.GGUFReader(write_gguf(directory, tmp_path / "plain.gguf", "F32"))
    writer = gguf.GGUFWriter(str(tmp_path / "mtp.gguf"), "qwen35moe")
    for name, f in plain.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = f.contents() + 1 if name == "qwen35moe.block_count" else f.contents()
        writer.add_key_value(name, value, f.types[0], f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None)
    writer.add_uint32("qwen35moe.nextn_predict_layers", 1)
    for t in plain.tensors:
        writer.add_tensor(t.name, np.asarray(t.data))
    writer.add_tensor("blk.4.attn_norm.weight", np.ones(64, np.float32))
    writer.add_tensor("blk.4.nextn.eh_proj.weight", np.ones((64, 128), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    model = hybrid.load(tmp_path / "mtp.gguf", rules="torch-cpu")
    assert model.config.num_hidden_layers == 4
    assert rel_err(model.logits(IDS), reference_logits(ref, IDS)) < 1e-4
