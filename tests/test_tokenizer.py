"""The GGUF-built tokenizer against DeepSeek V4's own tokenizer.json (run by HF tokenizers)."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import gguf
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer

from ds4nb.errors import ModelError
from ds4nb.tokenizer import JOYAI_SPLIT_PATTERNS, Tokenizer, read_tokenizer_metadata
from ds4nb.vocab import VocabData, ds4_vocab, tokenizer_json_path

N_MERGES_TINY = 3000

CORPUS = [
    # English and Italian prose
    (
        "The quick brown fox jumps over the lazy dog. It's 5 o'clock; we'll see—maybe.\n"
        "Mr. O'Neil said: \"I've been told he's there, 'RE you sure?\" ... Yes!!! Really???"
    ),
    (
        "Nel mezzo del cammin di nostra vita mi ritrovai per una selva oscura, ché la diritta via era smarrita.\n"
        "L'università è chiusa perché c'è sciopero; però domani sarà aperta. Così è la vita, caffè e città."
    ),
    "Scrivi una storia su una papera scansafatiche",
    # source code
    (
        'def greet(name: str) -> str:\n    """Say hello."""\n    return f"Hello, {name}!"  # comment\n\n\n'
        "@dataclass(frozen=True)\nclass P:\n\tx: int = 0\n\ty: list[int] = field(default_factory=list)\n"
    ),
    (
        "#include <stdio.h>\n\nint main(int argc, char **argv) {\n    for (int i = 0; i < argc; i++) {\n"
        '        printf("%d: %s\\n", i, argv[i]);\n    }\n    return 0;\n}\n'
    ),
    (
        "fn main() -> Result<(), Box<dyn Error>> {\n    let v: Vec<u32> = (0..10).map(|x| x * x).collect();\n"
        '    println!("{:?}", v);\n    Ok(())\n}\n'
    ),
    (
        "const f = async (a, b) => { await fetch(`/api/${a}?b=${b}`); return a ?? b; };\n"
        "if (x !== null && y >= 0x1F) { console.log([...arr].join(', ')); }\n"
    ),
    'package main\n\nimport "fmt"\n\nfunc main() {\n\tch := make(chan int, 3)\n\tfmt.Println(<-ch)\n}\n',
    "SELECT u.id, COUNT(*) AS n FROM users u LEFT JOIN orders o ON o.uid = u.id WHERE u.age >= 18 GROUP BY 1;",
    '{"key": [1, 2.5, -3e10, true, null], "nested": {"a": "b\\u00e9"}}\n<div class="x">&amp; &lt;p&gt;</div>',
    '#!/bin/sh\nset -euo pipefail\nfor f in *.txt; do echo "$f" | tr a-z A-Z >> out.log 2>&1; done\n',
    # CJK and other scripts
    "深度求索发布了新的语言模型，它能够理解中文。我想在apple工作1314151天～",
    "日本語のテキストを処理します。カタカナもひらがなも大丈夫です。東京タワーへ行きましょう！",
    "안녕하세요 세계! 한국어 텍스트입니다.",
    "Привет, мир! Съешь же ещё этих мягких французских булок. Ελληνικά: Καλημέρα κόσμε.",
    "مرحبا بالعالم ١٢٣٤٥ — हिन्दी पाठ १२३ — ภาษาไทย — עברית",
    # emoji
    "🚀 (normal) 😶‍🌫️ (multiple emojis concatenated) ✅ 🦙🦙 👨‍👩‍👧‍👦 🇮🇹🇯🇵 👋🏽 1️⃣ ❤️",
    # whitespace runs
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n",
    "a   b\t\tc \r\n d\r e\x0b\x0cf  \n\n  g   ",
    "    int x;\n        return y;\n\t\t\tz\n",
    "non\u00a0breaking\u2003em\u3000ideographic\u200bzero width",
    # numbers
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 1,000,000.00 -0.5e-10 0xDEADBEEF",
    "x² + y³ = ½ ⅓ Ⅻ ①② ٣٤ ۱۲ 𝟙𝟚𝟛",
    # special-token strings
    (
        "<｜begin▁of▁sentence｜>You are a helpful assistant<｜User｜>Ciao<｜Assistant｜><think>hmm</think>ok"
        "<｜end▁of▁sentence｜>"
    ),
    "｜DSML｜ <dsml:x> </dsml:y> <｜fim▁hole｜><|EOT|><｜place▁holder▁no▁5｜><｜/table>｜<｜tool▁sep｜>",
    "<｜User <think <｜User｜｜DSML <|EOT| almost-special <｜▁pad▁｜>",
    # punctuation and symbols
    "!!!???......------=======''''''```````\"\"\"\"  “quoted” ‘single’ «guillemets» — – … • © ™ € £ ¥",
    "https://example.com/path?q=1&r=two#frag user@example.org C:\\Users\\me ~/.config/ds4",
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL",
    # odd characters
    "e\u0301 n\u0303 \ufeffBOM \ue000 private \x00\x01\x1f\x7f controls \ufffd",
    "",
    " ",
]

FRAGMENTS = [
    " ",
    "  ",
    "\n",
    "\r\n",
    "\t",
    "\n\n",
    "a",
    "abc",
    "The",
    "é",
    "ñ",
    "1",
    "12",
    "12345",
    "你好",
    "の",
    "ア",
    "😀",
    "'s",
    "’",
    ".",
    "...",
    "(",
    ")",
    "{",
    "<",
    ">",
    "—",
    "#",
    "::",
    "->",
    "\u00a0",
    "²",
    "١",
    "<｜User｜>",
    "<think>",
    "</think>",
    "｜DSML｜",
    "<｜end▁of▁sentence｜>",
    "<｜",
    "｜>",
    "_",
    "$",
    "\\",
    '"',
    "Ω",
    "ß",
]

text_strategy = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200)
soup_strategy = st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join)
fast = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def write_tokenizer_gguf(path: Path, vocab: VocabData) -> Path:
    writer = gguf.GGUFWriter(str(path), arch="deepseek4")
    vocab.write_to(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def ref() -> HFTokenizer:
    return HFTokenizer.from_file(str(tokenizer_json_path()))


@pytest.fixture(scope="module")
def full_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tokenizer_gguf(tmp_path_factory.mktemp("vocab") / "ds4-tokenizer.gguf", ds4_vocab())


@pytest.fixture(scope="module")
def full_meta(full_gguf: Path) -> dict:
    # Reading the 129280-entry table with GGUFReader takes seconds: do it once.
    return read_tokenizer_metadata(full_gguf)


@pytest.fixture(scope="module")
def tok(full_meta: dict) -> Tokenizer:
    return Tokenizer.from_metadata(full_meta)


@pytest.fixture(scope="module")
def tiny_vocab() -> VocabData:
    return ds4_vocab(N_MERGES_TINY)


@pytest.fixture(scope="module")
def tiny_gguf(tiny_vocab: VocabData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tokenizer_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", tiny_vocab)


@pytest.fixture(scope="module")
def tiny(tiny_gguf: Path) -> Tokenizer:
    return Tokenizer.from_gguf(tiny_gguf)


def ref_ids(ref: HFTokenizer, text: str) -> list[int]:
    return ref.encode(text, add_special_tokens=False).ids


# -- the GGUF tables ---------------------------------------------------------------


def test_gguf_file_holds_the_real_tokenizer_tables(full_meta: dict) -> None:
    value = full_meta
    assert value["tokenizer.ggml.model"] == "gpt2"
    assert value["tokenizer.ggml.pre"] == "joyai-llm"
    assert len(value["tokenizer.ggml.tokens"]) == 129280
    assert len(value["tokenizer.ggml.merges"]) == 127741
    assert Counter(value["tokenizer.ggml.token_type"]) == {1: 127997, 3: 1277, 4: 6}
    assert value["tokenizer.ggml.bos_token_id"] == 0
    assert value["tokenizer.ggml.eos_token_id"] == 1
    assert value["tokenizer.ggml.padding_token_id"] == 1
    assert value["tokenizer.ggml.add_bos_token"] is False
    assert value["tokenizer.ggml.add_eos_token"] is False
    tokens = value["tokenizer.ggml.tokens"]
    user_defined = {tokens[i] for i, t in enumerate(value["tokenizer.ggml.token_type"]) if t == 4}
    assert user_defined == {"<think>", "</think>", "｜DSML｜", "<dsml:", "</dsml:", "<｜/table>｜"}


def test_token_table_matches_tokenizer_json(ref: HFTokenizer) -> None:
    vocab = ds4_vocab()
    assert [ref.id_to_token(i) for i in range(ref.get_vocab_size())] == vocab.tokens
    data = json.loads(tokenizer_json_path().read_text(encoding="utf-8"))
    assert vocab.merges == data["model"]["merges"]


def test_pre_tokenizer_is_the_one_deepseek_ships(ref: HFTokenizer, tok: Tokenizer) -> None:
    ours = json.loads(tok._ordinary.to_str())["pre_tokenizer"]
    theirs = json.loads(ref.to_str())["pre_tokenizer"]
    assert ours == theirs
    assert [p["pattern"]["Regex"] for p in theirs["pretokenizers"][:3]] == list(JOYAI_SPLIT_PATTERNS)


def test_special_ids(tok: Tokenizer, ref: HFTokenizer) -> None:
    assert tok.n_vocab == 129280
    assert (tok.bos_id, tok.eos_id, tok.user_id, tok.assistant_id) == (0, 1, 128803, 128804)
    assert (tok.think_start_id, tok.think_end_id, tok.dsml_id) == (128821, 128822, 128825)
    for text, token_id in tok.special_ids.items():
        assert ref.token_to_id(text) == token_id


# -- encoding and decoding ---------------------------------------------------------


@pytest.mark.parametrize("text", CORPUS)
def test_corpus_matches_reference(tok: Tokenizer, ref: HFTokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert ids == ref_ids(ref, text)
    assert tok.decode(ids) == text
    assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=False)


def test_whole_corpus_as_one_document(tok: Tokenizer, ref: HFTokenizer) -> None:
    document = "\n\n".join(CORPUS) * 3
    assert tok.encode(document) == ref_ids(ref, document)


@fast
@given(text_strategy)
def test_random_unicode_matches_reference(tok: Tokenizer, ref: HFTokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert ids == ref_ids(ref, text)
    assert tok.decode(ids) == text


@fast
@given(soup_strategy)
def test_fragment_soup_matches_reference(tok: Tokenizer, ref: HFTokenizer, text: str) -> None:
    assert tok.encode(text) == ref_ids(ref, text)


@fast
@given(st.lists(st.integers(0, 129279), max_size=30))
def test_decode_of_any_ids_matches_reference(tok: Tokenizer, ref: HFTokenizer, ids: list[int]) -> None:
    assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=False)


def test_encode_ordinary_does_not_recognise_special_tokens(tok: Tokenizer) -> None:
    text = "<｜User｜>hi<think>"
    assert tok.encode(text)[0] == tok.user_id
    ordinary = tok.encode_ordinary(text)
    assert tok.user_id not in ordinary and tok.think_start_id not in ordinary
    assert len(ordinary) > 3
    assert tok.decode(ordinary) == text
    assert tok.encode_ordinary("hello world") == tok.encode("hello world")


def test_decode_rejects_ids_outside_the_vocabulary(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="129280"):
        tok.decode([5, 129280])
    with pytest.raises(ValueError, match="-1"):
        tok.decode([-1])


def test_encode_speed_at_least_one_megabyte_per_second(tok: Tokenizer) -> None:
    chunk = "\n\n".join(CORPUS[:16]) + "\n"
    document = chunk * (300_000 // len(chunk.encode()) + 1)
    size = len(document.encode())
    best = min(_timed(tok.encode, document) for _ in range(3))
    assert size / best >= 1e6, f"encode ran at {size / best / 1e6:.2f} MB/s"


def _timed(fn: Callable[[str], object], arg: str) -> float:
    start = time.perf_counter()
    fn(arg)
    return time.perf_counter() - start


# -- streaming detokenizer -------------------------------------------------------


def stream_pieces(tok: Tokenizer, ids: list[int]) -> list[str]:
    stream = tok.stream()
    pieces = [stream.push(i) for i in ids]
    pieces.append(stream.flush())
    return pieces


@pytest.mark.parametrize("text", ["🦙 llama", "👨‍👩‍👧‍👦 famiglia", "龘靐齉 𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "ꙮ!"])
def test_stream_holds_back_split_characters(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    pieces = stream_pieces(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert "" in pieces[:-1], "this text should put one character across several tokens"
    emitted = ""
    for n, piece in enumerate(pieces[:-1], start=1):
        assert "\ufffd" not in piece
        emitted += piece
        pending = b"".join(tok.token_bytes(i) for i in ids[:n])
        assert emitted.encode() == pending[: len(emitted.encode())]
        assert len(pending) - len(emitted.encode()) <= 3


@pytest.mark.parametrize("text", CORPUS)
def test_stream_reproduces_decode_on_corpus(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    pieces = stream_pieces(tok, ids)
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces) or "\ufffd" in text


@fast
@given(st.lists(st.integers(3, 258), max_size=40))
def test_stream_equals_decode_on_arbitrary_bytes(tok: Tokenizer, ids: list[int]) -> None:
    # ids 3..258 are the 256 single-byte tokens: any byte string, valid UTF-8 or not
    assert "".join(stream_pieces(tok, ids)) == tok.decode(ids)


def test_stream_flush_resets(tok: Tokenizer) -> None:
    stream = tok.stream()
    first = tok.encode("🦙")[0]
    assert stream.push(first) == ""
    assert stream.flush() == "\ufffd"
    assert stream.push(tok.encode("ok")[0]) == "ok"


# -- truncated vocabulary --------------------------------------------------------


def test_gguf_value_types(tiny_gguf: Path) -> None:
    t = gguf.GGUFValueType
    fields = gguf.GGUFReader(tiny_gguf).fields
    expected = {
        "tokenizer.ggml.model": [t.STRING],
        "tokenizer.ggml.pre": [t.STRING],
        "tokenizer.ggml.tokens": [t.ARRAY, t.STRING],
        "tokenizer.ggml.token_type": [t.ARRAY, t.INT32],
        "tokenizer.ggml.merges": [t.ARRAY, t.STRING],
        "tokenizer.ggml.bos_token_id": [t.UINT32],
        "tokenizer.ggml.eos_token_id": [t.UINT32],
        "tokenizer.ggml.padding_token_id": [t.UINT32],
        "tokenizer.ggml.add_bos_token": [t.BOOL],
        "tokenizer.ggml.add_eos_token": [t.BOOL],
    }
    assert {k: f.types for k, f in fields.items() if k.startswith("tokenizer.")} == expected


def test_tiny_vocab_layout(tiny_vocab: VocabData) -> None:
    assert len(tiny_vocab.tokens) == 3 + 256 + N_MERGES_TINY + 1280
    assert len(tiny_vocab.merges) == N_MERGES_TINY
    assert tiny_vocab.tokens[:3] == ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"]
    assert (tiny_vocab.bos_id, tiny_vocab.eos_id, tiny_vocab.pad_id) == (0, 1, 1)


def test_tiny_vocab_special_tokens_found_by_text(tiny: Tokenizer, tiny_vocab: VocabData) -> None:
    assert tiny.n_vocab == len(tiny_vocab.tokens)
    for text, token_id in tiny.special_ids.items():
        assert tiny_vocab.tokens[token_id] == text
    assert tiny.user_id == tiny_vocab.tokens.index("<｜User｜>") != 128803
    assert tiny.encode("<｜User｜>") == [tiny.user_id]


@pytest.mark.parametrize("text", CORPUS)
def test_tiny_vocab_round_trip(tiny: Tokenizer, text: str) -> None:
    ids = tiny.encode(text)
    assert all(0 <= i < tiny.n_vocab for i in ids)
    assert tiny.decode(ids) == text
    assert "".join(stream_pieces(tiny, ids)) == text


def test_tiny_vocab_matches_a_truncated_reference() -> None:
    data = json.loads(tokenizer_json_path().read_text(encoding="utf-8"))
    n_base = 3 + 256
    data["model"]["merges"] = data["model"]["merges"][:N_MERGES_TINY]
    data["model"]["vocab"] = {t: i for t, i in data["model"]["vocab"].items() if i < n_base + N_MERGES_TINY}
    data["added_tokens"] = []
    reference = HFTokenizer.from_str(json.dumps(data))
    tiny = Tokenizer.from_metadata(ds4_vocab(N_MERGES_TINY).metadata())
    for text in CORPUS:
        ours = [tiny.token_text(i) for i in tiny.encode_ordinary(text)]
        assert ours == reference.encode(text, add_special_tokens=False).tokens


def test_vocab_rejects_bad_merge_count() -> None:
    with pytest.raises(ValueError, match="n_merges"):
        ds4_vocab(127742)
    with pytest.raises(ValueError, match="n_merges"):
        ds4_vocab(-1)


# -- loading from other sources and bad input -------------------------------------


def test_from_gguf_accepts_an_object_with_metadata(tiny_vocab: VocabData) -> None:
    model = SimpleNamespace(metadata=tiny_vocab.metadata())
    tok = Tokenizer.from_gguf(model)
    assert tok.encode("hello <think>") == Tokenizer.from_metadata(tiny_vocab.metadata()).encode("hello <think>")
    with pytest.raises(TypeError):
        Tokenizer.from_gguf(42)


def test_gguf_without_token_table_is_a_model_error(tmp_path: Path, tiny_vocab: VocabData) -> None:
    path = tmp_path / "no-tokens.gguf"
    writer = gguf.GGUFWriter(str(path), arch="deepseek4")
    for key, (value, vtype, sub_type) in tiny_vocab.gguf_metadata().items():
        if key != "tokenizer.ggml.tokens":
            writer.add_key_value(key, value, vtype, sub_type=sub_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelError, match=r"^GGUF key tokenizer\.ggml\.tokens is missing: expected an array"):
        Tokenizer.from_gguf(path)


def test_unreadable_file_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="cannot read GGUF file"):
        Tokenizer.from_gguf(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelError, match="cannot read GGUF file"):
        Tokenizer.from_gguf(junk)


def _without(meta: dict, key: str) -> dict:
    return {k: v for k, v in meta.items() if k != key}


def _replace(meta: dict, key: str, value: object) -> dict:
    return {**meta, key: value}


BAD_METADATA = [
    (lambda m: _without(m, "tokenizer.ggml.merges"), r"tokenizer\.ggml\.merges is missing"),
    (lambda m: _without(m, "tokenizer.ggml.token_type"), r"tokenizer\.ggml\.token_type is missing"),
    (lambda m: _without(m, "tokenizer.ggml.model"), r"tokenizer\.ggml\.model is missing"),
    (lambda m: _replace(m, "tokenizer.ggml.model", "llama"), r"tokenizer\.ggml\.model is 'llama': expected 'gpt2'"),
    (lambda m: _replace(m, "tokenizer.ggml.pre", "qwen2"), r"tokenizer\.ggml\.pre is 'qwen2': expected"),
    (lambda m: _replace(m, "tokenizer.ggml.tokens", "abc"), r"tokenizer\.ggml\.tokens is str"),
    (lambda m: _replace(m, "tokenizer.ggml.tokens", []), r"tokenizer\.ggml\.tokens is empty"),
    (
        lambda m: _replace(m, "tokenizer.ggml.token_type", m["tokenizer.ggml.token_type"][:-1]),
        r"tokenizer\.ggml\.token_type has \d+ entries: expected one per token",
    ),
    (
        lambda m: _replace(
            m, "tokenizer.ggml.tokens", [t.replace("<think>", "<thonk>") for t in m["tokenizer.ggml.tokens"]]
        ),
        r"tokenizer\.ggml\.tokens lacks the required token '<think>'",
    ),
    (
        lambda m: _replace(m, "tokenizer.ggml.tokens", m["tokenizer.ggml.tokens"][:-1] + ["!"]),
        r"tokenizer\.ggml\.tokens has duplicate entries",
    ),
    (lambda m: _replace(m, "tokenizer.ggml.merges", ["Ġt"]), r"tokenizer\.ggml\.merges entry 0 is 'Ġt'"),
    (lambda m: _replace(m, "tokenizer.ggml.merges", ["Ġ zzzz"]), r"merges entry 0 is 'Ġ zzzz': expected both parts"),
]


@pytest.mark.parametrize(("mutate", "message"), BAD_METADATA)
def test_bad_metadata_is_a_one_line_model_error(
    tiny_vocab: VocabData, mutate: Callable[[dict], dict], message: str
) -> None:
    with pytest.raises(ModelError, match=message) as info:
        Tokenizer.from_metadata(mutate(tiny_vocab.metadata()))
    assert "\n" not in str(info.value)
