"""DS4 chat prompts and stop conditions, rendered the way the reference engine does.

A single ``-p PROMPT`` becomes (ds4 ``encode_chat_prompt``)::

    BOS [think-max prefix] [system] <｜User｜> PROMPT <｜Assistant｜> (<think> | </think>)

where the system text defaults to "You are a helpful assistant", the
think-max prefix is only used when the context is at least
``THINK_MAX_MIN_CONTEXT`` tokens (otherwise "max" falls back to "high"), and
the assistant marker is followed by ``<think>`` in thinking modes and by
``</think>`` in non-thinking mode. The pieces of text are tokenized with plain
BPE (no special-token recognition), the markers are inserted as ids.

A prompt that already starts with the BOS text is taken as a rendered chat and
tokenized verbatim, recognising only the seven DS4 special tokens in it.

Conversations are rendered to text like the reference server does and then
tokenized the same way (:func:`render_chat_text`, :func:`render_chat`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from ds4nb.errors import UsageError
from ds4nb.tokenizer import (
    ASSISTANT_TEXT,
    BOS_TEXT,
    DS4_SPECIAL_TEXTS,
    EOS_TEXT,
    THINK_END_TEXT,
    THINK_START_TEXT,
    USER_TEXT,
    Tokenizer,
)

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_SYSTEM_PROMPT",
    "THINK_MAX_MIN_CONTEXT",
    "THINK_MAX_PREFIX",
    "Message",
    "StopCondition",
    "ThinkMode",
    "effective_think_mode",
    "is_rendered_chat",
    "render_chat",
    "render_chat_text",
    "render_prompt",
    "render_prompt_text",
    "tokenize_rendered",
]

ThinkMode = Literal["none", "high", "max"]
THINK_MODES: tuple[ThinkMode, ...] = get_args(ThinkMode)

#: System text the reference CLI uses when none is given ("" disables it).
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant"

#: Generation limit of the reference CLI (``-n``).
DEFAULT_MAX_TOKENS = 50000

#: Think Max is only honoured with a context of at least this many tokens (384K).
THINK_MAX_MIN_CONTEXT = 393216

#: Text placed right after BOS in Think Max mode.
THINK_MAX_PREFIX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve "
    "the root cause, rigorously stress-testing your logic against all potential paths, edge cases, "
    "and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, "
    "considered alternative, and rejected hypothesis to ensure absolutely no assumption is left "
    "unchecked.\n\n"
)

_SYSTEM_ROLES = ("system", "developer")
_ROLES = (*_SYSTEM_ROLES, "user", "assistant")
_SPECIAL_SPLIT = re.compile("(" + "|".join(map(re.escape, DS4_SPECIAL_TEXTS)) + ")")


def effective_think_mode(think: ThinkMode, ctx: int) -> ThinkMode:
    """The mode actually used: "max" needs ``ctx >= THINK_MAX_MIN_CONTEXT``, else "high"."""
    if think not in THINK_MODES:
        raise UsageError(f"unknown thinking mode {think!r}: expected one of {', '.join(THINK_MODES)}")
    if think == "max" and ctx < THINK_MAX_MIN_CONTEXT:
        return "high"
    return think


def _assistant_opening(mode: ThinkMode) -> str:
    return ASSISTANT_TEXT + (THINK_END_TEXT if mode == "none" else THINK_START_TEXT)


def is_rendered_chat(prompt: str) -> bool:
    """True when ``prompt`` is already a rendered chat (it starts with the BOS text)."""
    return prompt.startswith(BOS_TEXT)


def tokenize_rendered(tok: Tokenizer, text: str) -> list[int]:
    """Tokenize rendered chat text: the seven DS4 special tokens become ids, the rest plain BPE.

    Other added tokens written in the text (e.g. ``<｜fim▁hole｜>``) stay text,
    as in the reference engine.
    """
    ids: list[int] = []
    for i, piece in enumerate(_SPECIAL_SPLIT.split(text)):
        if i % 2:
            ids.append(tok.special_ids[piece])
        elif piece:
            ids += tok.encode_ordinary(piece)
    return ids


def render_prompt_text(
    prompt: str, *, system: str | None = DEFAULT_SYSTEM_PROMPT, think: ThinkMode = "high", ctx: int
) -> str:
    """The text form of what a single ``-p PROMPT`` becomes (``system=None`` or "" for none)."""
    if is_rendered_chat(prompt):
        return prompt
    mode = effective_think_mode(think, ctx)
    prefix = THINK_MAX_PREFIX if mode == "max" else ""
    return BOS_TEXT + prefix + (system or "") + USER_TEXT + prompt + _assistant_opening(mode)


def render_prompt(
    tok: Tokenizer, prompt: str, *, system: str | None = DEFAULT_SYSTEM_PROMPT, think: ThinkMode = "high", ctx: int
) -> list[int]:
    """Token ids for a single ``-p PROMPT``, built piece by piece like the reference CLI."""
    if is_rendered_chat(prompt):
        return tokenize_rendered(tok, prompt)
    mode = effective_think_mode(think, ctx)
    ids = [tok.bos_id]
    if mode == "max":
        ids += tok.encode_ordinary(THINK_MAX_PREFIX)
    if system:
        ids += tok.encode_ordinary(system)
    ids.append(tok.user_id)
    ids += tok.encode_ordinary(prompt)
    ids += [tok.assistant_id, tok.think_end_id if mode == "none" else tok.think_start_id]
    return ids


@dataclass(frozen=True)
class Message:
    """One chat turn. ``role`` is system, developer, user or assistant.

    ``reasoning`` is an assistant turn's thinking text; it is only rendered for
    an assistant turn after the last user turn, in a thinking mode.
    """

    role: str
    content: str
    reasoning: str = ""


def render_chat_text(messages: Sequence[Message], *, think: ThinkMode = "high", ctx: int) -> str:
    """Render a conversation to DS4 chat text, ending with the assistant opening if a reply is due.

    System/developer texts are gathered (joined by a blank line) right after
    BOS and the think-max prefix. Each user turn is ``<｜User｜>`` + text; an
    assistant turn that answers a user turn opens with ``<｜Assistant｜>`` and
    ``</think>`` (earlier turns drop their reasoning), or with
    ``<think>reasoning</think>`` when it comes after the last user turn in a
    thinking mode; every assistant turn ends with the EOS text.
    """
    mode = effective_think_mode(think, ctx)
    for message in messages:
        if message.role not in _ROLES:
            raise UsageError(f"unsupported chat role {message.role!r}: expected one of {', '.join(_ROLES)}")
    system = ""
    for message in messages:
        if message.role in _SYSTEM_ROLES:
            system += ("\n\n" if system else "") + message.content
    last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=-1)

    parts = [BOS_TEXT, THINK_MAX_PREFIX if mode == "max" else "", system]
    reply_due = False
    for i, message in enumerate(messages):
        if message.role == "user":
            parts += [USER_TEXT, message.content]
            reply_due = True
        elif message.role == "assistant":
            if reply_due:
                parts.append(ASSISTANT_TEXT)
                if mode != "none" and i > last_user:
                    parts += [THINK_START_TEXT, message.reasoning, THINK_END_TEXT]
                else:
                    parts.append(THINK_END_TEXT)
            parts += [message.content, EOS_TEXT]
            reply_due = False
    if reply_due:
        parts.append(_assistant_opening(mode))
    return "".join(parts)


def render_chat(tok: Tokenizer, messages: Sequence[Message], *, think: ThinkMode = "high", ctx: int) -> list[int]:
    """Token ids of :func:`render_chat_text`."""
    return tokenize_rendered(tok, render_chat_text(messages, think=think, ctx=ctx))


@dataclass(frozen=True)
class StopCondition:
    """When generation ends: the EOS token (not emitted), the token limit, or a full context."""

    eos_id: int
    max_tokens: int = DEFAULT_MAX_TOKENS

    @classmethod
    def for_tokenizer(cls, tok: Tokenizer, max_tokens: int = DEFAULT_MAX_TOKENS) -> StopCondition:
        return cls(eos_id=tok.eos_id, max_tokens=max_tokens)

    def is_stop(self, token_id: int) -> bool:
        """True if sampling ``token_id`` ends the reply (the token itself is not output)."""
        return token_id == self.eos_id

    def token_budget(self, ctx: int, n_prompt: int) -> int:
        """How many tokens may be generated after ``n_prompt`` prompt tokens in a ``ctx`` context.

        One position is kept free, as the reference CLI does.
        """
        return max(0, min(self.max_tokens, ctx - n_prompt - 1))
