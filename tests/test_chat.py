"""Chat rendering and stop conditions. Expected strings come from reading ds4.c / ds4_cli.c /
ds4_server.c (see docs/runtime.md, section 7), written out literally here."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer as HFTokenizer

from ds4nb.chat import (
    Message,
    StopCondition,
    ThinkMode,
    effective_think_mode,
    render_chat,
    render_chat_text,
    render_prompt,
    render_prompt_text,
    tokenize_rendered,
)
from ds4nb.errors import UsageError
from ds4nb.tokenizer import Tokenizer
from ds4nb.vocab import ds4_vocab, tokenizer_json_path

CTX = 32768
BIG_CTX = 393216

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
MAX_PREFIX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root "
    "cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial "
    "scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
)

PROMPT_NOTHINK = "<｜begin▁of▁sentence｜>You are a helpful assistant<｜User｜>Ciao<｜Assistant｜></think>"
PROMPT_THINK = "<｜begin▁of▁sentence｜>You are a helpful assistant<｜User｜>Ciao<｜Assistant｜><think>"
PROMPT_THINK_MAX = BOS + MAX_PREFIX + "You are a helpful assistant<｜User｜>Ciao<｜Assistant｜><think>"

CONVERSATION = [
    Message("system", "Sei un assistente conciso."),
    Message("user", "Ciao!"),
    Message("assistant", "Ciao! Come posso aiutarti?", reasoning="L'utente saluta."),
    Message("user", "Quanto fa 2+2?"),
]
CONVERSATION_NOTHINK = (
    "<｜begin▁of▁sentence｜>Sei un assistente conciso.<｜User｜>Ciao!<｜Assistant｜></think>"
    "Ciao! Come posso aiutarti?<｜end▁of▁sentence｜><｜User｜>Quanto fa 2+2?<｜Assistant｜></think>"
)
CONVERSATION_THINK = (
    "<｜begin▁of▁sentence｜>Sei un assistente conciso.<｜User｜>Ciao!<｜Assistant｜></think>"
    "Ciao! Come posso aiutarti?<｜end▁of▁sentence｜><｜User｜>Quanto fa 2+2?<｜Assistant｜><think>"
)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_metadata(ds4_vocab().metadata())


@pytest.fixture(scope="module")
def ref() -> HFTokenizer:
    return HFTokenizer.from_file(str(tokenizer_json_path()))


# -- a single -p prompt ------------------------------------------------------------


@pytest.mark.parametrize(
    ("think", "ctx", "expected"),
    [
        ("none", CTX, PROMPT_NOTHINK),
        ("high", CTX, PROMPT_THINK),
        ("max", BIG_CTX, PROMPT_THINK_MAX),
        ("max", BIG_CTX - 1, PROMPT_THINK),
        ("max", CTX, PROMPT_THINK),
        ("none", BIG_CTX, PROMPT_NOTHINK),
    ],
)
def test_prompt_text(think: ThinkMode, ctx: int, expected: str) -> None:
    assert render_prompt_text("Ciao", think=think, ctx=ctx) == expected


def test_prompt_text_system_choices() -> None:
    assert render_prompt_text("Ciao", system="", think="none", ctx=CTX) == (
        "<｜begin▁of▁sentence｜><｜User｜>Ciao<｜Assistant｜></think>"
    )
    assert render_prompt_text("Ciao", system=None, think="high", ctx=CTX) == (
        "<｜begin▁of▁sentence｜><｜User｜>Ciao<｜Assistant｜><think>"
    )
    assert render_prompt_text("Ciao", system="Be brief.", think="max", ctx=BIG_CTX) == (
        BOS + MAX_PREFIX + "Be brief.<｜User｜>Ciao<｜Assistant｜><think>"
    )


def test_prompt_ids_are_built_piece_by_piece(tok: Tokenizer, ref: HFTokenizer) -> None:
    system = ref.encode("You are a helpful assistant", add_special_tokens=False).ids
    prompt = ref.encode("Ciao", add_special_tokens=False).ids
    assert render_prompt(tok, "Ciao", think="none", ctx=CTX) == [0, *system, 128803, *prompt, 128804, 128822]
    assert render_prompt(tok, "Ciao", think="high", ctx=CTX) == [0, *system, 128803, *prompt, 128804, 128821]
    prefix = ref.encode(MAX_PREFIX, add_special_tokens=False).ids
    assert render_prompt(tok, "Ciao", think="max", ctx=BIG_CTX) == [
        0,
        *prefix,
        *system,
        128803,
        *prompt,
        128804,
        128821,
    ]
    assert render_prompt(tok, "Ciao", system="", think="high", ctx=CTX) == [0, 128803, *prompt, 128804, 128821]


@pytest.mark.parametrize(("think", "ctx"), [("none", CTX), ("high", CTX), ("max", BIG_CTX)])
def test_prompt_ids_equal_the_tokenized_text(tok: Tokenizer, think: ThinkMode, ctx: int) -> None:
    for prompt in ["Ciao", "Scrivi una storia su una papera scansafatiche", "  x = [1, 2]\n\tprint(x)\n"]:
        text = render_prompt_text(prompt, think=think, ctx=ctx)
        assert render_prompt(tok, prompt, think=think, ctx=ctx) == tokenize_rendered(tok, text)


def test_prompt_text_is_not_scanned_for_special_tokens(tok: Tokenizer) -> None:
    ids = render_prompt(tok, "explain <think> and <｜User｜>", system="", think="none", ctx=CTX)
    assert ids[:2] == [tok.bos_id, tok.user_id]
    assert ids[-2:] == [tok.assistant_id, tok.think_end_id]
    middle = ids[2:-2]
    assert tok.think_start_id not in middle and tok.user_id not in middle
    assert tok.decode(middle) == "explain <think> and <｜User｜>"


def test_prompt_starting_with_bos_is_taken_verbatim(tok: Tokenizer, ref: HFTokenizer) -> None:
    rendered = "<｜begin▁of▁sentence｜><｜User｜>Hi <｜fim▁hole｜>!<｜Assistant｜></think>"
    plain = ref.encode("Hi <｜fim▁hole｜>!", add_special_tokens=False).ids  # HF would make <｜fim▁hole｜> one id
    assert 128800 in plain
    ids = render_prompt(tok, rendered, think="high", ctx=CTX)
    assert ids[:2] == [0, 128803] and ids[-2:] == [128804, 128822]
    assert 128800 not in ids
    assert tok.decode(ids) == rendered
    assert render_prompt_text(rendered, think="max", ctx=BIG_CTX) == rendered


def test_tokenize_rendered_recognises_the_seven_ds4_tokens(tok: Tokenizer) -> None:
    text = "<｜begin▁of▁sentence｜>a<｜end▁of▁sentence｜><｜User｜><｜Assistant｜><think></think>｜DSML｜b"
    ids = tokenize_rendered(tok, text)
    assert ids == [0, *tok.encode_ordinary("a"), 1, 128803, 128804, 128821, 128822, 128825, *tok.encode_ordinary("b")]


# -- conversations ---------------------------------------------------------------


def test_conversation_text() -> None:
    assert render_chat_text(CONVERSATION, think="none", ctx=CTX) == CONVERSATION_NOTHINK
    assert render_chat_text(CONVERSATION, think="high", ctx=CTX) == CONVERSATION_THINK
    assert render_chat_text(CONVERSATION, think="max", ctx=BIG_CTX) == (
        BOS + MAX_PREFIX + CONVERSATION_THINK.removeprefix(BOS)
    )


def test_assistant_after_the_last_user_turn_keeps_its_reasoning() -> None:
    messages = [Message("user", "Hi"), Message("assistant", "Hello", reasoning="greet back")]
    assert render_chat_text(messages, think="high", ctx=CTX) == (
        "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜><think>greet back</think>Hello<｜end▁of▁sentence｜>"
    )
    assert render_chat_text(messages, think="none", ctx=CTX) == (
        "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜></think>Hello<｜end▁of▁sentence｜>"
    )


def test_system_messages_are_gathered_after_bos() -> None:
    messages = [
        Message("user", "Q"),
        Message("system", "One."),
        Message("developer", "Two."),
    ]
    assert render_chat_text(messages, think="none", ctx=CTX) == (
        "<｜begin▁of▁sentence｜>One.\n\nTwo.<｜User｜>Q<｜Assistant｜></think>"
    )


def test_unknown_role_and_mode_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="tool"):
        render_chat_text([Message("tool", "42")], ctx=CTX)
    with pytest.raises(UsageError, match="thinking mode"):
        render_chat_text([Message("user", "x")], think="low", ctx=CTX)  # type: ignore[arg-type]


def test_conversation_ids(tok: Tokenizer, ref: HFTokenizer) -> None:
    ids = render_chat(tok, CONVERSATION, think="none", ctx=CTX)
    assert ids == ref.encode(CONVERSATION_NOTHINK, add_special_tokens=False).ids
    assert tok.decode(ids) == CONVERSATION_NOTHINK


# -- think mode and stop -----------------------------------------------------------


def test_effective_think_mode() -> None:
    assert effective_think_mode("max", 393216) == "max"
    assert effective_think_mode("max", 393215) == "high"
    assert effective_think_mode("high", 1 << 20) == "high"
    assert effective_think_mode("none", 1 << 20) == "none"
    with pytest.raises(UsageError):
        effective_think_mode("medium", CTX)  # type: ignore[arg-type]


def test_stop_condition(tok: Tokenizer) -> None:
    stop = StopCondition.for_tokenizer(tok)
    assert stop.eos_id == 1 and stop.max_tokens == 50000
    assert stop.is_stop(1)
    assert not any(stop.is_stop(i) for i in (0, 128803, 128804, 128821, 128822, 128825))
    assert stop.token_budget(ctx=32768, n_prompt=100) == 32667
    assert stop.token_budget(ctx=1 << 20, n_prompt=100) == 50000
    assert stop.token_budget(ctx=100, n_prompt=99) == 0
    assert stop.token_budget(ctx=100, n_prompt=150) == 0
    assert StopCondition(eos_id=1, max_tokens=7).token_budget(ctx=100, n_prompt=10) == 7
