"""OpenAI's Chat Completions wire format: the request body -> a parsed request, and the response objects.

Parsing never decodes media: it checks the body's shape and turns every media part into a `MediaPart`
(what to decode, and where it was in the body, for error messages); `imagebind_llm.serve.media`
decodes them under the server's limits.

Content parts (``messages[i].content`` as a list):

* ``{"type": "text", "text": ...}``
* ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..." | "https://..."}}``
* ``{"type": "input_audio", "input_audio": {"data": base64, "format": "wav|mp3|flac|ogg"}}``
* ``{"type": "video_url", "video_url": {"url": ...}}``, ``{"type": "audio_url", "audio_url": {"url": ...}}`` (vLLM)
* ``{"type": "input_media", "modality": "point|depth|thermal|imu|image|audio|video", "data": base64,
  "format": "npy|ply|png|..."}``, and ``{"type": "input_media", "modality": "text", "text": "a dog barking"}``
  (text embedded by ImageBind, not read by the LLM)

Every media part may carry ``"weight"`` (default 1): its share of the official weighted mix. The
retrieval cache is set with the extra body field ``"cache": {"top_k", "temperature", "weight"}``.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from imagebind_llm.engine import BlendOptions, UnknownModalityError, modality
from imagebind_llm.llm.constrain import Constraint, ConstraintError
from imagebind_llm.llm.generate import SamplingOptions


class APIError(Exception):
    """An error returned to the client as OpenAI's ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: Mapping[str, str] | None = None) -> None:
        message = " ".join(str(message).split())  # one line, whatever a decoder's error said
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def too_large(message: str, param: str | None = None) -> APIError:
    return APIError(413, message, param=param, code="too_large")


@dataclass
class MediaPart:
    """One media part before decoding.

    Attributes:
        modality: the request modality name (``image``, ``audio``, ...).
        param: where it is in the body (``messages[0].content[1]``).
        data: base64 text (``None`` when ``url`` is set); for ``text``, the string itself.
        url: a ``data:`` or ``http(s)`` URL.
        format: the file format the client named (``wav``, ``npy``), if any.
        weight: the part's share of the mix.
    """

    modality: str
    param: str
    data: str | None = None
    url: str | None = None
    format: str | None = None
    weight: float = 1.0


@dataclass
class ChatRequest:
    """A parsed chat-completion request."""

    messages: list[dict[str, str]]  # text only, for the chat template
    media: list[MediaPart]
    sampling: SamplingOptions
    blend: BlendOptions
    model: str
    stream: bool = False
    include_usage: bool = False
    constraint: Constraint | None = None  # response_format, or the tool-call schema
    tool_call: bool = False  # the answer is returned as message.tool_calls


_URL_PARTS = {"image_url": "image", "video_url": "video", "audio_url": "audio"}
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
          "tool": "user"}  # a tool result is rendered as a user message (`_tool_text`)
MAX_STOP_STRINGS = 4
SEED_RANGE = range(-(2 ** 63), 2 ** 64)  # what torch.Generator.manual_seed takes


def finite(value: float) -> bool:
    """``math.isfinite``, False for integers too large for a float (a 400-digit JSON number)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def parse_chat_request(body: Any, *, default_model: str, max_media_items: int) -> ChatRequest:
    """Check a ``/v1/chat/completions`` body; media stay undecoded.

    Raises:
        APIError: 400 naming the field (``param``) and what to send instead; 413 for too many media items.
    """
    if not isinstance(body, Mapping):
        raise bad_request("the request body must be a JSON object")
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise bad_request("'messages' must be a non-empty list of {'role', 'content'} objects", "messages")
    messages, media = [], []
    for i, message in enumerate(raw_messages):
        text, parts = _parse_message(message, f"messages[{i}]")
        role = _ROLES[message["role"]]
        if message["role"] == "tool" or message.get("tool_calls"):
            text = _tool_text(message, text, raw_messages[:i], f"messages[{i}]")
        if role == "system" and messages:
            raise bad_request("only the first message may be a system message", f"messages[{i}].role")
        messages.append({"role": role, "content": text})
        media += parts
    if messages[-1]["role"] != "user":
        raise bad_request("the last message must be from the user", f"messages[{len(messages) - 1}].role")
    if len(media) > max_media_items:
        raise too_large(f"the request has {len(media)} media parts; this server takes at most {max_media_items}",
                        "messages")
    seen: dict[str, str] = {}
    for part in media:
        if part.modality in seen:
            raise bad_request(f"{part.param} is a second {part.modality} input (the first is {seen[part.modality]}); "
                              "ImageBind-LLM mixes one input per modality into one feature: send one per modality",
                              part.param)
        seen[part.modality] = part.param
    if media and not any(part.weight > 0 for part in media):
        raise bad_request("all media weights are 0; give at least one weight > 0 or drop the media",
                          media[0].param + ".weight")
    n = body.get("n")
    if n is not None and n != 1:
        raise bad_request(f"n={n!r} is not supported; this server returns one choice per request (n=1)", "n")
    stream = _optional(body, "stream", bool, False)
    stream_options = _optional(body, "stream_options", Mapping, {}) or {}
    constraint, tool_call = _response_format(body), False
    tools_prompt, tools_constraint = _tools(body, raw_messages)
    if tools_constraint is not None:
        messages = _with_system_text(messages, tools_prompt)
        constraint, tool_call = tools_constraint, True
    return ChatRequest(messages=messages, media=media, sampling=_sampling(body), blend=parse_blend(body),
                       model=_optional(body, "model", str, default_model) or default_model, stream=stream,
                       include_usage=bool(stream and stream_options.get("include_usage")),
                       constraint=constraint, tool_call=tool_call)


def _parse_message(message: Any, param: str) -> tuple[str, list[MediaPart]]:
    if not isinstance(message, Mapping):
        raise bad_request("each message must be an object with 'role' and 'content'", param)
    role = message.get("role")
    if role not in _ROLES:
        raise bad_request(f"role {role!r} is not supported; use one of {sorted(_ROLES)}", f"{param}.role")
    content = message.get("content")
    if content is None and role == "assistant":
        return "", []
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise bad_request("'content' must be a string or a list of content parts", f"{param}.content")
    texts, media = [], []
    for j, part in enumerate(content):
        where = f"{param}.content[{j}]"
        if not isinstance(part, Mapping):
            raise bad_request("each content part must be an object with a 'type'", where)
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise bad_request("a text part needs a string 'text'", f"{where}.text")
            texts.append(part["text"])
        elif role != "user":
            raise bad_request(f"{role} messages may only hold text parts, got {kind!r}", f"{where}.type")
        else:
            media.append(parse_media_part(part, where))
    return "\n".join(texts), media


def parse_media_part(part: Mapping[str, Any], where: str) -> MediaPart:
    kind = part.get("type")
    weight = part.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (finite(weight) and weight >= 0):
        raise bad_request(f"'weight' must be a finite number >= 0, got {weight!r}", f"{where}.weight")
    if kind in _URL_PARTS:
        value = part.get(kind)
        url = value.get("url") if isinstance(value, Mapping) else value
        if not isinstance(url, str) or not url:
            raise bad_request(f"a {kind} part needs {{'{kind}': {{'url': ...}}}}", f"{where}.{kind}.url")
        return MediaPart(_URL_PARTS[kind], where, url=url, weight=float(weight))
    if kind == "input_audio":
        value = part.get("input_audio")
        if not isinstance(value, Mapping) or not isinstance(value.get("data"), str):
            raise bad_request("an input_audio part needs {'input_audio': {'data': base64, 'format': 'wav'}}",
                              f"{where}.input_audio.data")
        data, fmt = value["data"], value.get("format")
        if data.startswith("data:"):  # some gateways send a data URL here
            return MediaPart("audio", where, url=data, format=fmt, weight=float(weight))
        return MediaPart("audio", where, data=data, format=fmt, weight=float(weight))
    if kind == "input_media":
        try:
            name = modality(str(part.get("modality"))).name
        except UnknownModalityError as e:
            raise bad_request(str(e), f"{where}.modality", "unsupported_media") from None
        if name == "text":
            if not isinstance(part.get("text"), str) or not part["text"]:
                raise bad_request("an input_media part of modality text needs a string 'text'", f"{where}.text")
            return MediaPart("text", where, data=part["text"], weight=float(weight))
        if not isinstance(part.get("data"), str):
            raise bad_request("an input_media part needs base64 'data' and a 'format' (npy, ply, png, ...)",
                              f"{where}.data")
        return MediaPart(name, where, data=part["data"], format=part.get("format"), weight=float(weight))
    raise bad_request(f"unsupported content part type {kind!r}; use text, image_url, input_audio, video_url, "
                      "audio_url or input_media", f"{where}.type", "unsupported_media")


def _optional(body: Mapping[str, Any], name: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in kinds):
        expected = getattr(kind, "__name__", "number")
        raise bad_request(f"'{name}' must be a {expected}, got {value!r}", name)
    return value


def _sampling(body: Mapping[str, Any]) -> SamplingOptions:
    """The sampling options; unset fields keep ImageBind-LLM's official defaults (256 tokens, 0.1, 0.75)."""
    defaults = SamplingOptions()
    param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(param)
    if max_tokens is None:
        max_tokens = defaults.max_new_tokens
    elif isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise bad_request(f"'{param}' must be a whole number >= 1, got {max_tokens!r}", param)
    temperature = _optional(body, "temperature", (int, float), defaults.temperature)
    if not (finite(temperature) and 0 <= temperature <= 2):
        raise bad_request(f"'temperature' must be in [0, 2], got {temperature!r}", "temperature")
    top_p = _optional(body, "top_p", (int, float), defaults.top_p)
    if not (finite(top_p) and 0 < top_p <= 1):
        raise bad_request(f"'top_p' must be in (0, 1], got {top_p!r}", "top_p")
    seed = _optional(body, "seed", int, None)
    if seed is not None and seed not in SEED_RANGE:
        raise bad_request(f"'seed' must be in [-2**63, 2**64), got {seed}", "seed")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP_STRINGS:
        raise bad_request(f"'stop' must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them",
                          "stop")
    return SamplingOptions(max_new_tokens=max_tokens, temperature=float(temperature),
                           top_p=None if top_p >= 1 else float(top_p), seed=seed, stop_strings=tuple(stops))


# ---------------------------------------------------------------- structured outputs and tools
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _checked(constraint: Constraint, param: str) -> Constraint:
    try:
        constraint.check()
    except ConstraintError as e:
        raise bad_request(str(e), param) from None
    return constraint


def _response_format(body: Mapping[str, Any]) -> Constraint | None:
    """``response_format``: ``{"type": "text"}`` (none), ``{"type": "json_object"}``, or ``{"type": "json_schema",
    "json_schema": {"name", "schema", "strict"}}``; the answer is then generated under that constraint."""
    fmt = _optional(body, "response_format", Mapping, None)
    if fmt is None or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return _checked(Constraint.json_object(), "response_format")
    if fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("schema"), (Mapping, bool)):
            raise bad_request("a json_schema response_format needs {'json_schema': {'name': ..., 'schema': {...}}}",
                              "response_format.json_schema.schema")
        return _checked(Constraint.json_schema(spec["schema"]), "response_format.json_schema.schema")
    raise bad_request(f"response_format type {fmt.get('type')!r} is not supported; use text, json_object or "
                      "json_schema", "response_format.type")


def _tools(body: Mapping[str, Any], raw_messages: list[Any]) -> tuple[str, Constraint | None]:
    """``tools`` + ``tool_choice`` -> (the text listing the functions, the tool-call constraint), or ("", None)
    when this answer is not a tool call.

    The rule (a small model cannot be trusted to decide): ``"required"`` or a named function always calls
    (that function); ``"auto"`` (the default with tools) calls a tool when the last message is the user's,
    and answers in text when it is a tool result; ``"none"`` never calls. A call is generated as the JSON
    object ``{"name": ..., "arguments": {...}}`` constrained to an ``anyOf`` over the tools (each with its
    ``parameters`` schema), and returned as ``message.tool_calls``.
    """
    tools = _optional(body, "tools", list, None)
    choice = body.get("tool_choice")
    if not tools:
        if choice not in (None, "none"):
            raise bad_request("'tool_choice' needs 'tools'", "tool_choice")
        return "", None
    functions: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, Mapping) and tool.get("type") == "function" else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not _TOOL_NAME.fullmatch(fn["name"]):
            raise bad_request("each tool must be {'type': 'function', 'function': {'name': [A-Za-z0-9_-]{1,64}, "
                              "'description': ..., 'parameters': {JSON schema}}}", f"tools[{i}]")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, Mapping):
            raise bad_request("'parameters' must be a JSON schema object", f"tools[{i}].function.parameters")
        functions[fn["name"]] = {"description": str(fn.get("description") or ""), "parameters": dict(params)}
    if choice in (None, "auto"):
        last = raw_messages[-1] if raw_messages else {}
        if isinstance(last, Mapping) and last.get("role") == "tool":
            return "", None
        names = list(functions)
    elif choice == "none":
        return "", None
    elif choice == "required":
        names = list(functions)
    elif isinstance(choice, Mapping) and isinstance(choice.get("function"), Mapping):
        name = choice["function"].get("name")
        if name not in functions:
            raise bad_request(f"tool_choice names {name!r}, which is not among the tools {list(functions)}",
                              "tool_choice")
        names = [name]
    else:
        raise bad_request("'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', 'function': "
                          "{'name': ...}}", "tool_choice")
    calls = [{"type": "object", "properties": {"name": {"const": n}, "arguments": functions[n]["parameters"]},
              "required": ["name", "arguments"], "additionalProperties": False} for n in names]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    listing = "\n".join(f"- {n}: {functions[n]['description']}\n  arguments (JSON schema): "
                        f"{json.dumps(functions[n]['parameters'])}" for n in functions)
    prompt = (f"You can call these functions:\n{listing}\nTo call a function, answer with only a JSON object "
              '{"name": <function name>, "arguments": <its arguments>}.'
              + (f" Call {names[0]}." if len(names) == 1 and len(functions) > 1 else ""))
    return prompt, _checked(Constraint.json_schema(schema), "tools")


def _with_system_text(messages: list[dict[str, str]], text: str) -> list[dict[str, str]]:
    """``text`` added to the system message (a new one first when there is none)."""
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{messages[0]['content']}\n\n{text}".strip()}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def _tool_text(message: Mapping[str, Any], text: str, earlier: list[Any], param: str) -> str:
    """An assistant message's ``tool_calls`` as the JSON the model writes for a call; a ``tool`` message as
    "Result of NAME: ...", NAME found through its ``tool_call_id``."""
    if message["role"] == "tool":
        previous = earlier[-1] if earlier else None
        if not (isinstance(previous, Mapping) and (previous.get("role") == "tool" or previous.get("tool_calls"))):
            raise bad_request("a 'tool' message must answer a preceding assistant message with 'tool_calls'",
                              f"{param}.role")
        names = {c.get("id"): (c.get("function") or {}).get("name") for m in earlier if isinstance(m, Mapping)
                 for c in (m.get("tool_calls") or []) if isinstance(c, Mapping)}
        name = names.get(message.get("tool_call_id")) or message.get("name") or "the function"
        return f"Result of {name}: {text}"
    calls = message["tool_calls"]
    if not isinstance(calls, list) or not all(isinstance(c, Mapping) and isinstance(c.get("function"), Mapping)
                                              for c in calls):
        raise bad_request("'tool_calls' must be a list of {'id', 'type': 'function', 'function': {'name', "
                          "'arguments'}}", f"{param}.tool_calls")
    lines = [text] if text else []
    for call in calls:
        fn = call["function"]
        arguments = fn.get("arguments", "{}")
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        except json.JSONDecodeError:
            pass
        lines.append(json.dumps({"name": fn.get("name"), "arguments": arguments}, separators=(",", ":")))
    return "\n".join(lines)


def tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


_CALL_HEAD = re.compile(r'\s*\{"name":("(?:[^"\\]|\\.)*"),"arguments":')


def split_tool_call(text: str) -> tuple[str, int] | None:
    """``(name, where the arguments start)`` once ``text`` has the head of a generated call
    ``{"name":"f","arguments":...}``; None before that."""
    match = _CALL_HEAD.match(text)
    return (json.loads(match.group(1)), match.end()) if match else None


def tool_call_message(text: str) -> dict[str, Any] | None:
    """The assistant message of a complete generated call: ``content`` None, ``tool_calls`` with the arguments
    as a JSON string; None when ``text`` is not a complete call (cut off by the token limit)."""
    head = split_tool_call(text)
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return None
    if head is None:
        return None
    return {"role": "assistant", "content": None,
            "tool_calls": [{"id": tool_call_id(), "type": "function",
                            "function": {"name": head[0], "arguments": text.rstrip()[head[1]:-1]}}]}


def parse_blend(body: Mapping[str, Any]) -> BlendOptions:
    cache = _optional(body, "cache", Mapping, {})
    unknown = sorted(set(cache) - {"top_k", "temperature", "weight"})
    if unknown:
        raise bad_request(f"unknown cache settings {unknown}; use top_k, temperature, weight", "cache")
    try:
        return BlendOptions(**cache)
    except (TypeError, ValueError, OverflowError) as e:
        raise bad_request(str(e), "cache") from None


async def read_json(request: Any, limit: int) -> Any:
    """A Starlette request's body as JSON, refused with 413 as soon as it passes ``limit`` bytes (never read whole first)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large(f"the request body is {int(declared):,} bytes; the limit is {limit:,} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(f"the request body is over the {limit:,}-byte limit")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, a 5000-digit number, [[[[...
        raise bad_request(f"the request body is not valid JSON: {e}") from None


# ---------------------------------------------------------------- responses
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop", "tool_calls": "tool_calls"}


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_object(id: str, created: int, model: str, text: str, finish_reason: str,
                      prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """A ``chat.completion`` object."""
    return {"id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": FINISH_REASONS.get(finish_reason, "stop"), "logprobs": None}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk_object(id: str, created: int, model: str, delta: dict[str, str] | None,
                 finish_reason: str | None = None, usage_: dict[str, int] | None = None) -> dict[str, Any]:
    """A ``chat.completion.chunk``; ``delta=None`` gives the usage chunk (``choices: []``)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                          "finish_reason": finish_reason and FINISH_REASONS.get(finish_reason, "stop")}]
    return {"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices,
            "usage": usage_}


def model_list(model_id: str, created: int | None = None) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created or int(time.time()),
                                        "owned_by": "imagebind-llm"}]}

