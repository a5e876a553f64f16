"""A loaded model: module tree, tokenizer and the functions generation needs."""

from __future__ import annotations

import logging
import math
import mmap

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from hybrid.models.common import KVCache, Step

log = logging.getLogger(__name__)


class Model:
    """What `hybrid.load` returns.

    config: the family's config dataclass; module: the torch module tree with Hugging Face
    names (after rules were applied); tokenizer: `hybrid.files.tokenizer.Tokenizer`."""

    def __init__(self, config, module, tokenizer, *, placements=(), ruleset=None, source=None, name="model"):
        self.config, self.module, self.tokenizer = config, module, tokenizer
        self.placements, self.ruleset, self.source, self.name = list(placements), ruleset, source, name
        self._placed = {p.path: p for p in self.placements}
        self.set_torch_threads()

    @property
    def runs_kernels(self) -> bool:
        """Whether any module runs on the numba CPU kernels."""
        return any(p.operator is not None and not p.keeps_children and torch.device(p.device).type == "cpu"
                   for p in self.placements)

    def set_torch_threads(self) -> None:
        """torch's thread count as the rule file's `torch_threads` says (call again from the
        thread that runs the model when another thread built it: the count is the calling
        thread's). The built-in files that place numba kernels say 1: the kernels keep the
        cores busy, torch's pool only runs the small ops between them, and two OpenMP pools
        on the same cores slow both down several times over. A file that says nothing leaves
        torch as it is, with a warning when it runs kernels."""
        threads = getattr(self.ruleset, "torch_threads", None)
        if threads is not None:
            torch.set_num_threads(threads)
        elif self.runs_kernels and torch.get_num_threads() > 1:
            log.warning("%s places numba kernels but sets no torch_threads: torch keeps %d threads, whose pool "
                        "competes with numba's for the cores; add `torch_threads: 1` to the file",
                        getattr(self.ruleset, "source", "the rule file"), torch.get_num_threads())

    def cache_layout(self) -> list[tuple]:
        """Per layer, what a cache made by this model is (its kind, then each buffer's shape
        past the slot dimension, dtype and device): two models with the same layout can
        share one cache."""
        return [(type(c).__name__, *((tuple(b.shape[1:]), b.dtype, b.device) for b in c.buffers()))
                for c in self.new_cache(1, 1)]

    def placement(self, path: str) -> tuple[torch.device, torch.dtype]:
        """(device, dtype) the rules gave the module at `path` (or its nearest placed ancestor)."""
        while path not in self._placed and path:
            path = path.rpartition(".")[0]
        p = self._placed.get(path)
        return (torch.device(p.device), p.dtype) if p else (torch.device("cpu"), torch.float32)

    @property
    def context_length(self) -> int:
        return self.config.max_position_embeddings

    @property
    def input_device(self) -> torch.device:
        return self.placement("model.embed_tokens")[0]

    def new_cache(self, slots: int = 1, max_len: int | None = None) -> list[KVCache]:
        """KV cache for `slots` sequences of up to `max_len` tokens (default: the context length).

        CPU caches take memory as tokens are written, not when made: they are built on the
        meta device and then given zero pages of their own (`lazy_zeros`). A server's 4 slots of 4096 tokens for the
        built-in model are 755 MB of float32 that torch.zeros would have touched at once."""

        def placement(path):
            device, dtype = self.placement(path)
            return (torch.device("meta"), dtype) if device.type == "cpu" else (device, dtype)

        caches = self.module.make_cache(slots, max_len or self.context_length, placement)
        for cache in caches:
            for name, buf in list(cache.named_buffers(recurse=False)):
                if buf.is_meta:
                    cache._buffers[name] = lazy_zeros(buf.shape, buf.dtype)
        return caches

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, starts: list[int], slots: list[int], cache, keep: list[int] | None = None) -> torch.Tensor:
        """tokens [B, T]; sequence b's tokens go to cache slot slots[b] at positions
        starts[b]... Returns logits [B, T, V] float32, or with `keep` only those of
        position keep[b] of each row: [B, 1, V]; a row's tokens after keep[b] are then
        padding (a batched prefill's), which a recurrent layer leaves out of its state."""
        lengths = None if keep is None else [k + 1 for k in keep]
        step = Step.make(list(slots), list(starts), tokens.shape[1], self.input_device, lengths)
        return self.module(tokens.to(self.input_device), step, cache, keep)

    # What `warm_up` runs, in order: (what it exercises, tokens of the forward).
    WARM_UP = (("prompt processing", 32), ("batched decode", 4), ("decode", 1))

    @torch.inference_mode()
    def warm_up(self, on_step=None) -> None:
        """Run every kernel path once (prefill tiles, small batch, decode) so the first
        request does not pay for compiling or loading them. on_step(i, what) before each of
        the `WARM_UP` forwards."""
        cache = self.new_cache(1, 40)
        ids = torch.zeros(1, 32, dtype=torch.long)
        start = 0
        for i, (what, tokens) in enumerate(self.WARM_UP):
            if on_step is not None:
                on_step(i, what)
            self.forward(ids[:, :tokens], [start], [0], cache)
            start += tokens
        # paths a short prompt does not reach (routed experts with many tokens each)
        for m in self.module.modules():
            if hasattr(m, "warm_up_kernels"):
                m.warm_up_kernels()

    def kernel_formats(self) -> list[str]:
        """The weight formats the numba kernels run for this model, e.g. ['Q4_1', 'Q8_0']."""
        found = set()
        for m in self.module.modules():
            if getattr(m, "qtype", None) is not None:
                found.add(Q(m.qtype).name)
            for name in ("gate", "up", "down"):  # CPUExperts: (type, blocks) per projection
                pair = getattr(m, name, None)
                if isinstance(pair, tuple) and len(pair) == 2:
                    found.add(Q(pair[0]).name)
        return sorted(found)

    @torch.inference_mode()
    def logits(self, token_ids, chunk: int = 512) -> torch.Tensor:
        """Logits [len(token_ids), vocab] float32 for a fresh sequence (chunked prefill)."""
        ids = torch.as_tensor(list(token_ids), dtype=torch.long)[None]
        cache = self.new_cache(1, ids.shape[1])
        out = [self.forward(ids[:, s : s + chunk], [s], [0], cache)[0] for s in range(0, ids.shape[1], chunk)]
        return torch.cat(out).cpu()

    def generate(self, prompt, params=None, **kw):
        """Stream `Event`s completing `prompt` (str or token ids); see `hybrid.engine.direct.generate`."""
        from hybrid.engine.direct import generate

        return generate(self, prompt, params, **kw)

    def chat(self, messages, stream: bool = False, params=None, **kw):
        """Answer a conversation through the chat template; see `hybrid.engine.direct.chat`."""
        from hybrid.engine.direct import chat

        return chat(self, messages, stream, params, **kw)


def lazy_zeros(shape, dtype: torch.dtype) -> torch.Tensor:
    """A zero CPU tensor whose pages become resident only when written, 4 KiB at a time:
    an anonymous mapping of its own. (torch.zeros writes every byte; numpy.zeros is lazy
    but asks for transparent huge pages, so one token written into each head's range of
    a KV cache made 2 MiB of it resident.)"""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    nbytes = max(1, math.prod(shape) * itemsize)
    raw = np.frombuffer(mmap.mmap(-1, nbytes), np.uint8)[: math.prod(shape) * itemsize]
    return torch.from_numpy(raw).view(dtype).view(*shape)

