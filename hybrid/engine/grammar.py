"""Constrained decoding: grammars compiled by llguidance, applied as a logits mask per request.

A grammar is llguidance's serialized form (a string), made from a JSON schema
(`json_schema_grammar`), "any JSON object or array" (`json_object_grammar`) or a Lark
grammar (`lark_grammar`, which may embed JSON schemas with `%json {...}`). Compiling is
cheap (about a millisecond), so each request compiles its own; an invalid one raises
`GrammarError` naming the part of the schema at fault. Every sequence then owns a
`Constraint` (its own matcher state), so batched requests never share parser state.

Why llguidance and not xgrammar: scripts/bench_grammar.py and docs/performance.md
("Grammar mask").
"""

from __future__ import annotations

import json
import math
import weakref

import numpy as np
import torch

from .sampling import Sample, Sampler

# Compact JSON: no free whitespace, so a small model cannot fill its budget with blanks.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """A grammar or JSON schema that the engine cannot compile. `where` is the JSON path of
    the offending part inside the schema ("" for the whole)."""

    def __init__(self, message: str, where: str = ""):
        super().__init__(message)
        self.where = where


def _llg():
    import llguidance

    return llguidance


# ---------------------------------------------------------------- compiling

def json_schema_grammar(schema) -> str:
    """llguidance grammar for documents valid against `schema` (a dict, or True for any JSON)."""
    if not isinstance(schema, (dict, bool)):
        raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}")
    M = _llg().LLMatcher
    try:
        grammar = M.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)
    except (ValueError, TypeError, RuntimeError) as e:
        raise GrammarError(f"invalid JSON schema: {e}") from None
    failed, errors = M.validate_grammar_with_warnings(grammar)
    if failed:
        where, error = _failing_part(schema, schema) or ("", errors[0])
        raise GrammarError(f"the JSON schema cannot be compiled{' at ' + where if where else ''}: {error}", where)
    return grammar


def json_object_grammar() -> str:
    """Any JSON object or array (OpenAI's json_object mode, Ollama's format "json")."""
    return json_schema_grammar({"anyOf": [{"type": "object"}, {"type": "array"}]})


def lark_grammar(text: str) -> str:
    M = _llg().LLMatcher
    try:
        grammar = M.grammar_from_lark(text)
    except ValueError as e:
        raise GrammarError(f"invalid grammar: {e}") from None
    failed, errors = M.validate_grammar_with_warnings(grammar)
    if failed:
        raise GrammarError(f"the grammar cannot be compiled: {errors[0]}")
    return grammar


_CHILDREN = ("properties", "$defs", "definitions", "patternProperties")
_SUBSCHEMA = ("items", "additionalProperties", "not", "if", "then", "else", "contains")
_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")


def _failing_part(node, root, path: str = "") -> tuple[str, str] | None:
    """(path, error) of the deepest sub-schema that fails to compile on its own (root's
    $defs kept, so references resolve), the path such as properties.user.properties.age;
    None when no part fails alone."""
    M = _llg().LLMatcher
    children = []
    if isinstance(node, dict):
        for key in _CHILDREN:
            if isinstance(node.get(key), dict):
                children += [(f"{key}.{k}", v) for k, v in node[key].items()]
        children += [(k, node[k]) for k in _SUBSCHEMA if isinstance(node.get(k), dict)]
        for key in _LISTS:
            if isinstance(node.get(key), list):
                children += [(f"{key}[{i}]", v) for i, v in enumerate(node[key])]
    for name, child in children:
        if not isinstance(child, dict):
            continue
        alone = dict(child)
        for key in ("$defs", "definitions"):
            if isinstance(root, dict) and key in root and key not in alone:
                alone[key] = root[key]
        try:
            failed, errors = M.validate_grammar_with_warnings(
                M.grammar_from_json_schema(json.dumps(alone), defaults=JSON_OPTIONS))
        except (ValueError, TypeError, RuntimeError) as e:
            failed, errors = True, [str(e)]
        if failed:
            where = f"{path}.{name}" if path else name
            return _failing_part(child, root, where) or (where, errors[0])
    return None


# ---------------------------------------------------------------- the tokenizer, as llguidance sees it

_TOKENIZERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def ll_tokenizer(tokenizer):
    """llguidance's view of a hybrid `Tokenizer` (built once per tokenizer, ~1 s at 150k
    tokens): every id's bytes, special tokens marked with a leading 0xFF (so no grammar
    spells them as text), the stop tokens as its end-of-sequence set."""
    found = _TOKENIZERS.get(tokenizer)
    if found is None:
        llg = _llg()
        special = set(tokenizer.special_ids) | set(tokenizer.stop_ids)
        stops = sorted(tokenizer.stop_ids)

        class Words:
            eos_token_id, bos_token_id = stops[0], getattr(tokenizer, "bos_id", None)
            tokens = [b"\xff" + tokenizer.token_bytes(i) if i in special else tokenizer.token_bytes(i)
                      for i in range(tokenizer.vocab_size)]
            special_token_ids = sorted(special)

            def __call__(self, text: bytes) -> list[int]:
                return tokenizer.encode(text.decode("utf-8", "replace"))

        found = _TOKENIZERS[tokenizer] = llg.LLTokenizer(llg.TokenizerWrapper(Words()), eos_token=stops)
    return found


# ---------------------------------------------------------------- one sequence's constraint

class Constraint:
    """A grammar's state for one sequence: masks its logits and takes its tokens.

    max_tokens: when the budget runs short, the document is closed in time: after a draw
    (every token near the budget's end, see EVERY), a closing walk (forced tokens, else the
    first of a few closing tokens the grammar allows) must fit in what is left; if it does
    not, the walk's first token is taken instead and `cut` is set (the request then
    finishes with "length")."""

    EVERY = 16       # the closing walk is checked every EVERY tokens, and every token once the budget
                     # left is within twice the last walk's length plus 2 * EVERY

    def __init__(self, tokenizer, grammar: str):
        llg = _llg()
        self.tok = tokenizer
        self.lltok = ll_tokenizer(tokenizer)
        self.matcher = llg.LLMatcher(self.lltok, grammar)
        if self.matcher.is_error():
            raise GrammarError(f"the grammar cannot be compiled: {self.matcher.get_error()}")
        self.V = tokenizer.vocab_size
        self.cut = False
        self.steps = 0
        self._need = 0          # tokens the closing walk took when last measured
        self._closers = None

    @property
    def done(self) -> bool:
        """The grammar is complete and allows nothing but the end."""
        return self.matcher.is_stopped()

    def allowed(self) -> torch.Tensor:
        """bool [V]: the tokens the grammar allows next."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        return torch.from_numpy(np.unpackbits(bits, bitorder="little")[: self.V].astype(bool))

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [V'] (V' >= V, padded rows never allowed) with disallowed tokens at -inf."""
        ok = torch.zeros(logits.shape[-1], dtype=torch.bool)
        ok[: self.V] = self.allowed()
        return logits.masked_fill(~ok.to(logits.device), -math.inf)

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"grammar: token {token} was not allowed: {self.matcher.get_error()}")

    def pick(self, sampler: Sampler, logits: torch.Tensor, remaining: int) -> Sample:
        """Draw a token the grammar allows; remaining: tokens left, this one included."""
        token = sampler.draw(self.mask(logits))
        self.steps += 1
        if remaining <= 2 * (self._need + self.EVERY) or self.steps % self.EVERY == 0:
            walk = self._close_after(token, remaining - 1)
            if walk is None:
                forced = self.closing_walk(remaining)
                if forced:
                    token, self.cut = forced[0], True
            else:
                self._need = len(walk)
        return sampler.record(logits, token)   # logprobs under the model, not the mask

    def closing_walk(self, budget: int) -> list[int] | None:
        """The tokens this constraint would force to end the document from here, within
        `budget` (None: it cannot)."""
        return self._closing_walk(self.matcher.deep_copy(), budget)

    def _close_after(self, token: int, budget: int):
        m = self.matcher.deep_copy()
        if not m.consume_token(token):
            return None
        return self._closing_walk(m, budget)

    def _closing_walk(self, m, budget: int) -> list[int] | None:
        """Tokens that bring matcher m (a copy: it is advanced) to an accepting state within
        `budget` tokens, or None. Greedy: forced tokens first; inside a string (where a
        letter is allowed) the closing quote, else one more letter; elsewhere the first
        allowed of a few short closers, else the lowest allowed id."""
        if self._closers is None:
            self._closers = {t: self._single(t) for t in ("}", "]", "0", "null", '"', ":", "x")}
        c = self._closers
        order = [c[t] for t in ("}", "]", "0", "null", '"', ":") if c[t] is not None]
        out: list[int] = []
        while not m.is_accepting():
            if len(out) >= budget:
                return None
            step = m.compute_ff_tokens()
            if not step:
                ok = [t for t in order if m.validate_tokens([t]) == 1]
                if c["x"] is not None and m.validate_tokens([c["x"]]) == 1:   # inside a string
                    ok = [c['"']] if c['"'] in ok else [c["x"]]
                if not ok:
                    bits = np.frombuffer(m.compute_bitmask(), dtype=np.uint8)
                    ok = np.flatnonzero(np.unpackbits(bits, bitorder="little")[: self.V]).tolist()
                if not ok:
                    return None
                step = ok[:1]
            for t in step:
                if not m.consume_token(t):
                    return None
                out.append(t)
        return out if len(out) <= budget else None

    def _single(self, text: str) -> int | None:
        ids = self.tok.encode(text)
        return ids[0] if len(ids) == 1 and self.tok.token_text(ids[0]) == text else None
