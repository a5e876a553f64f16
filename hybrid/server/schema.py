"""The API's request bodies as pydantic models: the one place that says what each field
may be, used both to validate requests and to write the OpenAPI document (/openapi.json).

Unknown fields are ignored, as OpenAI and Ollama do. Types are strict where JSON clients
could be confused (a bool is not a number, "2" is not an integer); 2.0 is the integer 2.
What depends on several fields (top_logprobs needs logprobs, prompts times n) is checked
in requests.py, which turns these models into what the routes use.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictStr, ValidationError

from .errors import invalid

MAX_CHOICES = 16     # n, times the number of prompts for /v1/completions
MAX_STOP = 4
MAX_TOP_LOGPROBS = 20
MIN_PENALTY = 0.01   # a repetition penalty divides logits: smaller ones overflow them


def _no_bool_or_str(kind: str):
    def check(v):
        if isinstance(v, (bool, str)):
            raise ValueError(f"must be {kind}, got {type(v).__name__}")
        return v
    return BeforeValidator(check)


def Number(**bounds):
    return Annotated[float, Field(allow_inf_nan=False, **bounds), _no_bool_or_str("a number")]


def Integer(**bounds):
    return Annotated[int, Field(**bounds), _no_bool_or_str("an integer")]


TokenId = Integer(ge=0)
Text = Annotated[StrictStr, Field(min_length=1)]
Stop = Union[Text, Annotated[list[Text], Field(max_length=MAX_STOP)]]
Seed = Integer(ge=-(2**63), le=2**64 - 1)


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ---------------------------------------------------------------- OpenAI

class ContentPart(Body):
    type: Literal["text"] = Field(description="only text parts are accepted")
    text: StrictStr | None = None


class FunctionCall(Body):
    name: StrictStr
    arguments: StrictStr | dict[str, Any] = Field(description="the arguments: a JSON object as a string (or an object)")


class MessageToolCall(Body):
    id: StrictStr | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[ContentPart] | None = Field(
        None, description="a string or text parts; may be left out only by an assistant message with tool_calls")
    name: StrictStr | None = None
    tool_call_id: StrictStr | None = Field(None, description="a tool message: the id of the call it answers")
    tool_calls: list[MessageToolCall] | None = Field(None, description="an assistant message: the calls it made")
    reasoning_content: StrictStr | None = Field(None, description="an assistant message: its reasoning "
                                                                  "(given to templates that render it)")


class FunctionDef(Body):
    name: Annotated[StrictStr, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON Schema of the arguments object; "
                                                                "calls forced by tool_choice follow it")
    strict: StrictBool | None = None


class Tool(Body):
    type: Literal["function"]
    function: FunctionDef


class ToolChoiceName(Body):
    name: StrictStr


class ToolChoiceFunction(Body):
    type: Literal["function"]
    function: ToolChoiceName


class StreamOptions(Body):
    include_usage: StrictBool | None = None


class JsonSchemaFormat(Body):
    name: StrictStr | None = Field(None, description="the schema's name (informative)")
    description: StrictStr | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema",
                                           description="the JSON Schema the output follows (enforced by a grammar)")
    strict: StrictBool | None = Field(None, description="accepted; the schema is always enforced")


class ResponseFormat(Body):
    type: Literal["text", "json_object", "json_schema"] = Field(
        "text", description="json_object: a JSON object or array; json_schema: a document valid against "
                            "json_schema.schema, enforced by constrained decoding")
    json_schema: JsonSchemaFormat | None = Field(None, description="required with type json_schema")


class OpenAISampling(Body):
    """What chat and completion requests share."""
    model: StrictStr | None = None
    temperature: Number(ge=0, le=2) | None = Field(None, description="below 1e-4: greedy")
    top_p: Number(gt=0, le=1) | None = None
    top_k: Integer(ge=-1) | None = Field(None, description="-1 or 0: off")
    min_p: Number(ge=0, le=1) | None = None
    repetition_penalty: Number(ge=MIN_PENALTY) | None = None
    presence_penalty: Number(ge=-2, le=2) | None = None
    frequency_penalty: Number(ge=-2, le=2) | None = None
    logit_bias: dict[Annotated[str, Field(pattern=r"^[0-9]{1,10}$")], Number(ge=-100, le=100)] | None = \
        Field(None, description="token id (as a string) -> bias")
    seed: Seed | None = None
    stop: Stop | None = None
    n: Integer(ge=1, le=MAX_CHOICES) | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None


class ChatCompletionRequest(OpenAISampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Integer(ge=1) | None = None
    max_completion_tokens: Integer(ge=1) | None = None
    logprobs: StrictBool | None = None
    top_logprobs: Integer(ge=0, le=MAX_TOP_LOGPROBS) | None = None
    tools: list[Tool] | None = Field(None, description="functions the model may call; calls come back in "
                                                       "message.tool_calls")
    tool_choice: Literal["auto", "none", "required"] | ToolChoiceFunction | None = Field(
        None, description="auto (default): the model decides; none: no calls parsed; required or a named "
                          "function: a call is forced by constrained decoding")
    parallel_tool_calls: StrictBool | None = Field(None, description="with tool_choice required: several calls "
                                                                     "allowed (default true)")
    reasoning_format: Literal["deepseek", "none", "hidden"] | None = Field(
        None, description="<think> blocks: deepseek (default): in message.reasoning_content; none: left in "
                          "content as generated; hidden: dropped")
    reasoning_effort: Literal["low", "medium", "high"] | None = Field(
        None, description="passed to the chat template as reasoning_effort (gpt-oss's harmony template "
                          "writes it into its system message)")


TokenIds = Annotated[list[TokenId], Field(min_length=1)]
Prompt = Union[StrictStr, TokenIds, Annotated[list[Union[StrictStr, TokenIds]], Field(min_length=1)]]


class CompletionRequest(OpenAISampling):
    prompt: Prompt = Field(description="a string, strings, token ids, or lists of token ids")
    max_tokens: Integer(ge=0) | None = None
    logprobs: Integer(ge=0, le=MAX_TOP_LOGPROBS) | None = Field(None, description="alternatives per token")
    echo: StrictBool | None = None
    suffix: StrictStr | None = Field(None, description="not supported: must be empty")
    best_of: Integer(ge=1) | None = Field(None, description="only equal to n")


# ---------------------------------------------------------------- Ollama

class OllamaOptions(Body):
    temperature: Number(ge=0, le=2) | None = Field(None, description="below 1e-4: greedy")
    top_p: Number(gt=0, le=1) | None = None
    top_k: Integer(ge=0) | None = None
    min_p: Number(ge=0, le=1) | None = None
    repeat_penalty: Number(ge=MIN_PENALTY) | None = None
    presence_penalty: Number(ge=-2, le=2) | None = None
    frequency_penalty: Number(ge=-2, le=2) | None = None
    seed: Seed | None = None
    num_predict: Integer(ge=-2) | None = Field(None, description="-1: no limit, -2: fill the context, "
                                                                      "else >= 1")
    num_ctx: Integer(ge=1) | None = None
    stop: Stop | None = None


class OllamaFunctionCall(Body):
    name: StrictStr
    arguments: dict[str, Any] | StrictStr = Field(default_factory=dict)


class OllamaToolCall(Body):
    function: OllamaFunctionCall


class OllamaMessage(Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: StrictStr | None = None
    images: list[Any] | None = Field(None, description="not supported: must be empty")
    tool_calls: list[OllamaToolCall] | None = None
    thinking: StrictStr | None = Field(None, description="an assistant message: its reasoning")
    tool_name: StrictStr | None = Field(None, description="a tool message: the function it answers")


class OllamaRequest(Body):
    model: StrictStr | None = None
    stream: StrictBool | None = Field(None, description="default true: NDJSON")
    format: Literal["", "json"] | dict[str, Any] | None = Field(
        None, description='"json": a JSON object or array; an object: a JSON Schema the output follows')
    options: OllamaOptions | None = None
    logprobs: StrictBool | None = None
    top_logprobs: Integer(ge=0, le=MAX_TOP_LOGPROBS) | None = None


class OllamaGenerateRequest(OllamaRequest):
    prompt: StrictStr | None = None
    think: StrictBool | None = Field(None, description="true: reasoning in `thinking`; false: dropped")
    system: StrictStr | None = None
    raw: StrictBool | None = None
    context: list[TokenId] | None = None
    images: list[Any] | None = Field(None, description="not supported: must be empty")


class OllamaChatRequest(OllamaRequest):
    messages: list[OllamaMessage] | None = None
    tools: list[Tool] | None = Field(None, description="functions the model may call; calls come back in "
                                                       "message.tool_calls")
    think: StrictBool | None = Field(None, description="true: reasoning in message.thinking; false: the template "
                                                       "is asked not to think and reasoning is dropped")


class OllamaShowRequest(Body):
    model: StrictStr | None = None
    name: StrictStr | None = None


# ---------------------------------------------------------------- validation

def validate(model: type[Body], body: dict) -> Body:
    """`body` as `model`, or APIError 400 naming the first bad field."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise _error(e) from None


_BRANCHES = ("str", "int", "float", "bool", "list", "dict", "none", "literal", "constrained", "json")


def _path(loc) -> str:
    """A pydantic location as the API names fields: messages[0].content (union branch tags
    such as 'str' or 'list[ContentPart]' and dict-key markers dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif any(c in part for c in "[(-") or part in _BRANCHES:
            continue
        else:
            out += f".{part}" if out else part
    return out


def _error(e: ValidationError):
    errors = e.errors(include_url=False)
    path = _path(errors[0]["loc"])
    same = [err for err in errors if _path(err["loc"]) == path]
    reasons = []
    for err in same:
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = "is required"
        if msg not in reasons:
            reasons.append(msg)
    where = path or "the request body"
    got = same[0].get("input")
    quiet = same[0]["type"] == "missing" or isinstance(got, (dict, list)) or "got" in reasons[0]
    shown = "" if quiet else f" (got {got!r:.60})"
    return invalid(f"'{where}': {'; or '.join(reasons)}{shown}", path or None)
