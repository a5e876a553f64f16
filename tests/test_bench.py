"""`hybrid bench --json` on a tiny synthetic MoE model reports every field with a
plausible value (no timing is asserted)."""

import json
import subprocess
import sys

import pytest

from hybrid.writers.synthetic import write_moe_gguf


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory, smollm_path):
    path = tmp_path_factory.mktemp("moe") / "moe.gguf"
    return write_moe_gguf(path, layers=2, hidden=128, experts=4, expert_width=64, top_k=2, heads=4, kv_heads=2,
                          qtype="Q8_0", context=256, tokenizer_from=smollm_path)


def test_bench_json_reports_every_field(tiny_moe):
    # with an empty numba cache (a fresh clone) this subprocess compiles most kernels: 8-9
    # minutes on the 2-core VM
    out = subprocess.run(
        [sys.executable, "-m", "hybrid", "bench", "--model", str(tiny_moe), "--prompt-tokens", "16",
         "--gen-tokens", "4", "--batch", "1,2", "--json"],
        capture_output=True, text=True, timeout=1200,
    )
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["rules"].endswith("mixtral-cpu.yaml")
    assert 0.5 < r["bandwidth_gbps"] < 2000
    # 2 layers x (q,k,v,o + router) + lm_head in full, 2 of 4 experts, one embedding row
    assert 0 < r["decode_bytes_per_token"] < tiny_moe.stat().st_size
    assert r["peak_rss_bytes"] > 0
    assert [b["batch"] for b in r["batches"]] == [1, 2]
    for b in r["batches"]:
        assert b["prefill_tokens_per_s"] > 0 and b["decode_tokens_per_s"] > 0 and b["time_to_first_token_s"] > 0
    assert 0 < r["batches"][0]["roofline_fraction"] < 1.5


def test_bench_rejects_bad_batch(tiny_moe):
    out = subprocess.run([sys.executable, "-m", "hybrid", "bench", "--model", str(tiny_moe), "--batch", "0,x"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "--batch" in out.stderr and "Traceback" not in out.stderr
