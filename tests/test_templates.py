"""Prompt templates: Alpaca byte-exact against the official text, ChatML/Llama-2/Jinja against transformers."""

from __future__ import annotations

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from imagebind_llm.llm.templates import (
    AlpacaTemplate,
    ChatMLTemplate,
    JinjaTemplate,
    Llama2Template,
    alpaca_prompt,
    get_template,
)

# ImageBind-LLM's format_prompt (llama/utils.py), as documented in official_imagebind_llm.md §3.
OFFICIAL_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\nDescribe the image in detail.\n\n### Response:"
)
OFFICIAL_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\nTranslate.\n\n"
    "### Input:\nBonjour\n\n### Response:"
)

# Chat templates as published with the models (data, used as the independent truth for our renderers).
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PLAIN_CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

ONE_TURN = [{"role": "user", "content": "What is the capital of France?"}]
MULTI_TURN = [
    {"role": "user", "content": "Hi there!"},
    {"role": "assistant", "content": " Hello. How can I help? "},
    {"role": "user", "content": "Write «ünïcödé» 你好 😀 and\n  code: `x = 1`"},
]
WITH_SYSTEM = [{"role": "system", "content": "You are terse."}, *MULTI_TURN]
CONVERSATIONS = [ONE_TURN, MULTI_TURN, WITH_SYSTEM]


def reference(template: str, messages, add_generation_prompt=True, **kw) -> str:
    rendered, _ = render_jinja_template(
        conversations=[messages], chat_template=template, add_generation_prompt=add_generation_prompt, **kw
    )
    return rendered[0]


def test_alpaca_single_turn_is_byte_exact():
    assert alpaca_prompt("Describe the image in detail.") == OFFICIAL_NO_INPUT
    assert alpaca_prompt("Describe the image in detail.", "") == OFFICIAL_NO_INPUT
    assert alpaca_prompt("Translate.", "Bonjour") == OFFICIAL_WITH_INPUT
    one = [{"role": "user", "content": "Describe the image in detail."}]
    assert AlpacaTemplate().render(one) == OFFICIAL_NO_INPUT


def test_alpaca_multi_turn_keeps_previous_pairs():
    messages = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
    ]
    header = OFFICIAL_NO_INPUT.split("\n\n")[0]
    expected = f"{header}\n\n### Instruction:\nq1\n\n### Response:a1\n\n### Instruction:\nq2\n\n### Response:"
    assert AlpacaTemplate().render(messages) == expected
    # The first turn of a conversation renders exactly like the single-turn prompt.
    assert expected.startswith(alpaca_prompt("q1"))
    system = [{"role": "system", "content": "Be brief."}, *messages]
    assert AlpacaTemplate().render(system) == expected.replace(header, "Be brief.")


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chatml_matches_transformers(messages, add_generation_prompt):
    ours = ChatMLTemplate().render(messages, add_generation_prompt=add_generation_prompt)
    assert ours == reference(PLAIN_CHATML_TEMPLATE, messages, add_generation_prompt)
    smol = ChatMLTemplate(default_system="You are a helpful AI assistant named SmolLM, trained by Hugging Face")
    assert smol.render(messages, add_generation_prompt=add_generation_prompt) == reference(
        SMOLLM2_TEMPLATE, messages, add_generation_prompt
    )


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_llama2_matches_transformers(messages):
    expected = reference(LLAMA2_TEMPLATE, messages, bos_token="<s>", eos_token="</s>")
    assert Llama2Template().render(messages) == expected
    assert get_template("llama2", bos_token="<s>", eos_token="</s>").render(messages) == expected


@pytest.mark.parametrize("source", [SMOLLM2_TEMPLATE, LLAMA2_TEMPLATE])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_jinja_template_matches_transformers(source, messages):
    ours = JinjaTemplate(source, bos_token="<s>", eos_token="</s>").render(messages)
    assert ours == reference(source, messages, bos_token="<s>", eos_token="</s>")


def test_jinja_template_errors_are_value_errors():
    bad_turns = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ValueError, match="alternate"):
        JinjaTemplate(LLAMA2_TEMPLATE).render(bad_turns)
    with pytest.raises(ValueError, match="does not parse"):
        JinjaTemplate("{% for m in messages %}")
    # The sandbox refuses access to Python internals.
    from jinja2.exceptions import SecurityError

    with pytest.raises(SecurityError):
        JinjaTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}").render(ONE_TURN)


def test_bad_conversations_and_names():
    with pytest.raises(ValueError, match="role"):
        ChatMLTemplate().render([{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="only the first"):
        ChatMLTemplate().render([*ONE_TURN, {"role": "system", "content": "x"}])
    with pytest.raises(ValueError, match="empty"):
        AlpacaTemplate().render([])
    with pytest.raises(ValueError, match="alternate"):
        Llama2Template().render([{"role": "assistant", "content": "x"}])
    with pytest.raises(ValueError, match="unknown template 'chatm'"):
        get_template("chatm")
    with pytest.raises(ValueError, match="no chat template"):
        get_template(None, chat_template=None)
    assert isinstance(get_template(None, chat_template=SMOLLM2_TEMPLATE), JinjaTemplate)
