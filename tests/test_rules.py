"""The rules engine: matching, placement, validation with rule numbers and lines, and
`hybrid rules` plans."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import hybrid
from hybrid.inject.placement import RuleError, builtin_rules_dir, parse_rules, plan


class Leaf(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)


def tree() -> nn.Module:
    root = nn.Module()
    root.a = Leaf()
    root.b = Leaf()
    root.b.inner = Leaf()
    root.norm = nn.LayerNorm(4)
    return root


def placed(rules_yaml: str) -> dict:
    placements, counts = plan(tree(), parse_rules(rules_yaml))
    return {p.path: p for p in placements}, counts


def test_first_match_wins_and_unmatched_inherit():
    p, counts = placed(
        """
default_device: cpu
dtype: bfloat16
rules:
  - match: {name: 'b'}
    replace: {class: default, kwargs: {dtype: float32}}
  - match: {name: 'b|a'}
    replace: {class: default, kwargs: {dtype: float16}}
"""
    )
    assert p["b"].rule.index == 1 and p["b"].dtype == torch.float32
    assert p["a"].rule.index == 2 and p["a"].dtype == torch.float16
    assert p["b.inner.proj"].rule is None and p["b.inner.proj"].dtype == torch.float32  # inherited
    assert p["norm"].dtype == torch.bfloat16  # the file's default
    assert counts == {1: 1, 2: 1}


def test_name_is_matched_against_the_whole_path():
    p, counts = placed("rules:\n  - match: {name: 'proj'}\n    replace: {class: default, kwargs: {dtype: float16}}\n")
    assert counts[1] == 0  # 'a.proj' does not fullmatch 'proj' (no silent partial matches)
    p, counts = placed("rules:\n  - match: {name: '.*proj'}\n    replace: {class: default, kwargs: {dtype: float16}}\n")
    assert counts[1] == 3


def test_class_matching_by_name_and_import_path():
    _, counts = placed("rules:\n  - match: {class: Linear}\n")
    assert counts[1] == 3
    _, counts = placed("rules:\n  - match: {class: torch.nn.modules.normalization.LayerNorm}\n")
    assert counts[1] == 1
    _, counts = placed("rules:\n  - match: {class: Leaf, name: 'b.*'}\n")
    assert counts[1] == 2


def test_recursive_false_stops_descending():
    p, _ = placed(
        """
rules:
  - match: {name: 'b'}
    replace: {class: default, kwargs: {dtype: float16}}
    recursive: false
  - match: {class: Linear}
    replace: {class: default, kwargs: {dtype: bfloat16}}
"""
    )
    assert "b.proj" not in p and "b.inner" not in p  # b's subtree is not visited: all of it follows b
    assert p["a.proj"].dtype == torch.bfloat16


def test_unmatched_rule_warns(caplog):
    placed("rules:\n  - match: {name: 'nothing\\.here'}\n")
    assert "rule 1 (line 2) matches no module" in caplog.text


@pytest.mark.parametrize(
    "text, message",
    [
        ("rules:\n  - match: {name: a}\n    replace: {class: default}\n    colour: red\n", "rule 1 (line 2): unknown key(s) ['colour']"),
        ("rules:\n  - match: {name: a}\n  - match: {name: '(unclosed'}\n", "rule 2 (line 3): invalid regex"),
        ("rules:\n  - match: {name: a}\n    replace: {class: NoSuchOperator}\n", "rule 1 (line 2): unknown operator 'NoSuchOperator'"),
        ("rules:\n  - match: {name: a}\n    replace: {class: CPULinear, kwargs: {colour: 1}}\n", "rule 1 (line 2): operator CPULinear does not accept ['colour']"),
        ("rules:\n  - match: {name: a}\n    replace: {class: CPULinear, kwargs: {quant: q3_weird}}\n", "rule 1 (line 2): quant 'q3_weird' is not supported"),
        ("rules:\n  - match: {naem: a}\n", "rule 1 (line 2): 'match' needs 'name'"),
        ("rules:\n  - match: {name: a}\n    replace: {class: default, kwargs: {device: tpu}}\n", "rule 1 (line 2): 'tpu' is not a device name"),
        ("rules: {}\n", "expected a mapping with a 'rules' list"),
        ("rulez: []\n", "expected a mapping with a 'rules' list"),
        ("default_device: cpu\ndtype: float8\nrules: []\n", "dtype 'float8'"),
        ("cudnn_attention: off-ish\nrules: []\n", "cudnn_attention must be true or false, not 'off-ish'"),
        ("torch_threads: 0\nrules: []\n", "torch_threads must be a whole number of threads, 1 or more, not 0"),
        ("torch_threads: two\nrules: []\n", "torch_threads must be a whole number of threads, 1 or more, not 'two'"),
        ("torch_threads: true\nrules: []\n", "torch_threads must be a whole number of threads, 1 or more, not True"),
        ("rules:\n  - match: {name: a}\n    replace: {class: CPUExperts, kwargs: {threads: quarter}}\n",
         "rule 1 (line 2): CPUExperts: threads must be a positive integer or 'half', not 'quarter'"),
        ("rules:\n  - match: {name: a}\n    replace: {class: CPUDecoderStack, kwargs: {device: 'cuda:0'}}\n",
         "rule 1 (line 2): CPUDecoderStack runs on the CPU"),
    ],
)
def test_validation_errors_name_rule_and_line(text, message):
    with pytest.raises(RuleError) as e:
        parse_rules(text)
    assert message in str(e.value)


def test_operator_that_does_not_fit_its_module():
    with pytest.raises(RuleError, match=r"rule 1 \(line 2\): operator CPUExperts replaces Experts, but a is a Leaf"):
        placed("rules:\n  - match: {name: a}\n    replace: {class: CPUExperts}\n")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_rule_on_cpu_machine_names_the_cpu_file():
    with pytest.raises(RuleError, match=r"llama-gpu.yaml: default_device: device 'cuda:0' but this machine has no CUDA device; use the CPU rule file instead: --rules llama-cpu"):
        parse_rules("llama-gpu")


def test_every_builtin_file_parses_or_needs_cuda():
    files = sorted(builtin_rules_dir().glob("*.yaml"))
    assert {f.stem for f in files} >= {f"{fam}-{kind}" for fam in ("llama", "mixtral", "qwen_moe", "deepseek") for kind in ("cpu", "gpu", "multi-gpu")}
    for f in files:
        if "gpu" in f.stem and not torch.cuda.is_available():
            with pytest.raises(RuleError, match="no CUDA device"):
                parse_rules(f)
        elif "multi-gpu" in f.stem and torch.cuda.device_count() < 2:
            with pytest.raises(RuleError, match=r"device 'cuda:1' but this machine has 1 CUDA device\(s\)"):
                parse_rules(f)
        else:
            parse_rules(f)


def test_every_builtin_file_that_places_kernels_sets_torch_threads():
    """Files that place a numba operator give torch one thread (`torch_threads: 1`); the
    others say nothing, so loading under them leaves torch's thread count alone."""
    import yaml

    numba_operators = {"CPULinear", "CPUEmbedding", "CPUExperts", "CPUAttention", "CPUMLP", "CPURMSNorm",
                       "CPUDecoderLayer", "CPUDecoderStack", "SplitExperts"}
    kinds = set()
    for f in sorted(builtin_rules_dir().glob("*.yaml")):
        data = yaml.safe_load(f.read_text())
        places = any((r.get("replace") or {}).get("class") in numba_operators for r in data["rules"])
        assert data.get("torch_threads") == (1 if places else None), f.name
        kinds.add(places)
    assert kinds == {True, False}


def test_only_a_rule_file_that_says_so_sets_torch_threads(tiny_moe_gguf, caplog):
    text = (builtin_rules_dir() / "mixtral-cpu.yaml").read_text()
    assert "torch_threads: 1\n" in text
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with caplog.at_level("WARNING"):
            hybrid.load(tiny_moe_gguf, rules=text.replace("torch_threads: 1\n", ""))
        assert torch.get_num_threads() == 2
        assert "sets no torch_threads: torch keeps 2 threads" in caplog.text
        hybrid.load(tiny_moe_gguf, rules=text)
        assert torch.get_num_threads() == 1
        hybrid.load(tiny_moe_gguf, rules=text.replace("torch_threads: 1\n", "torch_threads: 2\n"))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_unknown_rule_file_lists_builtins():
    with pytest.raises(RuleError, match="built-in rule files: .*llama-cpu"):
        parse_rules("no-such-rules")


def test_inject_swaps_in_memory_modules_and_keeps_results():
    torch.manual_seed(0)
    root = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 64))
    x = torch.randn(3, 64)
    want = root(x)
    placements = hybrid.inject(root, "rules:\n  - match: {name: '0|2'}\n    replace: {class: CPULinear}\n")
    assert type(root[0]).__name__ == "CPULinear" and type(root[2]).__name__ == "CPULinear"
    assert {p.path for p in placements if p.operator} == {"0", "2"}
    torch.testing.assert_close(root(x), want, rtol=1e-5, atol=1e-5)


def run_cli(*args, env=None):
    env = None if env is None else {**os.environ, **env}
    return subprocess.run([sys.executable, "-m", "hybrid", *args], capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from .tiny import make_tiny

    d = tmp_path_factory.mktemp("llama")
    make_tiny("llama", d)
    return d


def test_rules_command_plan_and_byte_totals(tiny_llama):
    r = run_cli("rules", "--model", str(tiny_llama), "--rules", "llama-cpu", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    matches = {x["replace"]: x["matches"] for x in out["rules"]}
    # two layers as whole-layer operators (their norms, attention and MLP inside), the final
    # norm; lm_head is the one Linear left
    assert matches == {"CPUDecoderStack": 1, "CPUDecoderLayer": 2, "CPUEmbedding": 1, "CPURMSNorm": 1, "CPULinear": 1}
    stack = next(g for g in out["groups"] if g["operator"] == "CPUDecoderStack")
    assert stack["examples"] == ["model.layers"] and stack["bytes"] == 0  # the layers' bytes are theirs
    params = sum(t.numel() for t in __import__("safetensors.torch").torch.load_file(str(tiny_llama / "model.safetensors")).values())
    assert out["devices"][0]["device"] == "cpu" and out["devices"][0]["bytes"] == params * 4  # float32 checkpoint
    assert out["fits"] is True
    text = run_cli("rules", "--model", str(tiny_llama), "--rules", "llama-cpu")
    assert "CPULinear" in text.stdout and "fits" in text.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_rules_command_gpu_file_on_cpu_machine_fails_clearly(tiny_llama):
    r = run_cli("rules", "--model", str(tiny_llama), "--rules", "llama-gpu")
    assert r.returncode == 2
    assert "no CUDA device" in r.stderr and "--rules llama-cpu" in r.stderr and "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def tiny_moe_gguf(tmp_path_factory):
    from hybrid.writers.convert import write_gguf

    from .tiny import make_tiny

    d = tmp_path_factory.mktemp("mixtral")
    make_tiny("mixtral", d)
    return write_gguf(d, d / "moe.gguf", "Q8_0")


def test_rules_command_on_a_moe_model(tiny_moe_gguf):
    from hybrid.files.checkpoint import open_gguf

    r = run_cli("rules", "--model", str(tiny_moe_gguf), "--json", env={"CUDA_VISIBLE_DEVICES": ""})  # a CPU machine
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["rules_file"].endswith("mixtral-cpu.yaml")
    layers = next(g for g in out["groups"] if g["operator"] == "CPUDecoderLayer")
    stored = sum(t.data.nbytes for t in open_gguf(tiny_moe_gguf).tensors if t.name.startswith("blk."))
    assert layers["modules"] == 2 and layers["bytes"] == stored  # quantized blocks (experts too), as stored
    # every tensor is counted once: operators at their stored size, norms as float32
    total = sum(t.data.nbytes for t in open_gguf(tiny_moe_gguf).tensors)
    assert out["devices"][0]["bytes"] == total


def test_rules_command_exit_status_when_it_does_not_fit(tiny_moe_gguf, monkeypatch, capsys):
    from hybrid.cli import main as cli
    from hybrid.inject import plan

    monkeypatch.setattr(plan, "available_bytes", lambda device: 1000)
    assert cli.main(["rules", "--model", str(tiny_moe_gguf)]) == 1
    captured = capsys.readouterr()
    assert "NO" in captured.out and "does not fit" in captured.err


def test_rules_quantize_float_checkpoints_at_load(tmp_path):
    from .tiny import make_tiny, mean_kl, reference_logits

    ids = list(range(5, 40))
    ref = reference_logits(make_tiny("mixtral", tmp_path), ids)
    q8 = hybrid.load(tmp_path, rules="""
rules:
  - match: {name: 'model\\.layers\\.\\d+\\.block_sparse_moe\\.experts'}
    replace: {class: CPUExperts, kwargs: {quant: q8_0}}
  - match: {class: Linear, name: 'model\\.layers.*'}
    replace: {class: CPULinear, kwargs: {quant: q8_0}}
""")
    experts = q8.module.model.layers[0].block_sparse_moe.experts
    assert experts.gate[0].name == "Q8_0" and experts.gate[1].dtype.name == "uint8"
    assert mean_kl(q8.logits(ids), ref) < 1e-3
    q4 = hybrid.load(tmp_path, rules="rules:\n  - match: {class: Linear}\n    replace: {class: CPULinear, kwargs: {quant: q4_0}}\n")
    assert q4.module.lm_head.qtype.name == "Q4_0"
    assert mean_kl(q4.logits(ids), ref) < 2e-2  # 4-bit: coarser, still close


PREFILL_ON_CPU = """
rules:
  - match: {name: 'model\\.layers\\.\\d+\\.block_sparse_moe\\.experts'}
    replace: {class: CPUExperts, kwargs: {generate_device: cpu, prefill_device: cpu, prefill_min_tokens: 8}}
  - match: {class: Linear}
    replace: {class: CPULinear, kwargs: {prefill_device: cpu, prefill_min_tokens: 8}}
"""


def test_prefill_device_takes_long_calls_and_leaves_decode_to_the_kernels(tmp_path, monkeypatch):
    """prefill_device: calls of >= prefill_min_tokens tokens stream dequantized tiles to that
    device (here the CPU itself, the path a GPU takes) and give the same logits."""
    from hybrid.operators import offload

    from .tiny import make_tiny, reference_logits, rel_err

    ids = list(range(5, 25))
    ref = reference_logits(make_tiny("mixtral", tmp_path), ids)
    m = hybrid.load(tmp_path, rules=PREFILL_ON_CPU)
    streamed = []
    real = offload._weights
    monkeypatch.setattr(offload, "_weights", lambda q, w, d: streamed.append(w.shape) or real(q, w, d))
    assert rel_err(m.logits(ids[:12]), ref[:12]) < 1e-4  # one 12-token call: offloaded
    layers = m.config.num_hidden_layers
    assert len(streamed) >= layers * (4 + 3)  # q/k/v/o and at least one expert's gate/up/down per layer
    streamed.clear()
    cache = m.new_cache(1, 32)
    m.forward(torch.tensor([ids[:12]]), [0], [0], cache)
    streamed.clear()
    logits = [m.forward(torch.tensor([[t]]), [12 + i], [0], cache)[0, -1] for i, t in enumerate(ids[12:])]
    assert streamed == []  # decode stays on the numba kernels
    assert rel_err(torch.stack(logits), ref[12:]) < 1e-4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ("{generate_device: 'cuda:0'}", "CPUExperts keeps its weights in host RAM and decodes on the CPU; generate_device 'cuda:0' is not possible"),
        ("{prefill_min_tokens: 0}", "prefill_min_tokens must be a positive integer"),
        ("{prefill_device: gpu}", "rule 1 (line 2): prefill_device: 'gpu' is not a device name"),
    ],
)
def test_prefill_and_generate_device_validation(kwargs, message):
    with pytest.raises(RuleError) as e:
        parse_rules(f"rules:\n  - match: {{name: a}}\n    replace: {{class: CPUExperts, kwargs: {kwargs}}}\n")
    assert message in str(e.value) and "rule 1 (line 2)" in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_prefill_device_cuda_on_cpu_machine_fails_clearly():
    with pytest.raises(RuleError, match=r"rule 1 \(line 2\): prefill_device: device 'cuda:0' but this machine has no CUDA device"):
        parse_rules("rules:\n  - match: {name: a}\n    replace: {class: CPUExperts, kwargs: {prefill_device: 'cuda:0'}}\n")


def test_prefill_device_is_for_operators_only():
    with pytest.raises(RuleError, match=r"unknown key\(s\) \['prefill_device'\] in kwargs of 'default'"):
        parse_rules("rules:\n  - match: {name: a}\n    replace: {class: default, kwargs: {prefill_device: cpu}}\n")


STACK_RULE = "  - match: {name: 'model\\.layers', class: Layers}\n    replace: {class: CPUDecoderStack}\n"


def test_the_decode_stack_is_there_only_where_a_rule_places_it(tiny_llama):
    """The layer list becomes a `CPUDecoderStack` only under a rule that says so; the stack
    keeps the layers as its children (built after them, wherever its rule stands in the
    file), so their names, operators and prefill logits are those of a file without it."""
    from hybrid.models.common import Layers
    from hybrid.operators import CPUDecoderLayer, CPUDecoderStack

    text = (builtin_rules_dir() / "llama-cpu.yaml").read_text()
    assert STACK_RULE in text
    without = text.replace(STACK_RULE, "")
    models = {name: hybrid.load(tiny_llama, rules=rules) for name, rules in
              [("first", text), ("last", without + STACK_RULE), ("without", without)]}
    operators = {name: {p.path: p.operator for p in m.placements if p.operator} for name, m in models.items()}
    for name in ("first", "last"):
        assert type(models[name].module.model.layers) is CPUDecoderStack
        assert operators[name] == {**operators["without"], "model.layers": CPUDecoderStack}
    assert type(models["without"].module.model.layers) is Layers and "model.layers" not in operators["without"]
    names = [n for n, _ in models["without"].module.named_modules()]
    ids = [1, 5, 9, 200, 17, 3]
    for m in models.values():
        assert all(type(layer) is CPUDecoderLayer for layer in m.module.model.layers)
        assert [n for n, _ in m.module.named_modules()] == names  # model.layers.0.mlp... as before
        assert torch.equal(m.logits(ids), models["without"].logits(ids))


def test_a_gpu_rule_file_declares_what_the_gpu_needs(tiny_moe_gguf):
    """mixtral-gpu, built with a GPU assumed (on meta, no CUDA needed): the CPU experts take
    half the cores because their rule says `threads: half` (the thread that launches GPU
    work keeps cores of its own), and building the model changes no process-wide setting;
    the file's `cudnn_attention: false` is applied only when a model is loaded under it,
    and the plan says so."""
    import numba

    from hybrid.inject.loader import build
    from hybrid.inject.model import Model
    from hybrid.inject.placement import swap
    from hybrid.inject.plan import format_plan, summarize
    from hybrid.operators import CPUExperts

    before = torch.backends.cuda.cudnn_sdp_enabled(), torch.get_num_threads()
    config, module, placements, counts, refs, ruleset, _, _ = build(tiny_moe_gguf, "mixtral-gpu", {"cuda:0": 8 << 30})
    swap(module, placements, config, ruleset.source)
    Model(config, module, None, placements=placements, ruleset=ruleset)
    assert (torch.backends.cuda.cudnn_sdp_enabled(), torch.get_num_threads()) == before
    experts = [p.module for p in placements if p.operator is CPUExperts]
    assert len(experts) == config.num_hidden_layers
    assert {e.threads for e in experts} == {max(1, numba.config.NUMBA_NUM_THREADS // 2)}
    assert ruleset.cudnn_attention is False
    assert "cuDNN attention off (process-wide)" in format_plan(summarize(placements, counts, refs, ruleset))


def test_only_a_rule_file_that_says_so_changes_cudnn_attention(tiny_moe_gguf):
    text = (builtin_rules_dir() / "mixtral-cpu.yaml").read_text()
    assert "cudnn_attention" not in text
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        hybrid.load(tiny_moe_gguf, rules=text)
        assert torch.backends.cuda.cudnn_sdp_enabled() == before
        flipped = text.replace("dtype: float32\n", f"dtype: float32\ncudnn_attention: {str(not before).lower()}\n")
        hybrid.load(tiny_moe_gguf, rules=flipped)
        assert torch.backends.cuda.cudnn_sdp_enabled() == (not before)
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
