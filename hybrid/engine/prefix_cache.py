"""Prefix cache: the KV of earlier prompts, kept per block of `block` tokens, so a request
that starts like an earlier one (same system prompt, the next turn of a chat) copies those
keys and values into its slot and prefills only the rest.

A block is keyed by a hash chain: key(i) = blake2b(key(i-1) + token ids of block i), so a
block's key covers every token before it and two prompts share a block only when they
agree on everything up to its end. The stored block also keeps its parent key and its
tokens, checked on lookup, so even a hash collision cannot hand out the wrong KV.

Blocks are evicted least recently used first within `budget` bytes. A lookup touches the
blocks it found deepest first, so the root of a chain is always used more recently than
its tail, and eviction takes tails before the blocks they hang from.

Every cache kind is handled: a full `KVCache` row is position p; a `SlidingKVCache`
(Gemma 3, gpt-oss) keeps position p at ring row p % rows, so a block is stored only while
its positions are still in every layer's ring (while a long prompt is prefilled, blocks
are saved chunk by chunk) and written back in order, the last `rows` positions winning.

Blocks live on the device of their layer's cache, in its dtype. All calls come from the
engine thread, under the engine's lock.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_BLOCK = 64
DEFAULT_BUDGET = 256 << 20


@dataclass
class Block:
    parent: bytes | None
    tokens: tuple[int, ...]
    kv: list[tuple[torch.Tensor, torch.Tensor]]   # per layer: k [Hkv, block, Dk], v [Hkv, block, Dv]
    nbytes: int


def chain_keys(tokens, block: int, n: int, keys: list[bytes] | None = None) -> list[bytes]:
    """The keys of the first n whole blocks of `tokens`, extending `keys` (those already known)."""
    keys = [] if keys is None else keys
    for i in range(len(keys), n):
        ids = np.asarray(tokens[i * block : (i + 1) * block], np.int64).tobytes()
        keys.append(hashlib.blake2b((keys[i - 1] if i else b"") + ids, digest_size=16).digest())
    return keys


class PrefixCache:
    """LRU store of KV blocks within `budget` bytes (0: disabled)."""

    def __init__(self, budget: int = DEFAULT_BUDGET, block: int = DEFAULT_BLOCK):
        if budget < 0:
            raise ValueError(f"prefix cache budget must be >= 0 bytes, got {budget}")
        if block < 1:
            raise ValueError(f"prefix cache block must be >= 1 token, got {block}")
        self.budget, self.block = int(budget), int(block)
        self.blocks: OrderedDict[bytes, Block] = OrderedDict()
        self.bytes_used = 0
        self.lookups = self.hits = self.tokens_reused = self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    def stats(self) -> dict:
        return {"budget_bytes": self.budget, "block_tokens": self.block, "bytes_used": self.bytes_used,
                "blocks": len(self.blocks), "lookups": self.lookups, "hits": self.hits,
                "tokens_reused": self.tokens_reused, "evictions": self.evictions}

    def restore(self, caches, slot: int, tokens, keys: list[bytes]) -> int:
        """Copy the longest cached prefix of `tokens` into `slot` of every layer's cache;
        returns how many tokens it covers (whole blocks, always leaving at least one token
        to prefill, whose logits give the first generated token). `keys` is extended with
        the chain keys computed on the way."""
        if not self.enabled:
            return 0
        B = self.block
        chain_keys(tokens, B, (len(tokens) - 1) // B, keys)
        found = []
        for i, key in enumerate(keys[: (len(tokens) - 1) // B]):
            b = self.blocks.get(key)
            if b is None or b.parent != (keys[i - 1] if i else None) or b.tokens != tuple(tokens[i * B : (i + 1) * B]):
                break
            found.append(b)
        self.lookups += 1
        if not found:
            return 0
        self._touch(keys[: len(found)])
        for layer, cache in enumerate(caches):
            for i, b in enumerate(found):
                cache.write_rows(slot, i * B, *b.kv[layer])
        self.hits += 1
        self.tokens_reused += len(found) * B
        return len(found) * B

    def save(self, caches, slot: int, tokens, keys: list[bytes], saved: int, written: int) -> int:
        """Store the whole blocks of `tokens` (all of whose KV is in `slot`) from block
        `saved` on; `written`: the furthest position written into the slot so far (a ring
        keeps only the last rows before it). Returns how many leading blocks are now
        stored or known to be."""
        if not self.enabled:
            return saved
        B = self.block
        n = len(tokens) // B
        chain_keys(tokens, B, n, keys)
        stored = saved
        for i in range(saved, n):
            if keys[i] not in self.blocks:
                if not all(cache.keeps(i * B, written) for cache in caches):
                    break  # gone from a ring: this block and the ones after it cannot be stored
                kv = [cache.read_rows(slot, i * B, B) for cache in caches]
                nbytes = sum(k.nbytes + v.nbytes for k, v in kv)
                if nbytes > self.budget:
                    break
                self.blocks[keys[i]] = Block(keys[i - 1] if i else None, tuple(tokens[i * B : (i + 1) * B]), kv, nbytes)
                self.bytes_used += nbytes
            stored = i + 1
        if stored > saved:
            self._touch(keys[:stored])
            self._evict()
        return stored

    def _touch(self, keys: list[bytes]) -> None:
        """Most recently used: the chain's root last, so its tail is evicted first."""
        for key in reversed(keys):
            if key in self.blocks:
                self.blocks.move_to_end(key)

    def _evict(self) -> None:
        while self.bytes_used > self.budget and self.blocks:
            _, b = self.blocks.popitem(last=False)
            self.bytes_used -= b.nbytes
            self.evictions += 1
