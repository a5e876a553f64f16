"""Tokenizers for GGUF and Hugging Face checkpoints.

One `Tokenizer` over two encoders: a `tokenizers.Tokenizer` (byte-level BPE, or any
tokenizer.json) and a `sentencepiece.SentencePieceProcessor` (SPM vocabularies, built in
memory from GGUF metadata or read from tokenizer.model). Decoding never goes through the
libraries: every id has a fixed byte string (`token_bytes`), so full decoding and
streaming (`StreamDecoder`) agree byte for byte.
"""

from __future__ import annotations

import codecs
import json
import re
from dataclasses import dataclass
from pathlib import Path

from hybrid.files.chat_template import render

# GGUF / SentencePiece token types (the two use the same numbers).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Tokens that end an assistant turn (stop tokens besides EOS).
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>",
               "<|endoftext|>", "<|end_of_text|>", "<｜end▁of▁sentence｜>", "</s>")
# A vocabulary with both is harmony's (gpt-oss): they end its turns, and <|end|> does not.
HARMONY_STOPS = ("<|return|>", "<|call|>")


# ---------------------------------------------------------------- GGUF metadata

def gguf_metadata(path) -> dict[str, object]:
    """All key/value fields of a GGUF file as plain Python values (header only)."""
    from hybrid.files.checkpoint import open_gguf

    return open_gguf(path).metadata


# ---------------------------------------------------------------- pre-tokenizers

# Split regexes per `tokenizer.ggml.pre` (the patterns of the models' tokenizer.json files;
# llama.cpp names the same list). Each is applied as an isolated split, then byte-level.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEEPSEEK3 = [r"\p{N}{1,3}", "[一-龥぀-ゟ゠-ヿ]+",
              r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
              r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"]
_DEEPSEEK_LLM = [
    "[\r\n]",
    r"\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-"
    "ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-"
    "ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
    r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
    r"\s+$",
    "[一-龥ࠀ-一가-퟿]+",
    r"\p{N}+",
]
# pre name -> (split regexes, then GPT-2 regex inside byte-level?, NFC normalizer?)
_PRE = {
    "gpt-2": ([], True, False), "default": ([], True, False),
    "smollm": ([r"\p{N}"], True, False), "starcoder": ([r"\p{N}"], True, False),
    "llama-bpe": ([_LLAMA3], False, False), "llama3": ([_LLAMA3], False, False),
    "qwen2": ([_QWEN2], False, True),
    "deepseek-llm": (_DEEPSEEK_LLM, False, False),
    "deepseek-v3": (_DEEPSEEK3, False, False),
    "tekken": ([_TEKKEN], False, False), "mistral-bpe": ([_TEKKEN], False, False),
}


def _byte_level_tables():
    """GPT-2's printable stand-in for each byte, and its inverse."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = iter(range(256, 512))
    to_char = {b: chr(b) if b in keep else chr(next(extra)) for b in range(256)}
    return to_char, {c: b for b, c in to_char.items()}


_BYTE_TO_CHAR, _CHAR_TO_BYTE = _byte_level_tables()


# str.translate table: each stand-in to the character of its byte (latin-1), any other
# character below 256 to one that latin-1 cannot encode (above 511 they stay as they are).
_TO_LATIN1 = {c: _CHAR_TO_BYTE.get(chr(c), 0xFFFF) for c in range(512)}


def _byte_level_bytes(piece: str) -> bytes:
    try:  # a vocabulary has ~50-150k pieces: translate in C, not a byte at a time
        return piece.translate(_TO_LATIN1).encode("latin-1")
    except UnicodeEncodeError:  # not a byte-level piece (added token text)
        return piece.encode("utf-8")


def _spm_bytes(piece: str, ttype: int) -> bytes:
    if ttype == BYTE:
        return bytes([int(piece[3:-1], 16)])
    return piece.replace("\u2581", " ").encode("utf-8")


def _bpe_from_gguf(tokens, types, merges, pre):
    """A tokenizers.Tokenizer for a GGUF byte-level BPE vocabulary."""
    from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers, decoders
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    if pre not in _PRE:
        raise ValueError(f"unsupported tokenizer.ggml.pre {pre!r}; supported: {', '.join(sorted(_PRE))}")
    splits, gpt2_regex, nfc = _PRE[pre]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = HFTokenizer(BPE(vocab, [tuple(m.split(" ", 1)) for m in merges], fuse_unk=False))
    steps = [pre_tokenizers.Split(Regex(r), "isolated") for r in splits]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=gpt2_regex))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.add_tokens([AddedToken(tokens[i], special=types[i] == CONTROL, normalized=False)
                    for i in range(len(tokens)) if types[i] in (CONTROL, USER_DEFINED)])
    return tok


def _sentencepiece(proto):
    """A SentencePieceProcessor from a ModelProto; the dummy prefix is added by the caller."""
    import sentencepiece as spm
    proto.normalizer_spec.add_dummy_prefix = False
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def _spm_proto_from_gguf(tokens, scores, types):
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.trainer_spec.model_type = pb.TrainerSpec.BPE
    proto.trainer_spec.vocab_size = len(tokens)
    proto.trainer_spec.byte_fallback = BYTE in types
    unk = types.index(UNKNOWN) if UNKNOWN in types else None
    proto.trainer_spec.unk_id = unk if unk is not None else 0
    proto.trainer_spec.bos_id = proto.trainer_spec.eos_id = proto.trainer_spec.pad_id = -1
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    for i, (t, s, ty) in enumerate(zip(tokens, scores, types)):
        p = proto.pieces.add()
        p.piece, p.score = t, s
        # SentencePiece wants exactly one unknown piece; in a vocabulary without one
        # (rare) piece 0 stands in.
        p.type = UNKNOWN if i == proto.trainer_spec.unk_id else (ty if ty != UNKNOWN else CONTROL)
    return proto


class _SpmEncoder:
    """SentencePiece with special tokens split out first, as llama.cpp / HF do.

    `prefix` is the dummy-prefix rule: "never", "first" (only text that starts the input;
    HF non-legacy) or "always" (every text run, also after a special token; llama.cpp and
    HF legacy). `hf_spaces`: as HF's Metaspace, no prefix for a run already starting with
    a space (SentencePiece and llama.cpp add one regardless).
    """

    def __init__(self, sp, specials: dict[str, int], prefix: str, hf_spaces: bool = False):
        self.sp, self.specials, self.prefix, self.hf_spaces = sp, specials, prefix, hf_spaces
        self.split = re.compile("(" + _trie_regex(specials) + ")") if specials else None

    def encode(self, text: str) -> list[int]:
        parts = self.split.split(text) if self.split else [text]
        ids, start = [], True
        for i, part in enumerate(parts):
            if i % 2:
                ids.append(self.specials[part])
            elif part:
                if self.prefix == "always" or (self.prefix == "first" and start):
                    if not (self.hf_spaces and part.startswith(" ")):
                        part = " " + part
                ids.extend(self.sp.encode(part))
            start = False
        return ids


def _trie_regex(words) -> str:
    """A regex matching the longest of `words` at a position, written as a trie so that
    thousands of special tokens cost one character test per position, not thousands."""
    trie: dict = {}
    for w in words:
        node = trie
        for c in w:
            node = node.setdefault(c, {})
        node[""] = {}

    def pattern(node):
        alts = [re.escape(c) + pattern(child) for c, child in node.items() if c]
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        if "" in node:  # a word may end here: prefer going on (longest match)
            return "(?:" + body + ")?" if len(alts) == 1 else body + "?"
        return body

    return pattern(trie)


class _HFEncoder:
    def __init__(self, tok):
        self.tok = tok

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids if text else []


# ---------------------------------------------------------------- Tokenizer

class Tokenizer:
    """Text <-> ids, chat template and stop tokens of one model."""

    def __init__(self, encoder, pieces: list[str], piece_bytes: list[bytes], special: set[int], *,
                 bos_id=None, eos_id=None, add_bos=False, strip_leading_space=False,
                 chat_template=None, extra_stop_ids=()):
        self._encoder = encoder
        self._pieces = pieces
        self._bytes = piece_bytes
        self.special_ids = special  # skipped by decode(skip_special_tokens=True)
        self.vocab_size = len(pieces)
        self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, add_bos
        self.strip_leading_space = strip_leading_space  # SPM dummy prefix, removed on decode
        self.chat_template = chat_template
        self.bos_token = pieces[bos_id] if bos_id is not None else ""
        self.eos_token = pieces[eos_id] if eos_id is not None else ""
        self._ids = {t: i for i, t in enumerate(pieces)}
        # end-of-turn tokens the template writes, or that the vocabulary marks as special
        eot = {self._ids[t] for t in END_OF_TURN
               if t in self._ids and (t in (chat_template or "") or self._ids[t] in special)}
        self.stop_ids = {i for i in (eos_id, *extra_stop_ids) if i is not None} | eot
        if all(t in self._ids for t in HARMONY_STOPS):
            # harmony (gpt-oss): <|end|> closes a message inside the turn (analysis, then the
            # answer follows); the turn ends at <|return|> (answer) or <|call|> (tool call)
            self.stop_ids = (self.stop_ids - {self._ids["<|end|>"]}) | {self._ids[t] for t in HARMONY_STOPS}

    # -- construction

    @classmethod
    def from_gguf(cls, metadata: dict) -> "Tokenizer":
        model = metadata.get("tokenizer.ggml.model")
        tokens = metadata["tokenizer.ggml.tokens"]
        types = metadata.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
        bos = metadata.get("tokenizer.ggml.bos_token_id")
        eos = metadata.get("tokenizer.ggml.eos_token_id")
        extra = [metadata.get(f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom")]
        common = dict(bos_id=bos, eos_id=eos, chat_template=metadata.get("tokenizer.chat_template"),
                      extra_stop_ids=extra)
        special = {i for i, t in enumerate(types) if t in (CONTROL, UNKNOWN)}
        if model == "gpt2":
            enc = _HFEncoder(_bpe_from_gguf(tokens, types, metadata["tokenizer.ggml.merges"],
                                            metadata.get("tokenizer.ggml.pre", "default")))
            pb = [t.encode() if ty in (CONTROL, USER_DEFINED) else _byte_level_bytes(t)
                  for t, ty in zip(tokens, types)]
            add_bos = metadata.get("tokenizer.ggml.add_bos_token", False)
            return cls(enc, tokens, pb, special, add_bos=add_bos, **common)
        if model == "llama":
            scores = metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
            sp = _sentencepiece(_spm_proto_from_gguf(tokens, scores, types))
            space = metadata.get("tokenizer.ggml.add_space_prefix", True)
            specials = {tokens[i]: i for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED, UNKNOWN)}
            enc = _SpmEncoder(sp, specials, "always" if space else "never")
            pb = [t.encode() if ty in (CONTROL, USER_DEFINED, UNKNOWN) else _spm_bytes(t, ty)
                  for t, ty in zip(tokens, types)]
            add_bos = metadata.get("tokenizer.ggml.add_bos_token", True)
            return cls(enc, tokens, pb, special, add_bos=add_bos, strip_leading_space=space, **common)
        raise ValueError(f"unsupported tokenizer.ggml.model {model!r}; "
                         "supported: 'gpt2' (BPE), 'llama' (SentencePiece)")

    @classmethod
    def from_pretrained(cls, directory) -> "Tokenizer":
        d = Path(directory)
        config = _read_json(d / "tokenizer_config.json")
        smap = _read_json(d / "special_tokens_map.json")
        gen = _read_json(d / "generation_config.json")
        if (d / "tokenizer.json").exists():
            v = _from_tokenizer_json(d / "tokenizer.json")
        elif (d / "tokenizer.model").exists():
            v = _from_sentencepiece_file(d / "tokenizer.model", config)
        else:
            raise FileNotFoundError(f"{d}: neither tokenizer.json nor tokenizer.model")

        ids = {p: i for i, p in enumerate(v.pieces)}

        def token_id(key, default):
            t = config.get(key) or smap.get(key)
            t = t.get("content") if isinstance(t, dict) else t
            return ids.get(t) if t is not None else default

        bos, eos = token_id("bos_token", v.bos_id), token_id("eos_token", v.eos_id)
        add_bos = config.get("add_bos_token")
        add_bos = v.add_bos if add_bos is None else add_bos
        gen_eos = gen.get("eos_token_id")
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None and (d / "chat_template.jinja").exists():
            template = (d / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(v.encoder, v.pieces, v.piece_bytes, v.special, bos_id=bos, eos_id=eos,
                   add_bos=bool(add_bos and bos is not None), strip_leading_space=v.strip_leading_space,
                   chat_template=template, extra_stop_ids=gen_eos if isinstance(gen_eos, list) else [gen_eos])

    # -- text <-> ids

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = self._encoder.encode(text)
        if add_special_tokens and self.add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        d = StreamDecoder(self, skip_special_tokens)
        return "".join(d.push(int(i)) for i in ids) + d.flush()

    def token_bytes(self, id) -> bytes:
        return self._bytes[id]

    def token_text(self, id) -> str:
        return self._bytes[id].decode("utf-8", errors="replace")

    def token_to_id(self, text: str) -> int | None:
        return self._ids.get(text)

    def apply_chat_template(self, messages, add_generation_prompt=True, tools=None, **extra) -> str:
        return render(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                      bos_token=self.bos_token, eos_token=self.eos_token, tools=tools, **extra)

    def decoder(self, skip_special_tokens: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)


class StreamDecoder:
    """Incremental detokenizer: feeds token bytes through an incremental UTF-8 decoder, so
    an incomplete character is held back until its last byte arrives and the concatenated
    output equals `Tokenizer.decode` of the same ids."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tok, self.skip = tokenizer, skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._strip = tokenizer.strip_leading_space  # until the first byte goes out

    def push(self, token_id: int) -> str:
        if self.skip and token_id in self.tok.special_ids:
            return ""
        b = self.tok._bytes[token_id]
        if self._strip and b:
            b, self._strip = b[1:] if b[:1] == b" " else b, False
        return self._utf8.decode(b)

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


# ---------------------------------------------------------------- HF directory helpers

def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


@dataclass
class _Vocab:
    """What a tokenizer file yields; bos/eos/add_bos are the file's own defaults."""
    encoder: object
    pieces: list[str]
    piece_bytes: list[bytes]
    special: set[int]
    strip_leading_space: bool
    bos_id: int | None = None
    eos_id: int | None = None
    add_bos: bool = False


def _from_tokenizer_json(path: Path) -> _Vocab:
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer.from_file(str(path))
    pieces = [""] * tok.get_vocab_size(with_added_tokens=True)
    for piece, i in tok.get_vocab(with_added_tokens=True).items():
        pieces[i] = piece
    added = tok.get_added_tokens_decoder()
    decoder = json.loads(tok.decoder.__getstate__()) if tok.decoder else {}
    post = json.loads(tok.post_processor.__getstate__()) if tok.post_processor else None
    kind = json.dumps(decoder)
    strip = False
    if "ByteLevel" in kind:
        pb = [_byte_level_bytes(p) for p in pieces]
    elif "ByteFallback" in kind or "Metaspace" in kind or "\\u2581" in kind:
        byte_piece = re.compile(r"<0x[0-9A-Fa-f]{2}>")
        pb = [_spm_bytes(p, BYTE if byte_piece.fullmatch(p) else NORMAL) for p in pieces]
        strip = _decoder_strips(decoder)
    else:  # WordPiece and friends: whatever the library makes of each token alone
        pb = [tok.decode([i], skip_special_tokens=False).encode() for i in range(len(pieces))]
    for i, a in added.items():  # added tokens decode to their text as is
        pb[i] = a.content.encode()
    special = {i for i, a in added.items() if a.special}
    return _Vocab(_HFEncoder(tok), pieces, pb, special, strip, add_bos=_post_adds_bos(post))


def _post_adds_bos(post: dict | None) -> bool:
    """Whether a tokenizer.json post-processor puts a special token before the text."""
    if not post:
        return False
    if post.get("type") == "Sequence":
        return any(_post_adds_bos(p) for p in post.get("processors", []))
    if post.get("type") == "TemplateProcessing":
        single = post.get("single") or []
        return bool(single) and "SpecialToken" in single[0]
    return post.get("type") in ("BertProcessing", "RobertaProcessing")


def _decoder_strips(dec: dict) -> bool:
    """Whether a SentencePiece-style tokenizer.json decoder drops the leading dummy space."""
    if dec.get("type") == "Sequence":
        return any(_decoder_strips(d) for d in dec.get("decoders", []))
    if dec.get("type") == "Strip":
        return dec.get("start", 0) > 0
    if dec.get("type") == "Metaspace":
        return dec.get("prepend_scheme", "always") != "never" and dec.get("add_prefix_space", True)
    return False


def _from_sentencepiece_file(path: Path, config: dict) -> _Vocab:
    """tokenizer.model, tokenized as transformers' LlamaTokenizer does (prefix rule from
    tokenizer_config's legacy flag, HF's handling of text that starts with a space)."""
    from sentencepiece import sentencepiece_model_pb2 as pb2

    proto = pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    dummy = proto.normalizer_spec.add_dummy_prefix
    if config.get("add_prefix_space") is not None:
        dummy = bool(config["add_prefix_space"])
    pieces = [p.piece for p in proto.pieces]
    types = [p.type for p in proto.pieces]
    sp = _sentencepiece(proto)
    pb = [p.encode() if t in (CONTROL, USER_DEFINED, UNKNOWN) else _spm_bytes(p, t) for p, t in zip(pieces, types)]
    special = {i for i, t in enumerate(types) if t in (CONTROL, UNKNOWN)}
    # Added tokens of tokenizer_config.json, possibly past the end of the SentencePiece vocabulary.
    for sid, a in sorted((int(k), v) for k, v in config.get("added_tokens_decoder", {}).items()):
        while len(pieces) <= sid:
            pieces.append(""), pb.append(b""), types.append(UNUSED)
        pieces[sid], pb[sid], types[sid] = a["content"], a["content"].encode(), CONTROL
        if a.get("special", True):
            special.add(sid)
    specials = {pieces[i]: i for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED, UNKNOWN)}
    prefix = "never" if not dummy else "always" if config.get("legacy", False) else "first"
    t = proto.trainer_spec
    return _Vocab(_SpmEncoder(sp, specials, prefix, hf_spaces=True), pieces, pb, special, dummy,
                  bos_id=t.bos_id if 0 <= t.bos_id < len(pieces) else None,
                  eos_id=t.eos_id if 0 <= t.eos_id < len(pieces) else None, add_bos=True)
