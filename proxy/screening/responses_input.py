"""A Responses API request (`POST /v1/responses`) read as the chat request the guards screen: its
`instructions`, `input` items, tool definitions and response schema mapped onto chat messages and
fields, so that the screening rules of chat (collect.py) apply unchanged.

`message` items keep their role and parts; a `function_call` is an assistant tool call; a
`function_call_output` is a tool result (third-party text); a `reasoning` item is assistant
reasoning (its summary and text; `encrypted_content` is opaque to everyone but the upstream). Every
other item type is a part of that type, which the route refuses (400) unless `unscreened_parts`
names it. The forwarded body is the client's, never this mapping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.errors import BadRequest
from proxy.screening.collect import DOCUMENT_FIELDS, UNSCREENABLE_FIELDS, ThreadedRequest

MAX_THREAD_ID_CHARS = 200
MESSAGE_ROLES = frozenset({"user", "system", "developer", "assistant"})
# Item fields that identify or describe an item rather than carry text a model reads.
_ITEM_META = frozenset({"id", "type", "status", "call_id", "phase", "role", "content", "encrypted_content"})


@dataclass(frozen=True)
class Thread:
    """Where a request continues a conversation the upstream keeps."""

    previous_response_id: str | None = None
    conversation: str | None = None


def thread_of(payload: dict[str, Any]) -> Thread:
    previous = payload.get("previous_response_id")
    if previous is not None and not isinstance(previous, str):
        raise BadRequest("'previous_response_id' must be a string.", param="previous_response_id")
    conversation = payload.get("conversation")
    if isinstance(conversation, dict):
        conversation = conversation.get("id")
    if conversation is not None and not isinstance(conversation, str):
        raise BadRequest("'conversation' must be an id or an object with an id.", param="conversation")
    # The state store keys (proxy/state) hold an id with a prefix in 256 characters: a longer one could
    # not be remembered, also not as holding a blocked reply.
    for param, value in (("previous_response_id", previous), ("conversation", conversation)):
        if value is not None and len(value) > MAX_THREAD_ID_CHARS:
            raise BadRequest(f"'{param}' is longer than {MAX_THREAD_ID_CHARS} characters.", param=param)
    # As OpenAI does: with both, which history the model reads is the upstream's choice, while the
    # withheld check and the stored context follow one of them (proxy/server/responses.py).
    if previous and conversation:
        raise BadRequest(
            "'previous_response_id' and 'conversation' cannot both be given: continue one of them.",
            param="previous_response_id",
        )
    return Thread(previous or None, conversation or None)


def chat_body(payload: dict[str, Any]) -> dict[str, Any]:
    """The chat request body (to validate as a ThreadedRequest) that says what the model reads."""
    messages: list[dict[str, Any]] = []
    instructions = payload.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise BadRequest("'instructions' must be a string.", param="instructions")
        messages.append({"role": "system", "content": instructions})
    given = payload.get("input")
    if isinstance(given, str):
        messages.append({"role": "user", "content": given})
    elif isinstance(given, list):
        messages += [input_message(item, f"input.{i}") for i, item in enumerate(given)]
    elif given is not None:
        raise BadRequest("'input' must be a string or a list of items.", param="input")
    # A stored prompt's template lives upstream (the application's, like instructions); the values a
    # request fills in are screened like tool results, and those that are no text (a file, an image)
    # as parts of a user message: images go to the guards, the rest is refused unless allowed.
    documents, parts = prompt_variables(payload.get("prompt"))
    if parts:
        messages.insert(1 if instructions is not None else 0, {"role": "user", "content": parts})
    # Hosted tools (web search, file search, MCP, code interpreter ...) feed the model text inside the
    # upstream that the proxy never sees: each is a part of its type, refused unless the route allows it.
    hosted = hosted_tools(payload.get("tools"))
    if hosted:
        messages.append({"role": "user", "content": hosted})
    if not messages:  # only a previous_response_id or a stored prompt: nothing new to read
        messages.append({"role": "user", "content": ""})
    body: dict[str, Any] = {"model": payload.get("model"), "messages": messages, "stream": payload.get("stream")}
    # What the application writes for the model outside the messages (screened with system text).
    if "tools" in payload:
        body["tools"] = payload["tools"]
    text = payload.get("text")
    if isinstance(text, dict) and "format" in text:
        body["response_format"] = text["format"]
    # vLLM's Responses server also takes chat's engine fields: its template kwargs are screened and a
    # template refused as chat's are (collect.py); earlier turns sent as its own messages are refused.
    if "previous_input_messages" in payload:
        raise BadRequest(
            "'previous_input_messages' cannot be screened here: send earlier turns as input items.",
            param="previous_input_messages",
        )
    body |= {field: payload[field] for field in (*DOCUMENT_FIELDS, *UNSCREENABLE_FIELDS) if field in payload}
    if documents is not None:
        body["documents"] = [body["documents"], documents] if "documents" in body else documents
    return body


# Tool types whose definitions the proxy screens and whose results come back as items it screens.
SCREENED_TOOLS = frozenset({"function", "custom"})
_TEXT_VARIABLES = frozenset({"input_text"})


def prompt_variables(prompt: Any) -> tuple[Any, list[dict[str, Any]]]:
    """A stored prompt's variables: (what is screened as documents, the parts that are no text)."""
    variables = prompt.get("variables") if isinstance(prompt, dict) else None
    if not isinstance(variables, dict):
        return variables, []
    documents: dict[str, Any] = {}
    parts: list[dict[str, Any]] = []
    for name, value in variables.items():
        if isinstance(value, dict) and value.get("type") not in _TEXT_VARIABLES:
            parts.append(_part(value, f"prompt.variables.{name}"))
        else:
            documents[name] = value
    return documents, parts


def hosted_tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        return []
    kinds = [tool.get("type") if isinstance(tool, dict) else None for tool in tools]
    names = [kind if isinstance(kind, str) and kind else "unknown" for kind in kinds if kind not in SCREENED_TOOLS]
    return [{"type": name} for name in dict.fromkeys(names)]


def input_message(item: Any, at: str) -> dict[str, Any]:
    if isinstance(item, str):  # a bare string item reads as user text, as the API takes it
        return {"role": "user", "content": item}
    if not isinstance(item, dict):
        raise BadRequest("An input item must be an object.", param=at)
    kind = item.get("type", "message" if "role" in item else None)
    rest = {k: v for k, v in item.items() if k not in _ITEM_META}
    if kind == "message":
        role = item.get("role")
        if role not in MESSAGE_ROLES:
            raise BadRequest("A message item's role must be user, system, developer or assistant.", param=f"{at}.role")
        return {**rest, "role": role, "content": content(item.get("content"), f"{at}.content")}
    if kind == "function_call":
        name = _string(rest.pop("name", None), f"{at}.name")
        call = {"name": name, "arguments": _string(rest.pop("arguments", None), f"{at}.arguments")}
        tool_call = {**rest, "id": item.get("call_id"), "type": "function", "function": call}
        return {"role": "assistant", "content": None, "tool_calls": [tool_call]}
    if kind == "function_call_output":
        output = rest.pop("output", None)
        return {**rest, "role": "tool", "tool_call_id": item.get("call_id"), "content": content(output, f"{at}.output")}
    if kind == "reasoning":
        rest.pop("summary", None)  # read here with `content` (which _ITEM_META keeps out of `rest`)
        texts = [
            _string(part.get("text") if isinstance(part, dict) else None, f"{at}.{field}.{j}.text")
            for field in ("summary", "content")
            for j, part in enumerate(_list(item.get(field), f"{at}.{field}"))
        ]
        return {**rest, "role": "assistant", "reasoning": "\n".join(texts)}
    # item_reference (the upstream's stored item) and every other type: nothing the proxy can read.
    name = kind if isinstance(kind, str) and kind else "unknown"
    return {"role": "user", "content": [{"type": name}]}


def content(value: Any, at: str) -> str | list[dict[str, Any]]:
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise BadRequest("Content must be a string or a list of parts.", param=at)
    return [_part(part, f"{at}.{j}") for j, part in enumerate(value)]


def _part(part: Any, at: str) -> dict[str, Any]:
    if not isinstance(part, dict):
        raise BadRequest("A content part must be an object.", param=at)
    if part.get("type") == "input_image":
        url = part.get("image_url")
        if isinstance(url, str) and part.get("file_id") is None:
            return {"type": "image_url", "image_url": {"url": url}}
        # A `file_id` names an upload the proxy never sees (beside a URL, the upstream picks which one the
        # model sees): an input_image part it cannot screen.
        return {"type": "input_image"}
    # input_text / output_text / refusal are text parts to collect.py; input_file, input_audio and
    # the rest are refused there unless the route lets them through.
    return part


def _string(value: Any, at: str) -> str:
    if not isinstance(value, str):
        raise BadRequest("This field must be a string.", param=at)
    return value


def _list(value: Any, at: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadRequest("This field must be a list.", param=at)
    return value


__all__ = ["Thread", "ThreadedRequest", "chat_body", "thread_of"]
