"""Gemma 2's chat format: render a conversation, tokenize it, and hold a multi-turn session.

The instruction-tuned Gemma 2 models read a conversation as (``\\n`` is a newline)::

    <bos><start_of_turn>user\\n{u1}<end_of_turn>\\n<start_of_turn>model\\n{m1}<end_of_turn>\\n
    <start_of_turn>user\\n{u2}<end_of_turn>\\n<start_of_turn>model\\n

exactly one ``<bos>``, at the start; roles ``user`` and ``model`` only (``assistant`` is
accepted and written as ``model``), alternating and starting with ``user``; every content
trimmed with ``str.strip()``. There is no system role: put instructions at the start of the
first user turn. The model ends its turn with ``<end_of_turn>`` (the report: ``<end_of_turn>
<eos>``), which is where generation stops.

:func:`format_chat` renders the same string as the official Hugging Face ``chat_template`` of
``google/gemma-2-*-it`` and is stricter: it also rejects unknown roles, a ``system`` message
anywhere (the template only checks the first), empty conversations and non-string content.

Turn markers inside content
---------------------------
``<start_of_turn>`` and ``<end_of_turn>`` are matched by the tokenizer inside any text, so a
message that *contains* them, tokenized with the template, yields real marker ids: a user could
write the model's turn. By default :func:`format_chat` / :func:`encode_chat` keep the reference
template's exact output (``markers="parse"``, needed for parity with transformers);
``markers="reject"`` refuses such content and ``markers="literal"`` (:func:`encode_chat` only)
encodes it as plain characters. :class:`ChatSession`, which takes text from a person, always
uses ``"literal"``: no user text can produce a turn-marker id.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from gemma2_lite.checks import check_int, check_sampling_settings, check_seed, turn_seed
from gemma2_lite.tokenizer import USER_DEFINED_PIECES, Tokenizer

__all__ = [
    "ChatFormatError",
    "format_chat",
    "encode_chat",
    "turn_text",
    "ChatSession",
    "BOS_TEXT",
    "GENERATION_PROMPT",
    "MARKER_MODES",
]

BOS_TEXT = "<bos>"
START = "<start_of_turn>"
END = "<end_of_turn>"
GENERATION_PROMPT = f"{START}model\n"
_ROLES = {"user": "user", "model": "model", "assistant": "model"}
#: What to do with a turn marker (``<start_of_turn>``, ``<end_of_turn>``, ``<mask>``) written
#: *inside* a message's content: "parse" (the reference template's behaviour: it becomes the
#: marker, so content can forge turns), "reject" (ChatFormatError) or "literal" (encoded as the
#: plain characters it is; token ids only, so encode_chat and ChatSession).
MARKER_MODES = ("parse", "reject", "literal")


class ChatFormatError(ValueError):
    """A conversation that Gemma 2's chat format cannot express."""


class GenerateFn(Protocol):
    """The sampler contract (``gemma2_lite.sampler.generate``): new tokens of each prompt."""

    def __call__(
        self,
        model: Any,
        prompts: list[list[int]],
        *,
        max_new_tokens: int = ...,
        temperature: float = ...,
        top_k: int | None = ...,
        top_p: float | None = ...,
        seed: int = ...,
        stop_tokens: Sequence[int] = ...,
        callback: Callable[..., Any] | None = ...,
    ) -> list[list[int]]: ...


def turn_text(role: str, content: str) -> str:
    """One rendered turn: ``"<start_of_turn>{role}\\n{content.strip()}<end_of_turn>\\n"``."""
    return f"{START}{role}\n{content.strip()}{END}\n"


def _check_markers(markers: str, allowed: Sequence[str] = MARKER_MODES) -> None:
    if markers not in allowed:
        hint = " ('literal' needs token ids: use encode_chat)" if markers == "literal" else ""
        raise ChatFormatError(f"markers must be one of {tuple(allowed)}, got {markers!r}{hint}")


def _normalise(
    messages: Sequence[Mapping[str, Any]], markers: str = "parse"
) -> list[tuple[str, str]]:
    """``[(role, content)]`` with roles mapped to user/model, after checking every rule
    (and, with ``markers="reject"``, that no content holds a turn marker)."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ChatFormatError(
            f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got "
            f"{type(messages).__name__}"
        )
    if len(messages) == 0:
        raise ChatFormatError("the conversation is empty: give at least one user message")
    turns: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ChatFormatError(
                f"messages[{i}] must be a dict with 'role' and 'content' keys, got {message!r:.80}"
            )
        role, content = message["role"], message["content"]
        if role == "system":
            raise ChatFormatError(
                f"messages[{i}] has role 'system', but Gemma 2 has no system role: put the "
                "instructions at the start of the first user turn instead"
            )
        if role not in _ROLES:
            raise ChatFormatError(
                f"messages[{i}] has unknown role {role!r}; Gemma 2's roles are 'user' and "
                "'model' ('assistant' is accepted as 'model')"
            )
        expected = "user" if i % 2 == 0 else "model"
        if _ROLES[role] != expected:
            raise ChatFormatError(
                f"messages[{i}] has role {role!r} but roles must alternate user/model/user/..., "
                f"starting with user: position {i} must be {expected!r}"
            )
        if not isinstance(content, str):
            raise ChatFormatError(
                f"messages[{i}]['content'] must be a str, got {type(content).__name__} "
                "(Gemma 2's chat format is text-only)"
            )
        if markers == "reject":
            found = [p for p in USER_DEFINED_PIECES if p in content]
            if found:
                raise ChatFormatError(
                    f"messages[{i}]['content'] contains {found[0]!r}, a turn marker the "
                    "tokenizer would turn into a control token; remove it (or use "
                    "encode_chat(..., markers='literal') to keep it as plain text)"
                )
        turns.append((_ROLES[role], content))
    return turns


def format_chat(
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    *,
    markers: str = "parse",
) -> str:
    """The conversation as Gemma 2's chat text (a ``str`` that starts with ``"<bos>"``).

    Args:
      messages: ``[{"role": "user" | "model" | "assistant", "content": str}, ...]``, alternating
        and starting with ``user``. Other keys are ignored.
      add_generation_prompt: end with ``"<start_of_turn>model\\n"`` so a model writes the reply.
      markers: ``"parse"`` (default: exactly the reference template's text, turn markers in
        content included) or ``"reject"`` (content holding a turn marker raises). Text cannot
        carry ``"literal"``: use :func:`encode_chat`.

    Raises:
      ChatFormatError (a ``ValueError``): system role, unknown role, roles out of order, empty
      conversation, non-string content, a marker in content with ``markers="reject"``.
    """
    _check_markers(markers, ("parse", "reject"))
    turns = _normalise(messages, markers)
    text = BOS_TEXT + "".join(turn_text(role, content) for role, content in turns)
    return text + GENERATION_PROMPT if add_generation_prompt else text


def _encode_turn(tokenizer: Tokenizer, role: str, content: str) -> list[int]:
    """Ids of ``turn_text(role, content)`` with the content's turn markers as plain text.

    The frame and the content are encoded apart; since ``"\\n"`` and ``<end_of_turn>`` are
    atomic pieces on both sides of the content, this equals encoding the whole turn at once
    whenever the content holds no marker.
    """
    return (
        tokenizer.encode(f"{START}{role}\n")
        + tokenizer.encode(content.strip(), parse_special=False)
        + tokenizer.encode(f"{END}\n")
    )


def encode_chat(
    tokenizer: Tokenizer,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    *,
    markers: str = "parse",
) -> list[int]:
    """Token ids of :func:`format_chat`'s text, with exactly one ``<bos>`` (``list[int]``).

    The rendered text already says ``<bos>``; tokenizing it with an automatic BOS as well is the
    double-``<bos>`` pitfall. ``<bos>`` is a control piece, which SentencePiece never matches in
    text, so the leading ``"<bos>"`` is replaced by ``bos_id`` and the rest is encoded with
    ``add_bos=False``. (Other special strings in the text, ``<start_of_turn>`` and
    ``<end_of_turn>``, are user-defined pieces and encode to their single ids.)

    ``markers`` says what happens to a turn marker written inside a message's content:
    ``"parse"`` (default, the reference behaviour: it becomes the marker id), ``"reject"``
    (:class:`ChatFormatError`) or ``"literal"`` (it is encoded as plain characters, so content
    can never produce a marker id; ids equal ``"parse"``'s whenever no content holds a marker).
    """
    _check_markers(markers)
    if markers == "literal":
        turns = _normalise(messages)
        ids = [tokenizer.bos_id]
        for role, content in turns:
            ids += _encode_turn(tokenizer, role, content)
        return ids + tokenizer.encode(GENERATION_PROMPT) if add_generation_prompt else ids
    text = format_chat(messages, add_generation_prompt=add_generation_prompt, markers=markers)
    assert text.startswith(BOS_TEXT)
    return [tokenizer.bos_id] + tokenizer.encode(text[len(BOS_TEXT) :], add_bos=False)


class ChatSession:
    """A multi-turn conversation with a model, kept as token ids.

    ``history`` always equals ``encode_chat(tokenizer, messages, add_generation_prompt=False,
    markers="literal")``: after each reply the model's turn is closed with ``<end_of_turn>\\n``
    exactly as :func:`format_chat` renders it, so the next turn continues the canonical text.
    The user's text (and the decoded reply) are encoded with ``markers="literal"``: a
    ``<end_of_turn>`` typed by a user stays text and can never close the turn or open the
    model's. Without markers in the text this is the reference template's tokenization.

    Args:
      model: passed through to ``generate_fn``.
      tokenizer: a :class:`~gemma2_lite.tokenizer.Tokenizer` with Gemma's special pieces.
      max_new_tokens: most tokens per reply (a reply cut here is still closed normally).
      temperature, top_k, top_p: sampling settings (``temperature=0`` is greedy).
      seed: turn ``i`` (0-based) samples with ``seed + i`` (mod 2**32), so a session is
        reproducible.
      max_context: if given, :meth:`send` raises when prompt + ``max_new_tokens`` would exceed it
        (e.g. the model's ``max_seq_len``).
      generate_fn: the sampler, called as ``generate(model, [prompt], ...)`` with the whole
        conversation every turn. Default: a :class:`~gemma2_lite.sampler.PromptCache` keeps the
        conversation's key/value cache between turns, so each turn prefills only its new tokens
        (``session.prefilled`` says how many) and gives the tokens ``generate`` would.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Tokenizer,
        *,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
        max_context: int | None = None,
        generate_fn: GenerateFn | None = None,
    ) -> None:
        check_int(max_new_tokens, "max_new_tokens", low=1)
        check_sampling_settings(temperature, top_k, top_p)
        check_seed(seed)
        if max_context is not None:
            check_int(
                max_context,
                "max_context",
                low=2,
                what="an integer >= 2 (a prompt token and a reply token) or None",
            )
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.seed = seed
        self.max_context = max_context
        self._generate_fn = generate_fn
        self._cache: Any = None  # a sampler.PromptCache, made on first use
        self.messages: list[dict[str, str]] = []
        self.history: list[int] = [tokenizer.bos_id]
        self.last_reply_ids: list[int] = []
        self.last_stopped: bool = False

    @property
    def stop_tokens(self) -> tuple[int, int]:
        """``(end_of_turn_id, eos_id)``: a reply ends at whichever comes first."""
        return (self.tokenizer.end_of_turn_id, self.tokenizer.eos_id)

    def _reply(self, prompt: list[int], seed: int) -> list[int]:
        """The new tokens after ``prompt``, from the cached conversation or ``generate_fn``."""
        sampling: dict[str, Any] = dict(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=seed,
            stop_tokens=self.stop_tokens,
        )
        if self._generate_fn is None:
            if self._cache is None:
                from gemma2_lite.sampler import PromptCache  # lazy: the model code is optional

                self._cache = PromptCache(self.model, self.max_context)
            return self._cache.generate(prompt, **sampling)
        outputs = self._generate_fn(self.model, [prompt], **sampling)
        if not isinstance(outputs, list) or len(outputs) != 1:
            length = len(outputs) if hasattr(outputs, "__len__") else "?"
            raise TypeError(
                f"generate_fn must return one list of new tokens per prompt (1 here), "
                f"got {type(outputs).__name__} of length {length}"
            )
        return [int(t) for t in outputs[0]]

    @property
    def prefilled(self) -> int | None:
        """Tokens the last turn prefilled (with the default cached sampler), else None."""
        return None if self._cache is None else self._cache.prefilled

    def prompt_ids(self, user_text: str) -> list[int]:
        """The tokens the model sees for the next turn: history + user turn +
        ``<start_of_turn>model\\n``."""
        if not isinstance(user_text, str):
            raise ChatFormatError(f"user_text must be a str, got {type(user_text).__name__}")
        return (
            self.history
            + _encode_turn(self.tokenizer, "user", user_text)
            + self.tokenizer.encode(GENERATION_PROMPT)
        )

    def send(self, user_text: str) -> str:
        """Add a user turn, generate the model's reply, close the turn; return the reply text.

        The reply is decoded from the new tokens before the first stop token and trimmed (the
        chat format stores trimmed contents).
        """
        prompt = self.prompt_ids(user_text)
        if self.max_context is not None and len(prompt) + self.max_new_tokens > self.max_context:
            raise ValueError(
                f"the conversation is {len(prompt)} tokens; with max_new_tokens="
                f"{self.max_new_tokens} it would exceed max_context={self.max_context}. "
                "Start a new session (or call reset())"
            )
        turn = len(self.messages) // 2
        new = self._reply(prompt, turn_seed(self.seed, turn))
        stop_at = next((i for i, t in enumerate(new) if t in self.stop_tokens), None)
        self.last_stopped = stop_at is not None
        reply_ids = new if stop_at is None else new[:stop_at]
        self.last_reply_ids = reply_ids
        reply = self.tokenizer.decode(reply_ids).strip()
        self.messages += [
            {"role": "user", "content": user_text.strip()},
            {"role": "model", "content": reply},
        ]
        # Close the model turn canonically: re-encode the trimmed reply + "<end_of_turn>\n"
        # (a marker the model spelled out in plain characters stays plain text).
        self.history = (
            prompt
            + self.tokenizer.encode(reply, parse_special=False)
            + self.tokenizer.encode(f"{END}\n")
        )
        return reply

    def reset(self) -> None:
        """Forget the conversation (history back to ``[bos_id]``)."""
        self.messages = []
        self.history = [self.tokenizer.bos_id]
        self.last_reply_ids = []
        self.last_stopped = False
        if self._cache is not None:
            self._cache.reset()

    def text(self) -> str:
        """The conversation so far as chat text (``format_chat`` without a generation prompt)."""
        return (
            format_chat(self.messages, add_generation_prompt=False) if self.messages else BOS_TEXT
        )

    def __repr__(self) -> str:
        return (
            f"ChatSession(turns={len(self.messages) // 2}, history_tokens={len(self.history)}, "
            f"max_new_tokens={self.max_new_tokens}, temperature={self.temperature}, "
            f"seed={self.seed})"
        )
