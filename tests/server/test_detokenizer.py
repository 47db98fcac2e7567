"""Incremental detokenization and stop strings, without a server."""

from __future__ import annotations

import pytest

from server.detokenizer import IncrementalDetokenizer, StopStringMatcher


class ByteTokenizer:
    """Each token is one UTF-8 byte, so every multi-byte character is split across tokens."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def stream_text(tokenizer, ids: list[int], prompt_ids: list[int] = ()) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    pieces = [detok.push(t) for t in ids]
    pieces.append(detok.flush())
    return pieces


@pytest.mark.parametrize("text", ["héllo wörld", "日本語のテキスト", "emoji 🎉🚀 end", "a\u0301 mixed ß € 𝄞"])
def test_multibyte_characters_split_across_tokens(text: str) -> None:
    tok = ByteTokenizer()
    pieces = stream_text(tok, tok.encode(text), prompt_ids=tok.encode("ctx "))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_incomplete_character_is_flushed_as_replacement() -> None:
    tok = ByteTokenizer()
    ids = tok.encode("ok ") + list("€".encode())[:2]  # generation cut mid-character
    detok = IncrementalDetokenizer(tok)
    assert "".join(detok.push(t) for t in ids) == "ok "
    assert detok.flush() == "\ufffd"


def test_real_tokenizer_multibyte(tokenizer) -> None:
    text = "Café — 日本語, emoji 🎉 and Ελληνικά."
    ids = tokenizer.encode(text, add_special_tokens=False)
    # The test only means something if some token alone is a partial UTF-8 sequence.
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids)
    prompt = tokenizer.encode("Say:", add_special_tokens=False)
    pieces = stream_text(tokenizer, ids, prompt)
    assert "".join(pieces) == tokenizer.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


def feed_all(stops: list[str], chunks: list[str]) -> tuple[list[str], bool]:
    m = StopStringMatcher(stops)
    out = [m.feed(c) for c in chunks]
    out.append(m.flush())
    return out, m.stopped


def test_stop_string_spanning_chunks_is_not_leaked() -> None:
    out, stopped = feed_all(["o wo"], ["Hel", "lo", " w", "orld"])
    assert stopped
    assert "".join(out) == "Hell"
    assert "o" not in "".join(out[1:])  # the held "o" of "lo" never went out


def test_held_prefix_is_released_when_it_cannot_match() -> None:
    out, stopped = feed_all(["xyz"], ["ab x", "y", "q", "!"])
    assert not stopped
    assert out == ["ab ", "", "xyq", "!", ""]


def test_held_text_released_at_end() -> None:
    out, stopped = feed_all(["END"], ["the E", "N"])
    assert not stopped
    assert "".join(out) == "the EN"
    assert out[-1] == "EN"


def test_earliest_of_several_stop_strings_wins() -> None:
    out, stopped = feed_all(["world", "lo w"], ["hello world"])
    assert stopped and "".join(out) == "hel"


def test_stop_string_in_a_single_chunk_and_nothing_after() -> None:
    m = StopStringMatcher(["\n\n"])
    assert m.feed("line one\n\nline two") == "line one"
    assert m.stopped
    assert m.feed("more") == ""
    assert m.flush() == ""


def test_no_stop_strings_passes_through() -> None:
    m = StopStringMatcher([])
    assert m.feed("abc") == "abc" and m.flush() == ""
