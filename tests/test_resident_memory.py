"""Resident memory: KV caches take pages only where tokens are written, and the plan's
expected RSS (hybrid/inject/memory.py)."""

import json
import subprocess
import sys

import torch

from hybrid.inject.memory import rss_bytes
from hybrid.inject.model import lazy_zeros

MB = 1 << 20


def test_lazy_zeros_are_zero_and_resident_only_where_written():
    lazy_zeros((2, 2), torch.float32)[:] = 1  # torch's and numpy's one-time set-up
    before = rss_bytes()
    kv = lazy_zeros((4, 3, 4096, 256), torch.float32)  # 48 MiB
    assert kv.shape == (4, 3, 4096, 256) and kv.dtype == torch.float32 and kv.is_contiguous()
    assert rss_bytes() - before < 4 * MB
    kv[:, :, :8] = 1.0  # 8 tokens in every slot and head: 12 separate runs of 8 KiB
    assert rss_bytes() - before < 8 * MB
    assert kv.sum().item() == 4 * 3 * 8 * 256
    half = lazy_zeros((3, 5), torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.abs().sum().item() == 0


def test_server_sized_cache_costs_nothing_until_used(smollm_path):
    import hybrid

    model = hybrid.load(smollm_path)
    model.warm_up()  # weights read and kernels loaded: what is left is the cache
    before = rss_bytes()
    cache = model.new_cache(4, 4096)  # 755 MB of float32 if it were all resident
    assert sum(c.k.nbytes + c.v.nbytes for c in cache) > 700e6
    assert rss_bytes() - before < 8 * MB
    model.forward(torch.arange(1, 7)[None], [0], [0], cache)
    assert rss_bytes() - before < 16 * MB  # pages of 6 tokens (120 MB with huge pages, 755 all written)


def test_rules_shows_the_expected_rss(smollm_path):
    out = subprocess.run([sys.executable, "-m", "hybrid", "rules", "--model", smollm_path, "--json", "--slots", "2",
                          "--ctx", "1000"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rss = json.loads(out.stdout)["expected_rss"]
    assert rss["kv_bytes_per_token"] == 30 * 3 * (64 + 64) * 4  # layers x kv heads x (k + v dims) x float32
    assert 90e6 < rss["cpu_weight_bytes"] < 110e6
    assert rss["prefix_cache_bytes"] == 256 << 20   # the default budget, resident once it has filled
    assert rss["kv_full_bytes"] - rss["at_start_bytes"] == rss["kv_bytes_per_token"] * 2 * 1000 + (256 << 20)
    text = subprocess.run([sys.executable, "-m", "hybrid", "rules", "--model", smollm_path], capture_output=True,
                          text=True, timeout=300).stdout
    assert "expected RSS:" in text and "prefix cache: up to 256.0 MiB" in text
    off = subprocess.run([sys.executable, "-m", "hybrid", "rules", "--model", smollm_path, "--prefix-cache-mb", "0"],
                         capture_output=True, text=True, timeout=300).stdout
    assert "prefix cache: off" in off
