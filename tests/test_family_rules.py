"""The rule files of the families added with the registry (gemma3, glm4_moe, gpt_oss):
`hybrid rules` plans each CPU file on a tiny model with every rule matching something,
the GPU files name the family's CPU file on a machine without CUDA, and the GPU files
run on tiny models where CUDA is present."""

import json

import pytest
import torch

import hybrid
from hybrid import cli
from hybrid.models import family_name
from hybrid.placement import RuleError, parse_rules

from .tiny import make_tiny, reference_logits, rel_err

NEW = ["gemma3_text", "glm4_moe", "gpt_oss"]
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
