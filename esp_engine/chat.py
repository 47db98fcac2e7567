"""Chat prompts as token ids: the one renderer the server, the benchmarks, the scripts and the tests share.

A chat template writes the model's special tokens (BOS included, where the model wants one) into
its text, so the rendered text is tokenized with `add_special_tokens=False`: a tokenizer that also
prepends BOS on its own (Llama 3, TinyLlama) would otherwise start every chat prompt with two.
This is what `apply_chat_template(tokenize=True)` does as well; doing it in one place means no caller
can pick the other setting by accident.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def render_chat(tokenizer: Any, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of `messages` (dicts with `role` and `content`) under the tokenizer's chat template.

    Raises what the template raises for a conversation it refuses (jinja's `TemplateError`, or
    `ValueError` when the tokenizer has no template); callers decide how to report it.
    """
    text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt, tokenize=False)
    return list(tokenizer.encode(text, add_special_tokens=False))
