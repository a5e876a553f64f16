"""scripts/quality.py's scoring: perplexity and KL over the second half of each chunk."""

import importlib.util
import math
import os

import torch

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "quality.py")


def load_script():
    spec = importlib.util.spec_from_file_location("quality_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Fixed:
    """A path whose logits are a fixed function of the position."""

    def __init__(self, name, table):
        self.name, self.table = name, table

    def logits(self, ids):
        return self.table[: len(ids)]


def test_score_counts_second_halves_and_measures_kl_against_the_reference():
    quality = load_script()
    vocab, ctx = 5, 8
    ref_table = torch.randn(ctx, vocab, generator=torch.Generator().manual_seed(0))
    same = Fixed("same", ref_table.clone())
    uniform = Fixed("uniform", torch.zeros(ctx, vocab))
    chunks = [[1, 2, 3, 4, 0, 1, 2, 3], [4, 3, 2, 1, 0, 4, 3, 2]]
    rows = {r["path"]: r for r in quality.score([same, uniform], Fixed("ref", ref_table), chunks)}
    ref = rows["ref (float reference)"]
    # positions 4..6 of each chunk predict tokens 5..7: 3 scored tokens per chunk
    assert ref["scored_tokens"] == 6
    lp = ref_table.double().log_softmax(-1)
    nll = [-lp[i, c[i + 1]].item() for c in chunks for i in range(4, 7)]
    assert math.isclose(ref["perplexity"], math.exp(sum(nll) / len(nll)), rel_tol=1e-9)
    assert rows["same"]["mean_kl"] == 0 and rows["same"]["top1_agreement"] == 1
    assert math.isclose(rows["uniform"]["perplexity"], vocab, rel_tol=1e-9)
    p = lp[4:7].exp()
    kl = (p * (lp[4:7] + math.log(vocab))).sum(-1).mean().item()
    assert math.isclose(rows["uniform"]["mean_kl"], kl, rel_tol=1e-9)
