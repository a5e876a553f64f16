"""The rule files of the families added with the registry (gemma3, glm4_moe, gpt_oss, qwen3_5_moe):
`hybrid rules` plans each CPU file on a tiny model with every rule matching something,
the GPU files name the family's CPU file on a machine without CUDA, and the GPU files
run on tiny models where CUDA is present."""

import json

import pytest
import torch

import hybrid
from hybrid.cli import main as cli
from hybrid.models import family_name
from hybrid.inject.placement import RuleError, parse_rules

from .tiny import make_tiny, reference_logits, rel_err

NEW = ["gemma3_text", "glm4_moe", "gpt_oss", "qwen3_5_moe"]
IDS = list(range(3, 40))


@pytest.fixture(scope="module", params=NEW)
def tiny(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    return request.param, directory, make_tiny(request.param, directory)


def test_cpu_rule_file_plan(tiny, capsys):
    model_type, directory, _ = tiny
    fam = family_name(model_type)
    assert cli.main(["rules", "--model", str(directory), "--rules", f"{fam}-cpu", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["rules_file"].endswith(f"{fam}-cpu.yaml")
    assert all(r["matches"] > 0 for r in plan["rules"]), plan["rules"]
    assert plan["kv_cache"]["bytes_per_slot"] > 0


@pytest.mark.parametrize("kind", ["gpu", "gpu-experts", "multi-gpu"])
def test_gpu_rule_files_parse_or_name_the_cpu_file(tiny, kind):
    fam = family_name(tiny[0])
    name = f"{fam}-{kind}"
    if fam == "gemma3" and kind == "gpu-experts":
        pytest.skip("Gemma 3 has no experts")
    if not torch.cuda.is_available():
        with pytest.raises(RuleError, match=f"no CUDA device; use the CPU rule file instead: --rules {fam}-cpu"):
            parse_rules(name)
    elif kind == "multi-gpu" and torch.cuda.device_count() < 2:
        with pytest.raises(RuleError, match=r"device 'cuda:1'"):
            parse_rules(name)
    else:
        parse_rules(name)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_rule_file_runs(tiny):
    model_type, directory, ref_model = tiny
    logits = hybrid.load(directory, rules=f"{family_name(model_type)}-gpu").logits(IDS)
    assert rel_err(logits, reference_logits(ref_model, IDS)) < 5e-2


def test_registry_finds_every_family_file_and_its_rule_files():
    from hybrid.models import family, family_names, gguf_architectures, supported_families
    from hybrid.inject.placement import builtin_rules_dir

    assert {"gemma3_text", "glm4_moe", "gpt_oss", "llama", "deepseek_v3", "qwen3_5_moe"} <= set(supported_families())
    assert {"gemma3": "gemma3_text", "glm4moe": "glm4_moe", "gpt-oss": "gpt_oss",
            "qwen35moe": "qwen3_5_moe_text"}.items() <= gguf_architectures().items()
    rule_files = {f.stem for f in builtin_rules_dir().glob("*.yaml")}
    for name in family_names():
        assert {f"{name}-cpu", f"{name}-gpu", f"{name}-multi-gpu"} <= rule_files, name
    for model_type in supported_families():
        fam = family(model_type)
        assert all(hasattr(fam, a) for a in ("Config", "Model", "GGUF_NAMES", "GGUF_PERMUTED", "STACKED")), model_type
    with pytest.raises(ValueError, match="model_type 'bert' is not supported; supported: .*gemma3_text, glm4_moe, gpt_oss"):
        family("bert")
