"""The grammar engine (hybrid.engine.grammar, over llguidance): compiling schemas, masks, closing in
time for max_tokens, and constrained generation on the built-in model, batched, each request
with its own schema and matcher."""

import json

import pytest
import torch

jsonschema = pytest.importorskip("jsonschema")

from hybrid.engine.grammar import (Constraint, GrammarError, json_object_grammar,  # noqa: E402
                            json_schema_grammar, lark_grammar)
from hybrid.engine.sampling import Sampler, SamplingParams  # noqa: E402

SCHEMAS = {
    "enum+nullable": {"type": "object", "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "note": {"type": ["string", "null"], "maxLength": 24}},
        "required": ["color", "note"], "additionalProperties": False},
    "array bounds": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 2, "maxItems": 3}},
        "required": ["tags"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                     "zip": {"type": ["integer", "null"]}},
                    "required": ["city", "zip"], "additionalProperties": False}},
        "required": ["name", "age", "address"], "additionalProperties": False},
}


@pytest.mark.parametrize("schema, where, what", [
    ({"type": "object", "properties": {"a": {"type": "nope"}}}, "properties.a", "Invalid type"),
    ({"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "integer",
      "minimum": 5, "maximum": 1}}, "required": ["b"]}}, "required": ["a"]},
     "properties.a.properties.b", "minimum"),
    ({"type": "array", "items": {"type": "string", "pattern": "(("}}, "items", "unclosed group"),
    ({"$ref": "#/$defs/missing"}, "", "does not exist"),
])
def test_a_schema_that_cannot_compile_names_the_part(schema, where, what):
    with pytest.raises(GrammarError, match=what) as e:
        json_schema_grammar(schema)
    assert e.value.where == where
    assert (where in str(e.value)) if where else True


def test_bad_grammar_and_non_object_schema_are_errors():
    with pytest.raises(GrammarError):
        lark_grammar("start: (")
    with pytest.raises(GrammarError, match="must be an object"):
        json_schema_grammar(["not", "a", "schema"])


def test_mask_allows_only_what_the_grammar_does(tok):
    c = Constraint(tok, json_schema_grammar(SCHEMAS["enum+nullable"]))
    for t in tok.encode('{"color": "'):
        c.accept(t)
    allowed = [tok.token_text(i) for i in c.allowed().nonzero().flatten().tolist()]
    assert allowed and all(any(v.startswith(a) for v in ("red", "green", "blue")) for a in allowed)
    masked = c.mask(torch.zeros(tok.vocab_size + 7))     # padded logits rows are never allowed
    assert torch.isinf(masked[tok.vocab_size:]).all() and (masked == 0).sum() == len(allowed)
    with pytest.raises(RuntimeError, match="not allowed"):
        c.accept(tok.encode("purple")[0])


@pytest.mark.parametrize("name", list(SCHEMAS))
@pytest.mark.parametrize("budget", [3, 12, 24, 40])
def test_closes_within_a_tight_budget(tok, name, budget):
    """Random logits (no model prior) under a small max_tokens still give a complete,
    valid document whenever one fits, within the budget."""
    schema = SCHEMAS[name]
    c = Constraint(tok, json_schema_grammar(schema))
    shortest = len(c.closing_walk(100))
    sampler = Sampler(SamplingParams(temperature=1.0, seed=budget), [1])
    g = torch.Generator().manual_seed(budget)
    out = []
    for remaining in range(budget, 0, -1):
        t = c.pick(sampler, torch.randn(tok.vocab_size, generator=g) * 3, remaining).token
        c.accept(t)
        out.append(t)
        if c.done:
            break
    text = tok.decode(out)
    if c.done:
        jsonschema.validate(json.loads(text), schema)
    else:
        assert budget < shortest, text


def test_json_object_grammar_gives_objects_or_arrays(tok):
    c = Constraint(tok, json_object_grammar())
    first = {tok.token_text(i)[:1] for i in c.allowed().nonzero().flatten().tolist()}
    assert first <= {"{", "["}


# ---------------------------------------------------------------- on the built-in model

@pytest.fixture(scope="module")
def engine(smollm_path):
    import hybrid
    from hybrid.engine.scheduler import Engine

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Engine(hybrid.load(smollm_path, rules="torch-cpu"), slots=4, ctx=512)
    torch.set_num_threads(threads)


def test_batched_requests_each_follow_their_own_schema(engine):
    """Three schemas, two seeds each, all in the engine at once (one batch, one matcher each)."""
    from hybrid.engine.generate import chat_prompt_ids, collect

    tok = engine.tokenizer
    jobs = []
    for name, schema in SCHEMAS.items():
        ask = chat_prompt_ids(tok, [{"role": "user", "content": f"Give a JSON object for: {name}. "
                                                                  f"Schema: {json.dumps(schema)}"}])
        for seed in (1, 2):
            params = SamplingParams(temperature=0.9, seed=seed, max_tokens=80)
            jobs.append((schema, engine.submit(ask, params, grammar=json_schema_grammar(schema))))
    for schema, stream in jobs:
        out = collect(stream)
        jsonschema.validate(json.loads(out.text), schema)
        assert out.finish_reason in ("stop", "length")
