"""Prompt templates: conversation (list of ``{"role", "content"}`` messages) -> prompt string.

* ``alpaca``: the Alpaca template exactly as ImageBind-LLM uses it (`alpaca_prompt`), extended to
  several turns (see `AlpacaTemplate`).
* ``chatml``: ``<|im_start|>role\\ncontent<|im_end|>\\n`` per message (SmolLM2, Qwen2).
* ``llama2``: Meta's Llama-2 chat format, ``<s>[INST] <<SYS>>\\n...\\n<</SYS>>\\n\\nuser [/INST] answer </s>``.
* a Jinja chat template stored with a model (GGUF ``tokenizer.chat_template``, HF
  ``tokenizer_config.json``), rendered in a sandboxed Jinja environment (`JinjaTemplate`).

Templates return text; special tokens such as ``<s>`` or ``<|im_start|>`` appear in it as text and the
tokenizers map them to their ids (encode the prompt with ``bos=False`` when the template writes BOS).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

Message = Mapping[str, str]  # {"role": "system" | "user" | "assistant", "content": str}

ROLES = ("system", "user", "assistant")

ALPACA_HEADER = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
ALPACA_HEADER_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)


def alpaca_prompt(instruction: str, input: str | None = None) -> str:
    """The single-turn Alpaca prompt of ImageBind-LLM (``format_prompt``), byte for byte.

    Nothing follows ``### Response:``: no space, no newline; the model writes its answer right after it.
    An empty or None `input` gives the no-input form.
    """
    if input:
        return f"{ALPACA_HEADER_WITH_INPUT}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
    return f"{ALPACA_HEADER}\n\n### Instruction:\n{instruction}\n\n### Response:"


class ChatTemplate(Protocol):
    """Turns a conversation into a prompt string."""

    #: Whether the rendered text already starts with the BOS token (encode it with ``bos=False`` then).
    writes_bos: bool

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> str:
        """The prompt for `messages`; with `add_generation_prompt`, ends where the assistant's answer starts."""
        ...


def validate_messages(messages: Sequence[Message]) -> None:
    """Check roles and contents; a system message may only come first.

    Raises:
        ValueError: naming the offending message.
    """
    if not messages:
        raise ValueError("the conversation is empty; give at least one user message")
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"message {i} has role {role!r}; expected one of {ROLES}")
        if not isinstance(content, str):
            raise ValueError(f"message {i} ({role}) has content of type {type(content).__name__}; expected str")
        if role == "system" and i != 0:
            raise ValueError(f"message {i} is a system message; only the first message may be one")


def _split_system(messages: Sequence[Message]) -> tuple[str | None, list[Message]]:
    validate_messages(messages)
    if messages[0]["role"] == "system":
        return messages[0]["content"], list(messages[1:])
    return None, list(messages)


def _check_alternation(turns: Sequence[Message]) -> None:
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise ValueError(
                f"turn {i} is a {m['role']} message; this template needs user/assistant turns that alternate, "
                "starting with user"
            )


@dataclass(frozen=True)
class AlpacaTemplate:
    """ImageBind-LLM's Alpaca template, with a multi-turn extension of our own.

    One user turn renders exactly as `alpaca_prompt`. The official code is single-turn only; for
    conversations every earlier exchange stays in the prompt as an ``### Instruction:``/``### Response:``
    pair, the answer written right after ``### Response:`` as the model produced it (the official
    training data concatenates prompt and answer the same way), then a blank line and the next
    instruction::

        <header>\\n\\n### Instruction:\\nq1\\n\\n### Response:a1\\n\\n### Instruction:\\nq2\\n\\n### Response:

    A system message replaces the header sentence.
    """

    writes_bos: bool = False
    # The format has no end-of-turn token: a model that goes on to invent the next instruction is cut there.
    stop_strings: tuple[str, ...] = ("### Instruction:",)

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> str:
        system, turns = _split_system(messages)
        _check_alternation(turns)
        parts = [system if system is not None else ALPACA_HEADER]
        for m in turns:
            if m["role"] == "user":
                parts.append(f"\n\n### Instruction:\n{m['content']}\n\n### Response:")
            else:
                parts.append(m["content"])
        if not add_generation_prompt and turns and turns[-1]["role"] == "user":
            raise ValueError("the Alpaca template always ends with '### Response:' after a user turn")
        return "".join(parts)


@dataclass(frozen=True)
class ChatMLTemplate:
    """ChatML: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message; ``<|im_start|>assistant\\n`` to answer.

    `default_system` is added when the conversation has no system message (SmolLM2 and Qwen2 do this).
    """

    default_system: str | None = None
    writes_bos: bool = False

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> str:
        validate_messages(messages)
        if messages[0]["role"] != "system" and self.default_system is not None:
            messages = [{"role": "system", "content": self.default_system}, *messages]
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


@dataclass(frozen=True)
class Llama2Template:
    """Meta's Llama-2 chat format.

    Each exchange is ``<s>[INST] {user} [/INST] {answer} </s>``, contents stripped; the system prompt
    goes inside the first ``[INST]`` as ``<<SYS>>\\n{system}\\n<</SYS>>\\n\\n``. The prompt ends after
    ``[/INST]`` of the last user turn.
    """

    bos_token: str = "<s>"
    eos_token: str = "</s>"
    writes_bos: bool = True

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> str:
        system, turns = _split_system(messages)
        _check_alternation(turns)
        parts = []
        for i, m in enumerate(turns):
            content = m["content"].strip()
            if m["role"] == "user":
                if i == 0 and system is not None:
                    content = f"<<SYS>>\n{system.strip()}\n<</SYS>>\n\n{content}"
                parts.append(f"{self.bos_token}[INST] {content} [/INST]")
            else:
                parts.append(f" {content} {self.eos_token}")
        return "".join(parts)


class JinjaTemplate:
    """A Jinja chat template shipped with a model, rendered in an immutable sandboxed environment.

    The environment follows the conventions of Hugging Face chat templates: ``trim_blocks`` and
    ``lstrip_blocks``, the ``loopcontrols`` extension, ``raise_exception(msg)``, ``strftime_now(fmt)`` and a
    ``tojson`` filter that does not escape HTML; templates see ``messages``, ``add_generation_prompt``,
    ``bos_token`` and ``eos_token``.
    """

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "") -> None:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.globals["raise_exception"] = _raise_template_error
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.filters["tojson"] = _tojson
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"the model's chat template does not parse (line {e.lineno}): {e.message}") from e
        self.source = source
        self.bos_token, self.eos_token = bos_token, eos_token
        self.writes_bos = bool(bos_token) and "bos_token" in source

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> str:
        validate_messages(messages)
        return self._template.render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )


def _raise_template_error(message: str) -> None:
    raise ValueError(f"chat template: {message}")


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


TEMPLATES = {"alpaca": AlpacaTemplate, "chatml": ChatMLTemplate, "llama2": Llama2Template}


def get_template(name: str | None = None, *, chat_template: str | None = None, bos_token: str = "",
                 eos_token: str = "") -> ChatTemplate:
    """A template by name, or the model's own one.

    Args:
        name: ``alpaca``, ``chatml``, ``llama2``, or ``model`` / None for the model's Jinja template.
        chat_template: the Jinja source shipped with the model, if any.
        bos_token, eos_token: the model's BOS/EOS spellings, visible to Jinja templates.

    Raises:
        ValueError: for an unknown name, or ``model``/None when the model ships no template.
    """
    if name in (None, "model"):
        if chat_template is None:
            raise ValueError(
                f"the model has no chat template of its own; choose one with --template ({', '.join(TEMPLATES)})"
            )
        return JinjaTemplate(chat_template, bos_token=bos_token, eos_token=eos_token)
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; choose one of {['model', *TEMPLATES]}")
    if name == "llama2" and bos_token:
        return Llama2Template(bos_token=bos_token, eos_token=eos_token or "</s>")
    return TEMPLATES[name]()


def choose_template(name: str | None, tokenizer: Any) -> ChatTemplate:
    """The template called ``name`` for a loaded ``tokenizer`` (``chat_template``, ``bos_token``,
    ``eos_token``); None picks the model's own chat template, or Alpaca when it has none: ImageBind-LLM's
    format (LLaMA checkpoints ship no template)."""
    if name is None:
        name = "model" if tokenizer.chat_template else "alpaca"
    return get_template(name, chat_template=tokenizer.chat_template, bos_token=tokenizer.bos_token,
                        eos_token=tokenizer.eos_token)
