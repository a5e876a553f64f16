"""`hybrid fit` and `--assume-gpu`: rule files fitted to a GPU budget, planned and checked on
a machine without a GPU, for a Mixtral-layout and a Qwen3-MoE GGUF and Qwen2-MoE and
DeepSeek-V3 (shared experts) safetensors checkpoints."""

import json

import pytest
import torch
import yaml

import hybrid
from hybrid.cli import main as cli
from hybrid.inject.fit import FitError, fit
from hybrid.inject.placement import RuleError, parse_rules
from hybrid.operators import CPUExperts, SplitExperts
from hybrid.writers.synthetic import write_moe_gguf

from .tiny import rel_err

MiB = 1 << 20


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from .tiny import make_tiny

    d = tmp_path_factory.mktemp("fit")
    make_tiny("qwen2_moe", d / "qwen2_moe")
    make_tiny("deepseek_v3", d / "deepseek_v3")
    return {
        "mixtral": write_moe_gguf(d / "mixtral.gguf", layers=4, hidden=256, experts=8, expert_width=256, top_k=2,
                                  heads=4, kv_heads=2, qtype="Q8_0", vocab_size=1024, context=512),
        "qwen3_moe": write_moe_gguf(d / "qwen3.gguf", arch="qwen3moe", layers=6, hidden=256, experts=16,
                                    expert_width=128, top_k=4, heads=4, kv_heads=2, head_dim=64, qtype="Q4_K",
                                    context=512),
        "qwen2_moe": d / "qwen2_moe",
        "deepseek_v3": d / "deepseek_v3",  # layer 0 dense, shared experts beside the routed ones
    }


def on_gpu(f) -> tuple[int, int]:
    """(whole layers, experts of the split layer) the fit put on the GPU."""
    return len(f.whole_layers), (f.split[1] if f.split else 0)


def exit_code(argv) -> int:
    """`hybrid ARGV`'s exit status, in this process (argparse errors exit)."""
    try:
        return cli.main(argv)
    except SystemExit as e:
        return e.code


def gpu_totals(f) -> dict:
    return next(d for d in f.plan["devices"] if d["device"] == "cuda:0")


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "qwen2_moe", "deepseek_v3"])
def test_more_memory_puts_more_on_the_gpu(models, family):
    smallest = fit(models[family], 1 << 40, slots=2, ctx=256).minimum
    everything = fit(models[family], 1 << 40, slots=2, ctx=256)
    assert everything.cpu_layers == [] and everything.split is None  # a huge budget takes every layer whole
    layers = len(everything.whole_layers)
    full = gpu_totals(everything)["bytes"]
    seen = []
    for budget in [smallest + (full - smallest) * i // 10 for i in range(11)]:
        f = fit(models[family], budget, slots=2, ctx=256)
        totals = gpu_totals(f)
        assert f.plan["fits"] and totals["bytes"] <= budget  # the written file's own plan fits the budget
        assert totals["kv_cache_bytes"] == f.kv_bytes > 0
        assert len(f.whole_layers) + len(f.cpu_layers) + (f.split is not None) == layers
        first = min(f.whole_layers + f.cpu_layers + ([f.split[0]] if f.split else []))
        assert f.whole_layers == list(range(first, first + len(f.whole_layers)))  # from the first MoE layer, no gaps
        seen.append((*on_gpu(f), totals["weight_bytes"]))
    assert seen == sorted(seen) and seen[0][:2] == (0, 0) and seen[-1][0] == layers
    assert len({s[:2] for s in seen}) >= 5  # most steps place more
    assert any(s[1] for s in seen)  # some budget ends inside a layer: split


def test_budget_too_small_names_the_minimum(models, capsys):
    f = fit(models["mixtral"], 1 << 40, slots=2, ctx=256)
    with pytest.raises(FitError, match=r"too small .* needs at least"):
        fit(models["mixtral"], f.minimum - 1, slots=2, ctx=256)
    assert fit(models["mixtral"], f.minimum, slots=2, ctx=256).whole_layers == []  # the minimum is enough
    code = cli.main(["fit", "--model", str(models["mixtral"]), "--gpu-memory", "1MiB", "--slots", "2", "--ctx", "256",
                     "--gpu-reserve", "0", "--out", "/dev/null"])
    err = capsys.readouterr().err
    assert code == 2 and "too small" in err and f"--gpu-memory {-(-f.minimum // MiB)}MiB or more" in err
    assert "Traceback" not in err


def test_kv_cache_and_reserve_come_out_of_the_budget(models):
    everything = fit(models["qwen3_moe"], 1 << 40, slots=1, ctx=256)
    budget = (everything.minimum + gpu_totals(everything)["bytes"]) // 2  # half the experts
    a = fit(models["qwen3_moe"], budget, slots=1, ctx=256)
    b = fit(models["qwen3_moe"], budget, slots=4, ctx=256)
    c = fit(models["qwen3_moe"], budget, slots=1, ctx=256, reserve=2 * MiB)
    assert b.kv_bytes == 4 * a.kv_bytes and c.reserve_bytes == 2 * MiB
    assert on_gpu(b) < on_gpu(a) and on_gpu(c) < on_gpu(a)


def test_written_file_round_trips_through_the_rule_engine(models, tmp_path, capsys):
    out = tmp_path / "fitted.yaml"
    budget = fit(models["qwen3_moe"], 1 << 40, slots=2, ctx=256).minimum + 5 * MiB
    args = ["--model", str(models["qwen3_moe"]), "--slots", "2", "--ctx", "256", "--gpu-reserve", "0"]
    assert cli.main(["fit", *args, "--gpu-memory", f"{budget}B", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "routed experts:" in printed and "split" in printed and "wrote" in printed
    ruleset = parse_rules(str(out), assume={"cuda:0": budget})
    assert [r.replace for r in ruleset.rules][:3] == ["default", "SplitExperts", "CPUExperts"]
    # what the -gpu file declares for a GPU next to CPU experts carries over
    assert ruleset.cudnn_attention is False and ruleset.rules[1].kwargs["threads"] == "half"
    if not torch.cuda.is_available():
        with pytest.raises(RuleError, match="no CUDA device"):
            parse_rules(str(out))  # a GPU file: on a machine without one, only with --assume-gpu
    assert cli.main(["rules", *args, "--rules", str(out), "--assume-gpu", f"{budget}B", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    fitted = fit(models["qwen3_moe"], budget, slots=2, ctx=256)
    without_free = [{k: v for k, v in d.items() if d["device"] == "cuda:0" or k != "available"} for d in plan["devices"]]
    assert without_free == [{k: v for k, v in d.items() if d["device"] == "cuda:0" or k != "available"}
                            for d in fitted.plan["devices"]]  # the CPU's free memory moves between the two
    assert plan["expected_rss"]["kv_bytes_per_token"] == 0  # attention on the GPU: its KV cache is not resident
    split = next(g for g in plan["groups"] if g["operator"] == "SplitExperts" and g["device"] == "cuda:0")
    assert split["examples"] == [f"model.layers.{fitted.split[0]}.mlp.experts"]
    # one byte less than the plan needs: `hybrid rules` says it does not fit, with the totals
    need = next(d["bytes"] for d in plan["devices"] if d["device"] == "cuda:0")
    assert cli.main(["rules", *args, "--rules", str(out), "--assume-gpu", f"cuda:0:{need - 1}"]) == 1
    captured = capsys.readouterr()
    assert "(assumed)  NO" in captured.out and "does not fit" in captured.err


def test_fitted_file_loads_and_computes_the_model(models, tmp_path):
    """The fitted file with cuda:0 read as the CPU (and float32) loads through hybrid.load: whole
    layers in torch, the boundary layer split, the rest on the CPU kernels; logits as torch's."""
    layer = 3 * 8 * 256 * 256 * 2  # one layer's experts in bfloat16
    f = fit(models["mixtral"], fit(models["mixtral"], 1 << 40, slots=1, ctx=64).minimum + layer * 3 // 2, slots=1, ctx=64)
    assert f.whole_layers and f.split and f.cpu_layers
    rules = yaml.safe_load(f.rules_yaml.replace("'cuda:0'", "cpu").replace("bfloat16", "float32")
                           .replace("cudnn_attention: false\n", ""))
    # float activations on the CPU operators: this compares placements, not the kernels'
    # integer rounding of x (int16: ~5e-5 of a row, which grows to 0.13 in this random
    # model's logits, as the same absolute noise added to exact outputs does)
    for rule in rules["rules"]:
        if rule["replace"]["class"] in ("CPUExperts", "SplitExperts", "CPULinear", "CPUDecoderLayer"):
            rule["replace"].setdefault("kwargs", {})["activations"] = "float"
    m = hybrid.load(models["mixtral"], rules=yaml.safe_dump(rules))
    layers = m.module.model.layers
    assert type(layers[f.split[0]].block_sparse_moe.experts) is SplitExperts
    assert type(layers[f.cpu_layers[0]].block_sparse_moe.experts) is CPUExperts
    assert type(layers[0].block_sparse_moe.experts).__name__ == "Experts"
    ids = list(range(5, 25))
    assert rel_err(m.logits(ids), hybrid.load(models["mixtral"], rules="torch-cpu").logits(ids)) < 2e-3


def test_prefill_profile_streams_cpu_experts_and_keeps_room(models):
    decode = fit(models["mixtral"], 64 * MiB, slots=1, ctx=256)
    prefill = fit(models["mixtral"], 64 * MiB, slots=1, ctx=256, profile="prefill")
    assert prefill.reserve_bytes > decode.reserve_bytes
    assert "prefill_device: 'cuda:0'" in prefill.rules_yaml and "prefill_device" not in decode.rules_yaml


def test_dense_family_and_bad_input(models, tmp_path, capsys):
    from .tiny import make_tiny

    make_tiny("llama", tmp_path / "llama")
    f = fit(tmp_path / "llama", 64 * MiB, slots=1, ctx=64)  # no routed experts: the -gpu file as it is
    assert f.whole_layers == [] and f.split is None and f.plan["fits"]
    for extra, message in [(["--assume-gpu", "tpu:8GiB"], "expected [cuda:N:]SIZE"),
                           (["--assume-gpu", "8GiB", "--assume-gpu", "cuda:1:8GiB"], "fit plans for one GPU"),
                           (["--gpu-memory", "8 parsecs"], "expected a memory size"),
                           (["--gpu-memory", "8GiB", "--profile", "chat"], "invalid choice: 'chat'"),
                           (["--gpu-memory", "8GiB", "--slots", "0"], "slots must be at least 1")]:
        assert exit_code(["fit", "--model", str(models["mixtral"]), "--out", str(tmp_path / "x.yaml"), *extra]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_fit_without_a_gpu_asks_for_its_memory(models, capsys):
    assert cli.main(["fit", "--model", str(models["mixtral"]), "--out", "/dev/null"]) == 2
    assert "no CUDA device: give the GPU's memory with --gpu-memory SIZE or --assume-gpu SIZE" in capsys.readouterr().err


def test_rules_assume_gpu_other_device_is_refused(models, capsys):
    rules = "default_device: 'cuda:1'\nrules: []\n"
    assert cli.main(["rules", "--model", str(models["mixtral"]), "--rules", rules, "--assume-gpu", "8GiB"]) == 2
    assert "not among the GPUs assumed (cuda:0)" in capsys.readouterr().err


def test_fit_for_more_than_the_gpu_assumed_exits_1(models, tmp_path, capsys):
    """--gpu-memory is the budget, --assume-gpu the GPU it is checked against: a file planned
    for more memory than that GPU has is written, and the exit status says it does not fit."""
    smallest = fit(models["mixtral"], 1 << 40, slots=1, ctx=64).minimum
    out = tmp_path / "big.yaml"
    code = cli.main(["fit", "--model", str(models["mixtral"]), "--slots", "1", "--ctx", "64", "--gpu-reserve", "0",
                     "--gpu-memory", f"{smallest + 4 * MiB}B", "--assume-gpu", f"{smallest}B", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 1 and out.exists() and "(assumed)  NO" in captured.out and "does not fit" in captured.err
