"""Sampling: request parameters, pure logits transforms, and a per-request Sampler.

The transforms take and return a [V] (or [B, V]) float tensor and never touch state;
`Sampler` owns the state (token counts, RNG) and applies them in a fixed order:
penalties, logit bias, temperature, top-k, top-p, min-p, then a draw.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    temperature: float = 1.0          # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0   # HF/llama.cpp: seen (prompt + generated) logits / p if > 0 else * p
    presence_penalty: float = 0.0     # OpenAI: logit -= presence * (count > 0), generated tokens only
    frequency_penalty: float = 0.0    # OpenAI: logit -= frequency * count, generated tokens only
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0

    def validate(self) -> None:
        def check(ok, msg):
            if not ok:
                raise ValueError(msg)

        check(_finite(self.temperature) and 0 <= self.temperature <= 2,
              f"temperature must be in [0, 2], got {self.temperature}")
        check(_finite(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        check(isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be an integer >= 0, got {self.top_k}")
        check(_finite(self.min_p) and 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        check(_finite(self.repetition_penalty) and self.repetition_penalty > 0,
              f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            check(_finite(v) and -2 <= v <= 2, f"{name} must be in [-2, 2], got {v}")
        for tok, bias in (self.logit_bias or {}).items():
            check(isinstance(tok, int) and tok >= 0, f"logit_bias keys must be token ids >= 0, got {tok!r}")
            check(_finite(bias) and -100 <= bias <= 100, f"logit_bias values must be in [-100, 100], got {bias}")
        check(self.seed is None or isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}")
        check(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 0),
              f"max_tokens must be an integer >= 0, got {self.max_tokens}")
        check(isinstance(self.stop, list) and all(isinstance(s, str) and s for s in self.stop),
              "stop must be a list of non-empty strings")
        check(isinstance(self.top_logprobs, int) and 0 <= self.top_logprobs <= 20,
              f"top_logprobs must be an integer in [0, 20], got {self.top_logprobs}")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class Sample:
    token: int
    logprob: float | None              # under the unmodified model distribution; None unless asked for
    top: list[tuple[int, float]]       # top_logprobs alternatives, best first


# ---------------------------------------------------------------- transforms

def apply_repetition_penalty(logits, seen: torch.Tensor, penalty: float):
    """seen: bool [V]. Positive logits of seen tokens are divided by `penalty`, negative multiplied."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def apply_presence_frequency(logits, counts: torch.Tensor, presence: float, frequency: float):
    """counts: float [V], occurrences of each token among the generated ones."""
    if presence == 0 and frequency == 0:
        return logits
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts


def apply_logit_bias(logits, bias: dict[int, float] | None):
    if not bias:
        return logits
    if max(bias) >= logits.shape[-1]:
        raise ValueError(f"logit_bias token id {max(bias)} is outside the vocabulary ({logits.shape[-1]})")
    ids = torch.tensor(list(bias), device=logits.device)
    return logits.index_add(-1, ids, torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device))


def apply_temperature(logits, temperature: float):
    return logits if temperature == 1.0 else logits / temperature


def top_k_mask(logits, k: int):
    """Keep the k largest logits (ties at the k-th value kept), -inf elsewhere."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, -math.inf)


def top_p_mask(logits, p: float):
    """Keep the smallest set of most likely tokens whose probability reaches p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    # drop a token when the ones before it already reach p (the first one always stays)
    drop_sorted = (probs.cumsum(-1) - probs) >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


def min_p_mask(logits, min_p: float):
    """Drop tokens whose probability is below min_p times the top token's."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(-1)
    return logits.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), -math.inf)


# ---------------------------------------------------------------- sampler

class Sampler:
    """Sampling state for one request: counts of seen tokens and its own RNG."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int]):
        self.params = params
        self.prompt_ids = list(prompt_ids)
        self.generated: list[int] = []
        self.seed = params.seed if params.seed is not None else random.getrandbits(63)
        self._gen = None            # torch.Generator, made on the logits' device
        self._seen = self._counts = None

    def _state(self, logits):
        V, dev = logits.shape[-1], logits.device
        if self._gen is None:
            self._gen = torch.Generator(device=dev).manual_seed(self.seed)
        if self._seen is None:
            p = self.params
            if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
                self._seen = torch.zeros(V, dtype=torch.bool, device=dev)
                self._counts = torch.zeros(V, dtype=torch.float32, device=dev)
                ids = [i for i in self.prompt_ids if i < V]
                if ids:
                    self._seen[torch.tensor(ids, device=dev)] = True

    def transform(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits the draw is made from (penalties, bias, temperature and masks applied)."""
        p = self.params
        self._state(logits)
        x = logits.float()
        if self._seen is not None:
            x = apply_repetition_penalty(x, self._seen, p.repetition_penalty)
            x = apply_presence_frequency(x, self._counts, p.presence_penalty, p.frequency_penalty)
        x = apply_logit_bias(x, p.logit_bias)
        if p.temperature == 0:
            return x
        x = apply_temperature(x, p.temperature)
        x = top_k_mask(x, p.top_k)
        x = top_p_mask(x, p.top_p)
        return min_p_mask(x, p.min_p)

    def __call__(self, logits: torch.Tensor) -> Sample:
        return self.record(logits, self.draw(logits))

    def draw(self, logits: torch.Tensor) -> int:
        """A token drawn from `logits` (transformed), not yet recorded as generated."""
        x = self.transform(logits)
        if self.params.temperature == 0:
            return int(x.argmax())
        return int(torch.multinomial(x.softmax(-1), 1, generator=self._gen))

    def record(self, logits, token: int) -> Sample:
        """Take `token` as generated: counted for penalties, with its logprobs under `logits`."""
        if self._seen is not None:
            self._seen[token] = True
            self._counts[token] += 1
        self.generated.append(token)
        return self.sample_of(logits, token)

    def sample_of(self, logits, token: int) -> Sample:
        """`token` with its logprob and top alternatives under `logits`, computed only when
        the request asks for logprobs (a log-softmax over the vocabulary per token is
        otherwise wasted: 8 sequences of a 49k vocabulary, ~0.5 ms a step)."""
        if not (self.params.logprobs or self.params.top_logprobs):
            return Sample(token, None, [])
        lp = logits.float().log_softmax(-1)
        top = []
        if self.params.top_logprobs:
            v, i = lp.topk(self.params.top_logprobs)
            top = list(zip(i.tolist(), v.tolist()))
        return Sample(token, float(lp[token]), top)


def sample_batch(samplers: list[Sampler], logits: torch.Tensor) -> list[Sample]:
    """One step for B requests: logits [B, V], row b drawn by samplers[b]."""
    return [s(row) for s, row in zip(samplers, logits)]
