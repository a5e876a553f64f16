"""Sampling transforms, the Sampler, and stop strings."""

import math

import pytest
import torch

from hybrid.engine.sampling import (Sampler, SamplingParams, apply_logit_bias, apply_presence_frequency,
                             apply_repetition_penalty, apply_temperature, min_p_mask, sample_batch,
                             top_k_mask, top_p_mask)
from hybrid.engine.stops import StopMatcher

INF = math.inf


def logits_of(probs):
    return torch.tensor(probs, dtype=torch.float32).log()


def kept(x):
    return torch.isfinite(x).nonzero().flatten().tolist()


# ---------------------------------------------------------------- transforms

def test_repetition_penalty():
    x = torch.tensor([2.0, -2.0, 2.0, -2.0])
    seen = torch.tensor([True, True, False, False])
    assert apply_repetition_penalty(x, seen, 2.0).tolist() == [1.0, -4.0, 2.0, -2.0]
    assert apply_repetition_penalty(x, seen, 1.0) is x


def test_presence_frequency():
    x = torch.zeros(3)
    counts = torch.tensor([0.0, 1.0, 3.0])
    assert apply_presence_frequency(x, counts, 0.5, 0.0).tolist() == [0.0, -0.5, -0.5]
    assert apply_presence_frequency(x, counts, 0.0, 0.25).tolist() == [0.0, -0.25, -0.75]
    assert apply_presence_frequency(x, counts, -1.0, 1.0).tolist() == [0.0, 0.0, -2.0]


def test_logit_bias_and_temperature():
    x = torch.zeros(4)
    assert apply_logit_bias(x, {1: 5.0, 3: -100.0}).tolist() == [0.0, 5.0, 0.0, -100.0]
    assert apply_logit_bias(x, None) is x
    assert apply_temperature(torch.tensor([1.0, -2.0]), 0.5).tolist() == [2.0, -4.0]


def test_top_k():
    x = torch.tensor([1.0, 4.0, 3.0, 2.0])
    assert kept(top_k_mask(x, 2)) == [1, 2]
    assert kept(top_k_mask(x, 0)) == [0, 1, 2, 3]
    assert kept(top_k_mask(x, 10)) == [0, 1, 2, 3]


def test_top_p():
    x = logits_of([0.1, 0.5, 0.3, 0.1])
    assert kept(top_p_mask(x, 0.5)) == [1]          # 0.5 alone reaches 0.5
    assert kept(top_p_mask(x, 0.6)) == [1, 2]
    assert kept(top_p_mask(x, 0.7)) == [1, 2]
    assert len(kept(top_p_mask(x, 0.85))) == 3
    assert kept(top_p_mask(x, 0.01)) == [1]         # the best token always stays
    assert kept(top_p_mask(x, 1.0)) == [0, 1, 2, 3]


def test_min_p():
    x = logits_of([0.05, 0.5, 0.3, 0.15])
    assert kept(min_p_mask(x, 0.5)) == [1, 2]       # >= 0.25
    assert kept(min_p_mask(x, 0.2)) == [1, 2, 3]    # >= 0.10
    assert kept(min_p_mask(x, 0.0)) == [0, 1, 2, 3]


def test_batched_transforms():
    x = torch.tensor([[1.0, 4.0, 3.0], [3.0, 2.0, 1.0]])
    assert torch.isfinite(top_k_mask(x, 1)).tolist() == [[False, True, False], [True, False, False]]
    assert torch.isfinite(top_p_mask(x, 0.01)).sum().item() == 2


# ---------------------------------------------------------------- Sampler

def run(params, steps=20, V=50, prompt=(), seed_logits=0):
    g = torch.Generator().manual_seed(seed_logits)
    logits = [torch.randn(V, generator=g) for _ in range(steps)]
    s = Sampler(params, list(prompt))
    return [s(x).token for x in logits]


def test_seed_reproduces():
    p = SamplingParams(temperature=1.0, seed=1234)
    assert run(p) == run(p)
    assert run(p) != run(SamplingParams(temperature=1.0, seed=4321))


def test_greedy():
    greedy = run(SamplingParams(temperature=0))
    assert greedy == run(SamplingParams(temperature=0.7, top_k=1, seed=1))
    x = torch.tensor([0.0, 3.0, 1.0])
    assert Sampler(SamplingParams(temperature=0), [])(x).token == 1


def test_sample_logprobs():
    x = torch.tensor([1.0, 3.0, 2.0, 0.0])
    s = Sampler(SamplingParams(temperature=0, logprobs=True, top_logprobs=2, top_k=1), [])(x)
    lp = x.log_softmax(-1)
    assert s.token == 1 and s.logprob == pytest.approx(lp[1].item())
    assert [t for t, _ in s.top] == [1, 2] and s.top[1][1] == pytest.approx(lp[2].item())
    # logprob is under the raw distribution even when the draw is from a transformed one
    s = Sampler(SamplingParams(temperature=0.1, top_k=1, logit_bias={0: 10.0}, seed=0, logprobs=True), [])(x)
    assert s.token == 0 and s.logprob == pytest.approx(lp[0].item())
    # not asked for: not computed
    s = Sampler(SamplingParams(temperature=0), [])(x)
    assert s.token == 1 and s.logprob is None and s.top == []


def test_sampler_penalties_use_history():
    x = torch.tensor([1.0, 0.9, 0.0])
    # prompt counts for the repetition penalty ...
    s = Sampler(SamplingParams(temperature=0, repetition_penalty=2.0), prompt_ids=[0])
    assert s(x).token == 1
    # ... but not for presence/frequency, which count generated tokens
    s = Sampler(SamplingParams(temperature=0, presence_penalty=1.0), prompt_ids=[0])
    assert [s(x).token for _ in range(3)] == [0, 1, 0]
    s = Sampler(SamplingParams(temperature=0, frequency_penalty=0.06), prompt_ids=[])
    assert [s(x).token for _ in range(4)] == [0, 0, 1, 0]


def test_sampler_respects_masks():
    x = logits_of([0.02, 0.5, 0.3, 0.18])
    cases = [(SamplingParams(top_k=2, seed=0), {1, 2}), (SamplingParams(top_p=0.6, seed=0), {1, 2}),
             (SamplingParams(min_p=0.5, seed=0), {1, 2}),
             (SamplingParams(logit_bias={1: -100.0}, top_k=2, seed=0), {2, 3})]
    for params, allowed in cases:
        s = Sampler(params, [])
        assert {s(x).token for _ in range(200)} == allowed


def test_sample_batch():
    x = torch.tensor([[0.0, 5.0], [5.0, 0.0]])
    out = sample_batch([Sampler(SamplingParams(temperature=0), []) for _ in range(2)], x)
    assert [o.token for o in out] == [1, 0]


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("temperature", 2.5), ("temperature", INF), ("top_p", 0.0), ("top_p", 1.5),
    ("top_k", -1), ("top_k", 1.5), ("min_p", 1.5), ("repetition_penalty", 0.0), ("presence_penalty", 2.5),
    ("frequency_penalty", -3.0), ("top_logprobs", 21), ("max_tokens", -1), ("logit_bias", {1: 200.0}),
    ("logit_bias", {"a": 1.0}), ("stop", ["ok", ""]), ("seed", "x"),
])
def test_validate_rejects(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value}).validate()


def test_validate_accepts():
    SamplingParams().validate()
    SamplingParams(temperature=0, top_p=0.5, top_k=40, min_p=0.1, repetition_penalty=1.1,
                   presence_penalty=-2, frequency_penalty=2, logit_bias={5: -100}, seed=3,
                   max_tokens=0, stop=["\n"], top_logprobs=20).validate()


# ---------------------------------------------------------------- stop strings

def feed(stops, pieces):
    m = StopMatcher(stops)
    out, stopped = [], False
    for p in pieces:
        text, stopped = m.push(p)
        out.append(text)
        if stopped:
            break
    return "".join(out) + ("" if stopped else m.flush()), stopped, out


def test_stop_across_pushes():
    text, stopped, out = feed(["</end>"], ["Hello </", "en", "d> more"])
    assert (text, stopped) == ("Hello ", True)
    assert out == ["Hello ", "", ""]           # the partial "</" and "en" were held back


def test_stop_in_one_push_and_no_stop():
    assert feed(["STOP"], ["abcSTOPdef"])[:2] == ("abc", True)
    assert feed(["STOP"], ["ab", "c"])[:2] == ("abc", False)


def test_partial_released():
    text, stopped, out = feed(["\n\nUser:"], ["Hi\n", "\nUs", "ed"])
    assert (text, stopped) == ("Hi\n\nUsed", False)
    assert out == ["Hi", "", "\n\nUsed"]
    m = StopMatcher(["###"])
    assert m.push("a##") == ("a", False) and m.flush() == "##"


def test_multiple_and_overlapping_stops():
    assert feed(["abd", "bc"], ["xab", "c"])[:2] == ("xa", True)        # "bc" completes first
    assert feed(["aab"], ["aa", "aab"])[:2] == ("aa", True)              # prefix overlapping itself
    assert feed(["ab", "b"], ["xa", "b"])[:2] == ("x", True)            # earliest start wins
    text, stopped, out = feed(["<|", "<|end|>"], ["a<", "b"])
    assert (text, stopped) == ("a<b", False)
    m = StopMatcher(["x"])
    assert m.push("axb") == ("a", True) and m.push("more") == ("", True) and m.flush() == ""
    assert StopMatcher([]).push("anything") == ("anything", False)
