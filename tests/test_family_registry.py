"""A family is its own file plus its rule files: the example of docs/families.md, added to
copies of the family and rule directories, loads a checkpoint with no other change."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

import hybrid
from hybrid import models
from hybrid.inject import placement

from .tiny import make_tiny, reference_logits, rel_err

DOC = Path(__file__).resolve().parents[1] / "docs" / "families.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), re.S)


@pytest.fixture
def example_family(tmp_path, monkeypatch):
    """The package's family directory and rule directory, copied, with the example's two
    files added; the registry and the rule lookup pointed at the copies."""
    fam_dir, rules_dir = tmp_path / "models", tmp_path / "rules"
    shutil.copytree(Path(models.__file__).parent, fam_dir, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(placement.builtin_rules_dir(), rules_dir)
    (fam_dir / "tiny_llama.py").write_text(_blocks("python")[0])
    (rules_dir / "tiny_llama-cpu.yaml").write_text(_blocks("yaml")[0])
    monkeypatch.setattr(models, "__path__", [str(fam_dir)])
    monkeypatch.setattr(placement, "builtin_rules_dir", lambda: rules_dir)
    models._modules.cache_clear()
    models._model_types.cache_clear()
    yield
    models._modules.cache_clear()
    models._model_types.cache_clear()


def test_the_documented_example_family_loads_with_no_other_change(example_family, tmp_path):
    assert "tiny_llama" in models.supported_families()
    ref = make_tiny("llama", tmp_path / "ckpt")
    cfg_file = tmp_path / "ckpt" / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "model_type": "tiny_llama"}))

    model = hybrid.load(tmp_path / "ckpt")
    assert Path(model.ruleset.source).name == "tiny_llama-cpu.yaml"
    assert type(model.module.model.layers[0]).__name__ == "CPUDecoderLayer"
    ids = [1, 5, 9, 200, 17, 3, 64, 128]
    assert rel_err(model.logits(ids), reference_logits(ref, ids)) < 1e-3


def test_an_unknown_family_is_still_refused_by_name(tmp_path):
    make_tiny("llama", tmp_path / "ckpt")
    cfg_file = tmp_path / "ckpt" / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "model_type": "tiny_llama"}))
    with pytest.raises((hybrid.CheckpointError, ValueError), match="tiny_llama"):
        hybrid.load(tmp_path / "ckpt")
