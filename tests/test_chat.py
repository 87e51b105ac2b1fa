"""Gemma 2's chat format against the official chat template, and ChatSession's token history."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jinja2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import GemmaTokenizer

from gemma2_lite.chat import ChatFormatError, ChatSession, encode_chat, format_chat
from gemma2_lite.tokenizer import default_tokenizer

TOK = default_tokenizer()

# The chat_template of google/gemma-2-2b-it / 9b-it / 27b-it (tokenizer_config.json), verbatim.
GEMMA2_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)


@pytest.fixture(scope="module")
def hf() -> GemmaTokenizer:
    """A Hugging Face Gemma tokenizer object used only to render the template (no vocab needed)."""
    tok = GemmaTokenizer()
    tok.chat_template = GEMMA2_CHAT_TEMPLATE
    assert tok.bos_token == "<bos>"
    return tok


def render_hf(
    hf: GemmaTokenizer, messages: list[dict[str, str]], add_generation_prompt: bool
) -> str:
    out = hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert isinstance(out, str)
    return out


CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "user", "content": "  padded \n\n"}, {"role": "model", "content": "\tHi!  "}],
    [
        {"role": "user", "content": "Who wrote Hamlet?"},
        {"role": "assistant", "content": "Shakespeare."},
        {"role": "user", "content": "When?\n\nRoughly."},
    ],
    [{"role": "user", "content": ""}, {"role": "model", "content": "   "}],
    [
        {"role": "user", "content": "text with <start_of_turn> and <bos> inside"},
        {"role": "model", "content": "日本語 🙂 1234"},
    ],
    [{"role": "user", "content": "Answer in French.\n\nWhat is 2+2?", "name": "ignored"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_matches_official_template(
    hf: GemmaTokenizer, messages: list[dict[str, str]], add_generation_prompt: bool
) -> None:
    assert format_chat(messages, add_generation_prompt) == render_hf(
        hf, messages, add_generation_prompt
    )


def test_the_spec_example() -> None:
    messages = [
        {"role": "user", "content": "u1"},
        {"role": "model", "content": "m1"},
        {"role": "user", "content": "u2"},
    ]
    assert format_chat(messages) == (
        "<bos><start_of_turn>user\nu1<end_of_turn>\n<start_of_turn>model\nm1<end_of_turn>\n"
        "<start_of_turn>user\nu2<end_of_turn>\n<start_of_turn>model\n"
    )
    assert format_chat(messages, add_generation_prompt=False).endswith("u2<end_of_turn>\n")


_content = st.one_of(
    st.text(max_size=40),
    st.lists(
        st.sampled_from(
            [
                "  ",
                "\n",
                "\t",
                "word",
                "<end_of_turn>",
                "<bos>",
                "🙂",
                "\u3000",
                "\x0b",
                "\u2028",
                "12",
            ]
        ),
        max_size=8,
    ).map("".join),
)


@st.composite
def conversations(draw: Callable[..., Any]) -> list[dict[str, str]]:
    n = draw(st.integers(min_value=1, max_value=6))
    return [
        {
            "role": "user" if i % 2 == 0 else draw(st.sampled_from(["model", "assistant"])),
            "content": draw(_content),
        }
        for i in range(n)
    ]


@settings(max_examples=200, deadline=None)
@given(conversations(), st.booleans())
def test_matches_official_template_generated(messages: list[dict[str, str]], gen: bool) -> None:
    hf = GemmaTokenizer()
    hf.chat_template = GEMMA2_CHAT_TEMPLATE
    assert format_chat(messages, gen) == render_hf(hf, messages, gen)


@pytest.mark.parametrize(
    "messages, match",
    [
        (
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            "no system role: put the instructions at the start of the first user turn",
        ),
        ([{"role": "model", "content": "I start"}], "position 0 must be 'user'"),
        (
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
            "position 1 must be 'model'",
        ),
        (
            [
                {"role": "user", "content": "a"},
                {"role": "model", "content": "b"},
                {"role": "model", "content": "c"},
            ],
            "alternate",
        ),
    ],
)
def test_errors_where_the_template_also_raises(
    hf: GemmaTokenizer, messages: list[dict[str, str]], match: str
) -> None:
    with pytest.raises(ChatFormatError, match=match):
        format_chat(messages)
    with pytest.raises(jinja2.exceptions.TemplateError):
        render_hf(hf, messages, True)


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "empty"),
        (
            [{"role": "user", "content": "a"}, {"role": "system", "content": "late system"}],
            "no system role",
        ),
        (
            [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}],
            "unknown role 'tool'",
        ),
        ([{"role": "user", "content": ["a", "b"]}], r"\['content'\] must be a str, got list"),
        ([{"role": "user", "content": None}], "must be a str, got NoneType"),
        ([{"role": "user"}], "'role' and 'content' keys"),
        ("just a string", "must be a list"),
        ({"role": "user", "content": "a dict, not a list"}, "must be a list"),
    ],
)
def test_stricter_errors(messages: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        format_chat(messages)


# ------------------------------------------------------------------ tokens
def test_encode_chat_has_exactly_one_bos() -> None:
    messages = CONVERSATIONS[2]
    ids = encode_chat(TOK, messages)
    text = format_chat(messages)
    assert ids[0] == TOK.bos_id and ids.count(TOK.bos_id) == 1
    assert ids == [TOK.bos_id] + TOK.encode(text.removeprefix("<bos>"))
    assert TOK.decode(ids) == text.removeprefix("<bos>")  # <bos> decodes to ""
    assert ids.count(TOK.start_of_turn_id) == 4 and ids.count(TOK.end_of_turn_id) == 3
    prompt = TOK.encode("<start_of_turn>model\n")
    assert ids[-len(prompt) :] == prompt


def test_double_bos_pitfall() -> None:
    """Tokenizing the rendered text with an automatic BOS puts a second "<bos>" after the first."""
    messages = CONVERSATIONS[0]
    naive = TOK.encode(format_chat(messages), add_bos=True)
    good = encode_chat(TOK, messages)
    assert naive != good
    assert naive[0] == TOK.bos_id
    # SentencePiece never parses a control piece from text: "<bos>" becomes ordinary pieces
    assert TOK.decode(naive[1 : 1 + len(TOK.encode("<bos>"))]) == "<bos>"
    assert len(naive) == len(good) + len(TOK.encode("<bos>"))


# ------------------------------------------------------------------ ChatSession
class FakeGenerate:
    """Stands in for gemma2_lite.sampler.generate: returns scripted replies, records calls."""

    def __init__(self, replies: Sequence[list[int]]) -> None:
        self.replies = list(replies)
        self.calls: list[dict[str, Any]] = []

    def __call__(
        self,
        model: Any,
        prompts: list[list[int]],
        *,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
        stop_tokens: Sequence[int] = (),
        callback: Callable[..., Any] | None = None,
    ) -> list[list[int]]:
        assert isinstance(prompts, list) and all(isinstance(p, list) for p in prompts)
        self.calls.append(
            dict(
                model=model,
                prompts=[list(p) for p in prompts],
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                seed=seed,
                stop_tokens=tuple(stop_tokens),
            )
        )
        reply = self.replies.pop(0)
        # the contract: truncated after the first stop token (stop token included)
        for i, t in enumerate(reply):
            if t in stop_tokens:
                return [reply[: i + 1]]
        return [reply[:max_new_tokens]]


def test_session_two_turns_history_equals_encode_chat() -> None:
    eot = TOK.end_of_turn_id
    fake = FakeGenerate(
        [
            TOK.encode("  Good morrow, sir.\n") + [eot, TOK.eos_id],
            TOK.encode("'Tis Hamlet.") + [eot],
        ]
    )
    chat = ChatSession(
        "model", TOK, max_new_tokens=50, temperature=0.7, top_k=5, seed=3, generate_fn=fake
    )
    first = chat.send("Hello there!  ")
    assert first == "Good morrow, sir."
    assert chat.last_stopped
    second = chat.send("Who is the prince?")
    assert second == "'Tis Hamlet."
    messages = [
        {"role": "user", "content": "Hello there!"},
        {"role": "model", "content": "Good morrow, sir."},
        {"role": "user", "content": "Who is the prince?"},
        {"role": "model", "content": "'Tis Hamlet."},
    ]
    assert chat.messages == messages
    assert chat.history == encode_chat(TOK, messages, add_generation_prompt=False)
    assert chat.history[-2:] == [eot, TOK.piece_to_id("\n")]
    assert chat.text() == format_chat(messages, add_generation_prompt=False)
    # what the sampler was asked: the canonical prompt, the settings, stop at <end_of_turn>/<eos>
    first_call, second_call = fake.calls
    assert first_call["prompts"] == [encode_chat(TOK, messages[:1])]
    assert second_call["prompts"] == [encode_chat(TOK, messages[:3])]
    assert first_call["model"] == "model"
    assert (first_call["max_new_tokens"], first_call["temperature"], first_call["top_k"]) == (
        50,
        0.7,
        5,
    )
    assert set(first_call["stop_tokens"]) == {eot, TOK.eos_id}
    assert (first_call["seed"], second_call["seed"]) == (3, 4)


def test_session_reply_without_stop_and_uncanonical_tokens() -> None:
    # the "model" spells a word byte by byte and never stops: the turn is still closed canonically
    spelled = [TOK.piece_to_id(f"<0x{b:02X}>") for b in b"Ay me"]
    fake = FakeGenerate([spelled + TOK.encode(" and more")])
    chat = ChatSession(None, TOK, max_new_tokens=len(spelled), generate_fn=fake)
    assert chat.send("Speak.") == "Ay me"
    assert not chat.last_stopped
    assert chat.last_reply_ids == spelled
    assert chat.history == encode_chat(TOK, chat.messages, add_generation_prompt=False)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(_content, _content), min_size=1, max_size=3))
def test_session_history_generated(turns: list[tuple[str, str]]) -> None:
    eot = TOK.end_of_turn_id
    fake = FakeGenerate([TOK.encode(reply) + [eot] for _, reply in turns])
    chat = ChatSession(None, TOK, max_new_tokens=10_000, generate_fn=fake)
    for user, reply in turns:
        assert (
            chat.send(user) == TOK.decode(TOK.encode(reply)).strip() == reply.strip()
            or "<end_of_turn>" in reply
        )  # a literal <end_of_turn> in a reply ends it early
    # A session encodes markers in user text as plain text (it never forges a turn).
    assert chat.history == encode_chat(
        TOK, chat.messages, add_generation_prompt=False, markers="literal"
    )
    assert chat.history.count(TOK.start_of_turn_id) == len(chat.messages)


def test_session_limits_and_reset() -> None:
    fake = FakeGenerate([[TOK.end_of_turn_id]])
    chat = ChatSession(None, TOK, max_new_tokens=8, max_context=24, generate_fn=fake)
    with pytest.raises(ValueError, match="exceed max_context=24"):
        chat.send("a long question that will not fit in twelve tokens")
    assert chat.history == [TOK.bos_id] and chat.messages == []
    assert chat.send("") == ""
    chat.reset()
    assert chat.history == [TOK.bos_id] and chat.text() == "<bos>"
    with pytest.raises(ValueError, match="max_new_tokens"):
        ChatSession(None, TOK, max_new_tokens=0)
    with pytest.raises(ValueError, match="user_text must be a str"):
        chat.send(["not", "text"])  # type: ignore[arg-type]
    assert "turns=0" in repr(chat)
