"""The Anthropic Messages API's request body (POST /v1/messages) as pydantic models: they
validate requests and describe the route in /openapi.json, as schema.py does for OpenAI.

Fields as Anthropic documents them; `max_tokens` and `model` are required, as Anthropic
requires them. Content blocks are text, tool_use and tool_result (images and documents
are refused by name). Unknown fields are ignored (metadata, thinking, service_tier...).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Field, StrictBool, StrictStr

from .schema import Body, Integer, Number, Text

MAX_STOP_SEQUENCES = 16


class TextBlock(Body):
    type: Literal["text"]
    text: StrictStr


class ToolUseBlock(Body):
    type: Literal["tool_use"]
    id: Text
    name: Text
    input: dict[str, Any] = Field(description="the tool's arguments, an object")


class ToolResultBlock(Body):
    type: Literal["tool_result"]
    tool_use_id: Text
    content: StrictStr | list[TextBlock] | None = Field(None, description="a string or text blocks")
    is_error: StrictBool | None = None


ContentBlock = Annotated[Union[TextBlock, ToolUseBlock, ToolResultBlock], Field(discriminator="type")]


class AnthropicMessage(Body):
    role: Literal["user", "assistant"]
    content: StrictStr | list[ContentBlock] = Field(description="a string or content blocks")


class AnthropicTool(Body):
    name: Annotated[StrictStr, Field(min_length=1, max_length=128, pattern=r"^[a-zA-Z0-9_-]+$")]
    description: StrictStr | None = None
    input_schema: dict[str, Any] = Field(description="JSON Schema of the tool's input (an object)")


class ToolChoice(Body):
    type: Literal["auto", "any", "tool", "none"]
    name: StrictStr | None = Field(None, description="with type 'tool': the tool to call")
    disable_parallel_tool_use: StrictBool | None = None


class MessagesRequest(Body):
    model: StrictStr
    messages: Annotated[list[AnthropicMessage], Field(min_length=1)]
    max_tokens: Integer(ge=1)
    system: StrictStr | list[TextBlock] | None = None
    temperature: Number(ge=0, le=1) | None = Field(None, description="0 to 1 (default 1); 0 is greedy")
    top_p: Number(gt=0, le=1) | None = None
    top_k: Integer(ge=0) | None = None
    stop_sequences: Annotated[list[Text], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    stream: StrictBool | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: ToolChoice | None = None
