"""Chat templates render exactly as transformers' apply_chat_template(..., tokenize=False)."""

import pytest

from hybrid.files.chat_template import CHATML, ChatTemplateError, render
from hybrid.files.tokenizer import gguf_metadata

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Mistral-instruct style: alternating roles enforced with raise_exception.
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

QWEN_CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Multi-line, block tags on their own lines (trim_blocks / lstrip_blocks matter), tools as
# JSON, namespace(), loop controls, strftime_now and {% generation %}.
TOOLS = """\
{% set ns = namespace(n=0) %}
{% if tools %}
<|im_start|>system
Today is {{ strftime_now("%Y") }}. Tools:
    {% for tool in tools %}
{{ tool | tojson }}
{{ tool | tojson(indent=2) }}
    {% endfor %}
<|im_end|>
{% endif %}
{% for message in messages %}
    {% if message.role == 'skip' %}{% continue %}{% endif %}
    {% set ns.n = ns.n + 1 %}
<|im_start|>{{ message.role }} #{{ ns.n }}
    {% if message.role == 'assistant' %}
{% generation %}{{ message.content }}{% endgeneration %}
    {% else %}
{{ message.content }}
    {% endif %}
<|im_end|>
{% endfor %}
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "  Bonjour, ça va ? 你好 "},
    {"role": "assistant", "content": "Oui."},
    {"role": "user", "content": "Et toi ?"},
]
TOOL_DEFS = [{"type": "function", "function": {
    "name": "météo", "description": "Weather <in> \"city\"",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def hf():
    """A minimal transformers tokenizer: only its apply_chat_template is used."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    return transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")),
                                                bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def both(hf, template, messages, add_generation_prompt=True, **kw):
    ours = render(template, messages, add_generation_prompt=add_generation_prompt,
                  bos_token="<s>", eos_token="</s>", **kw)
    theirs = hf.apply_chat_template(messages, chat_template=template, tokenize=False,
                                    add_generation_prompt=add_generation_prompt, **kw)
    return ours, theirs


@pytest.mark.parametrize("template", [LLAMA3, QWEN_CHATML, CHATML], ids=["llama3", "qwen", "chatml"])
@pytest.mark.parametrize("gen", [True, False])
def test_matches_transformers(hf, template, gen):
    for messages in (CHAT, CHAT[1:], CHAT[1:2]):
        ours, theirs = both(hf, template, messages, add_generation_prompt=gen)
        assert ours == theirs


def test_mistral(hf):
    ours, theirs = both(hf, MISTRAL, CHAT[1:])
    assert ours == theirs == "<s>[INST]   Bonjour, ça va ? 你好  [/INST]Oui.</s>[INST] Et toi ? [/INST]"


def test_raise_exception(hf):
    bad = [CHAT[1], CHAT[1]]
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate"):
        render(MISTRAL, bad)
    with pytest.raises(Exception, match="Conversation roles must alternate"):
        hf.apply_chat_template(bad, chat_template=MISTRAL, tokenize=False)
    assert issubclass(ChatTemplateError, ValueError)


def test_tools_template(hf):
    messages = [*CHAT, {"role": "skip", "content": "x"}]
    for tools in (TOOL_DEFS, None):
        ours, theirs = both(hf, TOOLS, messages, tools=tools)
        assert ours == theirs
        assert ('"name": "météo"' in ours) == (tools is not None)  # tojson keeps non-ASCII
    assert "<|im_start|>assistant #3\nOui.<|im_end|>" in ours


def test_smollm_template(hf, smollm_path):
    template = gguf_metadata(smollm_path)["tokenizer.chat_template"]
    for messages in (CHAT, CHAT[1:]):
        ours, theirs = both(hf, template, messages)
        assert ours == theirs
    assert render(template, CHAT[1:2]).startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_extra_variables(hf):
    template = "{% if enable_thinking %}think{% endif %}{{ messages[0].reasoning_content }}|{{ messages[0].thinking }}"
    messages = [{"role": "assistant", "content": "", "reasoning": "hmm"}]
    ours, theirs = both(hf, template, messages, enable_thinking=True)
    assert ours == theirs == "thinkhmm|hmm"


def test_fallback_is_chatml():
    assert render(None, CHAT[1:2]) == "<|im_start|>user\n  Bonjour, ça va ? 你好 <|im_end|>\n<|im_start|>assistant\n"


def test_sandbox():
    with pytest.raises(ChatTemplateError):
        render("{{ ''.__class__.__mro__[1].__subclasses__() }}", [])
    with pytest.raises(ChatTemplateError):
        render("{% set ns = namespace(_x=1) %}", [])
    with pytest.raises(ChatTemplateError, match="syntax"):
        render("{% for %}", [])
