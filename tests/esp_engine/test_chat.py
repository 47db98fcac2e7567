"""render_chat: the chat template's special tokens appear once, and the server renders chats with it."""

from __future__ import annotations

import pytest

from esp_engine.chat import render_chat

MESSAGES = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "What colour is the sky?"},
]
# A Llama-3-like template: it writes BOS itself, and the tokenizer below also prepends BOS on its own.
BOS_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def bos_adding_tokenizer():
    from transformers import AutoTokenizer

    from esp_engine.loader import prepare_embedded_model

    tok = AutoTokenizer.from_pretrained(prepare_embedded_model(), add_bos_token=True)
    tok.chat_template = BOS_TEMPLATE
    assert tok.encode("hi")[0] == tok.bos_token_id  # the premise: plain encoding adds a BOS
    return tok


def test_a_template_that_writes_bos_gets_exactly_one(bos_adding_tokenizer):
    tok = bos_adding_tokenizer
    ids = render_chat(tok, MESSAGES)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids) == tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)


def test_smollm2_prompt_is_the_template_text_and_nothing_more(smol):
    tok = smol.tokenizer
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    ids = render_chat(tok, MESSAGES)
    assert tok.decode(ids) == text
    # One <|im_start|> per message plus the generation prompt's, none prepended by the tokenizer.
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == len(MESSAGES) + 1
    assert ids == list(tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)["input_ids"])


def test_generation_prompt_is_optional(smol):
    tok = smol.tokenizer
    with_prompt, without = render_chat(tok, MESSAGES), render_chat(tok, MESSAGES, add_generation_prompt=False)
    assert with_prompt[: len(without)] == without and len(with_prompt) > len(without)
    assert tok.decode(with_prompt[len(without):]) == "<|im_start|>assistant\n"


@pytest.mark.parametrize("tokenizer_name", ["smol", "bos_adding_tokenizer"])
def test_the_server_renders_chat_messages_with_it(request, tokenizer_name):
    from server.protocol import ChatMessage
    from server.serving import chat_prompt_ids

    value = request.getfixturevalue(tokenizer_name)
    tok = getattr(value, "tokenizer", value)
    messages = [ChatMessage(role="developer", content=MESSAGES[0]["content"]),
                ChatMessage(role="user", content=[{"type": "text", "text": MESSAGES[1]["content"]}])]
    assert chat_prompt_ids(tok, messages, add_generation_prompt=True) == render_chat(tok, MESSAGES)
