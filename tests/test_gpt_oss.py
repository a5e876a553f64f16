"""gpt-oss: MXFP4 expert weights (as gpt-oss GGUF files hold them) load as gguf's
dequantization of their blocks, and the model computes with them what transformers
computes with the same rounded weights. (Logits, decode and batched decode against
transformers on float weights are in test_families.py and test_family_decode.py.)"""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

import hybrid
from hybrid.files.checkpoint import open_gguf
from hybrid.writers.convert import write_gguf

from .tiny import make_tiny, reference_logits, rel_err

IDS = [int(i) for i in torch.randint(0, 256, (37,), generator=torch.Generator().manual_seed(5))]


def mxfp4_round_trip(w: np.ndarray) -> np.ndarray:
    """w [..., n] rounded to MXFP4 along its last axis, as gguf quantizes it."""
    return dequantize(quantize(np.ascontiguousarray(w, dtype=np.float32), Q.MXFP4), Q.MXFP4).reshape(w.shape)


@pytest.fixture(scope="module")
def mxfp4_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gpt_oss")
    ref = make_tiny("gpt_oss", directory)
    path = write_gguf(directory, directory / "mxfp4.gguf", "F32", experts_qtype="MXFP4")
    return ref, path


def test_mxfp4_experts_are_gguf_dequantized(mxfp4_model):
    _, path = mxfp4_model
    stored = {t.name: t for t in open_gguf(path).tensors}
    assert stored["blk.0.ffn_gate_exps.weight"].qtype == Q.MXFP4
    model = hybrid.load(path, rules="torch-cpu")
    for proj in ("gate", "up", "down"):
        t = stored[f"blk.1.ffn_{proj}_exps.weight"]
        expected = dequantize(np.asarray(t.data), Q.MXFP4).reshape(t.shape)
        got = getattr(model.module.model.layers[1].mlp.experts, f"{proj}_proj").detach().numpy()
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("rules", ["torch-cpu", "gpt_oss-cpu"])
def test_mxfp4_logits_match_transformers_with_the_same_rounding(mxfp4_model, rules):
    ref_model, path = mxfp4_model
    with torch.no_grad():  # round the reference's experts as the file rounds ours ([E, out, in] rows)
        for layer in ref_model.model.layers:
            ex = layer.mlp.experts
            gate_up = ex.gate_up_proj.numpy()  # [E, H, 2I], gate in the even columns
            for half in (0, 1):
                ours = gate_up[:, :, half::2].transpose(0, 2, 1)  # [E, I, H]
                gate_up[:, :, half::2] = mxfp4_round_trip(ours).transpose(0, 2, 1)
            ex.gate_up_proj.copy_(torch.from_numpy(gate_up))
            down = ex.down_proj.numpy().transpose(0, 2, 1)  # [E, H, I]
            ex.down_proj.copy_(torch.from_numpy(mxfp4_round_trip(down).transpose(0, 2, 1).copy()))
    ref = reference_logits(ref_model, IDS)
    assert rel_err(hybrid.load(path, rules=rules).logits(IDS), ref) < 1e-4


def test_cpu_rules_compute_the_mxfp4_blocks_as_stored(mxfp4_model):
    """gpt_oss-cpu places CPUExperts: the experts stay MXFP4 blocks (the file's bytes, not a
    float copy) with their biases and clamped SwiGLU, and decode steps give the logits the
    torch experts give on the dequantized weights."""
    _, path = mxfp4_model
    stored = {t.name: t for t in open_gguf(path).tensors}
    model = hybrid.load(path, rules="gpt_oss-cpu")
    experts = model.module.model.layers[1].mlp.experts
    assert type(experts).__name__ == "CPUExperts" and experts.has_bias and experts.glu is not None
    qtype, blocks = experts.gate
    assert Q(qtype) == Q.MXFP4 and blocks.dtype == np.uint8
    np.testing.assert_array_equal(blocks.reshape(-1), np.asarray(stored["blk.1.ffn_gate_exps.weight"].data).reshape(-1))
    torch_model = hybrid.load(path, rules="torch-cpu")
    ids = torch.tensor([IDS])
    out = {}
    for name, m in (("cpu", model), ("torch", torch_model)):
        cache = m.new_cache(1, 64)
        steps = [m.forward(ids[:, :5], [0], [0], cache)[0]]
        for t in range(5, 12):
            steps.append(m.forward(ids[:, t : t + 1], [t], [0], cache)[0])
        out[name] = torch.cat(steps)
    assert rel_err(out["cpu"], out["torch"]) < 1e-4
