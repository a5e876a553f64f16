"""gpt-oss's chat format (harmony) as a Jinja chat template, for files that carry none.

What it writes: a system message (identity, knowledge cutoff, date, reasoning effort,
the valid channels), a developer message with the request's system/developer text under
"# Instructions" and the tools as a TypeScript-like `namespace functions`, then the
conversation: user messages, assistant answers on the `final` channel (the reasoning of
the current turn's calls on `analysis`), calls as `commentary to=functions.NAME
<|constrain|>json` messages ended by `<|call|>`, and tool results from
`functions.NAME to=assistant`. Template variables besides the usual ones:
`reasoning_effort` (low, medium, high; medium when unset) and `model_identity`.
"""

HARMONY = r"""
{%- macro ts(s) -%}
{%- if s is not mapping -%}any
{%- elif s.enum is defined -%}{% for v in s.enum %}{{ v | tojson }}{{ " | " if not loop.last else "" }}{% endfor %}
{%- elif s.anyOf is defined or s.oneOf is defined -%}
{%- for alt in (s.anyOf if s.anyOf is defined else s.oneOf) %}{{ ts(alt) }}{{ " | " if not loop.last else "" }}{% endfor %}
{%- elif s.type is defined and s.type is not string -%}
{%- for t in s.type %}{{ ts({"type": t, "items": s.get("items"), "properties": s.get("properties"), "required": s.get("required")}) }}{{ " | " if not loop.last else "" }}{% endfor %}
{%- elif s.type == "string" -%}string
{%- elif s.type in ("number", "integer") -%}number
{%- elif s.type == "boolean" -%}boolean
{%- elif s.type == "null" -%}null
{%- elif s.type == "array" -%}{{ ts(s["items"]) if s["items"] is mapping else "any" }}[]
{%- elif s.type == "object" and s.properties -%}{
{{ props(s) }}}
{%- else -%}{{ "object" if s.type == "object" else "any" }}
{%- endif -%}
{%- endmacro -%}

{%- macro props(s) -%}
{%- for name, p in s.properties.items() -%}
{%- if p is mapping and p.description %}// {{ p.description }}
{% endif -%}
{{ name }}{{ "?" if name not in (s.required or []) else "" }}: {{ ts(p) }},{% if p is mapping and p.default is defined %} // default: {{ p.default | tojson }}{% endif %}

{% endfor -%}
{%- endmacro -%}

{%- set ns = namespace(instructions="", last_user=-1, calls=[], k=0) -%}
{%- for m in messages -%}
{%- if m.role in ("system", "developer") and m.content -%}
{%- set ns.instructions = ns.instructions + ("\n\n" if ns.instructions else "") + m.content -%}
{%- elif m.role == "user" -%}{%- set ns.last_user = loop.index0 -%}
{%- endif -%}
{%- endfor -%}

<|start|>system<|message|>{{ model_identity | default("You are ChatGPT, a large language model trained by OpenAI.") }}
Knowledge cutoff: 2024-06
Current date: {{ strftime_now("%Y-%m-%d") }}

Reasoning: {{ reasoning_effort | default("medium", true) }}

# Valid channels: analysis, commentary, final. Channel must be included for every message.
{%- if tools %}

Calls to these tools must go to the commentary channel: 'functions'.
{%- endif %}<|end|>
{%- if ns.instructions or tools -%}
<|start|>developer<|message|>
{%- if ns.instructions %}# Instructions

{{ ns.instructions }}
{%- if tools %}


{% endif -%}
{%- endif -%}
{%- if tools -%}
# Tools

## functions

namespace functions {

{% for t in tools -%}
{%- set f = t.function if t.function is defined else t -%}
{%- if f.description %}// {{ f.description }}
{% endif -%}
{%- if f.parameters is mapping and f.parameters.properties -%}
type {{ f.name }} = (_: {
{{ props(f.parameters) }}}) => any;
{%- else -%}
type {{ f.name }} = () => any;
{%- endif %}


{% endfor -%}
} // namespace functions
{%- endif -%}
<|end|>
{%- endif -%}

{%- for m in messages -%}
{%- if m.role == "user" -%}
<|start|>user<|message|>{{ m.content }}<|end|>
{%- elif m.role == "assistant" -%}
{%- set reasoning = m.reasoning_content if m.reasoning_content is defined and m.reasoning_content else "" -%}
{%- if m.tool_calls -%}
{%- if reasoning and loop.index0 > ns.last_user -%}
<|start|>assistant<|channel|>analysis<|message|>{{ reasoning }}<|end|>
{%- endif -%}
{%- if m.content -%}
<|start|>assistant<|channel|>commentary<|message|>{{ m.content }}<|end|>
{%- endif -%}
{%- for c in m.tool_calls -%}
{%- set f = c.function if c.function is defined else c -%}
<|start|>assistant<|channel|>commentary to=functions.{{ f.name }} <|constrain|>json<|message|>
{{- f.arguments if f.arguments is string else f.arguments | tojson }}<|call|>
{%- endfor -%}
{%- set ns.calls = m.tool_calls -%}{%- set ns.k = 0 -%}
{%- else -%}
{%- if reasoning and loop.index0 > ns.last_user -%}
<|start|>assistant<|channel|>analysis<|message|>{{ reasoning }}<|end|>
{%- endif -%}
<|start|>assistant<|channel|>final<|message|>{{ m.content }}<|end|>
{%- endif -%}
{%- elif m.role == "tool" -%}
{%- set found = ns.calls | selectattr("id", "equalto", m.tool_call_id) | list if m.tool_call_id is defined else [] -%}
{%- set call = found[0] if found else (ns.calls[ns.k] if ns.k < ns.calls | length else none) -%}
{%- set name = m.name if m.name is defined and m.name else (call.function.name if call else "unknown") -%}
<|start|>functions.{{ name }} to=assistant<|channel|>commentary<|message|>{{ m.content }}<|end|>
{%- set ns.k = ns.k + 1 -%}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}<|start|>assistant{%- endif -%}
"""
