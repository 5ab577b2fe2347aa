"""Tokenizers of K2 / DeepSeek-V3 checkpoints (Kimi's tiktoken.model, HF tokenizer.json) behind one interface."""

from __future__ import annotations

import base64
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any

import fsspec
import tiktoken
import tokenizers

# Kimi's pre-tokenizer (tokenization_kimi.py): runs of Han characters are pre-tokens of their own, so the
# letter branches (o200k-style, with case-aware splits and English contractions) exclude Han by intersection.
KIMI_PATTERN = "|".join(
    [
        r"[\p{Han}]+",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)
# tiktoken's regex engine overflows its stack on long inputs and long runs of (non-)whitespace
# (a million spaces panics), so text is cut into pieces below these sizes first, as Kimi's tokenizer does.
_MAX_ENCODE_CHARS = 400_000
_MAX_RUN_CHARS = 25_000
_RUNS = re.compile(r"\s+|\S+")
# Message text is escaped before it is rendered into a chat prompt (Tokenizer.escape), so that special-token
# strings in it stay text: each becomes ESCAPE + its index + ESCAPE_END. Private-use characters never occur in a
# template, and a literal ESCAPE in the text is escaped too, so unescaping gives back exactly the original.
ESCAPE, ESCAPE_END = "\ue000", "\ue001"
_ESCAPED = re.compile(f"{ESCAPE}(\\d+){ESCAPE_END}")


def _byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each byte: how byte-level BPE vocabularies spell tokens as strings."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    alphabet, unprintable = [], 0
    for byte in range(256):
        if byte in printable:
            alphabet.append(chr(byte))
        else:
            alphabet.append(chr(256 + unprintable))
            unprintable += 1
    return alphabet


_BYTE_TO_CHAR = _byte_level_alphabet()
_CHAR_TO_BYTE = {char: byte for byte, char in enumerate(_BYTE_TO_CHAR)}


class Tokenizer(ABC):
    """Text <-> token ids for one checkpoint, with its special tokens and chat template."""

    def __init__(
        self, special_tokens: dict[str, int], vocab_size: int, config: dict[str, Any], chat_template: str | None
    ):
        self.special_tokens = special_tokens
        self.vocab_size = vocab_size
        self.chat_template = chat_template
        self._special_ids = frozenset(special_tokens.values())
        # Longest first, so a special token that is a prefix of another never wins.
        self._escapable = [ESCAPE, *sorted(special_tokens, key=len, reverse=True)]
        self._escape_index = {s: i for i, s in enumerate(self._escapable)}
        self._escape_pattern = re.compile("|".join(re.escape(s) for s in self._escapable))
        self.bos_token_id = self._config_token_id(config, "bos_token")
        self.eos_token_id = self._config_token_id(config, "eos_token")

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of plain text; special-token strings in it are ordinary text, never control tokens."""

    @abstractmethod
    def encode_chat(self, text: str) -> list[int]:
        """Token ids of rendered chat text: special-token strings become their ids, text escaped by `escape`
        becomes the ids of its original characters as ordinary text."""

    def escape(self, text: str) -> str:
        """`text` made safe to render into a chat prompt: its special-token strings stay text under encode_chat
        (a user or a tool result writing "<|im_end|>" must not end the turn)."""
        return self._escape_pattern.sub(lambda m: f"{ESCAPE}{self._escape_index[m.group()]}{ESCAPE_END}", text)

    def _encode_pieces(self, text: str) -> list[int]:
        """Special-token strings as their ids, the (unescaped) text between them as ordinary text."""
        ids: list[int] = []
        start = 0
        for match in self._escape_pattern.finditer(text):
            if match.group() == ESCAPE:
                continue  # part of an escaped string: text
            ids += self.encode(self._unescape(text[start : match.start()]))
            ids.append(self.special_tokens[match.group()])
            start = match.end()
        return ids + self.encode(self._unescape(text[start:]))

    def _unescape(self, text: str) -> str:
        return _ESCAPED.sub(lambda m: self._escapable[int(m.group(1))], text) if ESCAPE in text else text

    @abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """The id of a special token or vocabulary entry (byte-level spelling, e.g. "Ġthe"), or None."""

    @abstractmethod
    def id_to_token(self, token_id: int) -> str | None:
        """The special-token string or vocabulary entry (byte-level spelling) of an id, or None."""

    @abstractmethod
    def _decode(self, ids: list[int]) -> str: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of token ids; bytes that are not (yet) valid UTF-8 become U+FFFD instead of raising."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        return self._decode(ids)

    def _config_token_id(self, config: dict[str, Any], key: str) -> int | None:
        # tokenizer_config.json spells these as a string or as a serialized AddedToken.
        token = config.get(key)
        if isinstance(token, dict):
            token = token.get("content")
        return self.token_to_id(token) if isinstance(token, str) else None


class TiktokenTokenizer(Tokenizer):
    """Kimi's tokenizer: byte-level BPE ranks from tiktoken.model, special tokens from tokenizer_config.json."""

    def __init__(self, model_file: bytes, config: dict[str, Any], chat_template: str | None = None):
        self._ranks = _parse_tiktoken_model(model_file)
        special = {entry["content"]: int(i) for i, entry in config.get("added_tokens_decoder", {}).items()}
        first_free = len(self._ranks)
        clashes = sorted(i for i in special.values() if i < first_free)
        if clashes:
            raise ValueError(f"tokenizer_config.json gives special ids {clashes[:5]} that tiktoken.model also uses")
        # Every id below the highest must decode, so unnamed ids between the BPE ranks and the special
        # block get reserved names, as Kimi's tokenizer does.
        named = set(special.values())
        for i in range(first_free, max(named, default=first_free)):
            if i not in named:
                special[f"<|reserved_token_{i}|>"] = i
        self._encoding = tiktoken.Encoding(
            name="kimi", pat_str=KIMI_PATTERN, mergeable_ranks=self._ranks, special_tokens=special
        )
        self._special_by_id = {i: s for s, i in special.items()}
        super().__init__(special, max([first_free - 1, *special.values()]) + 1, config, chat_template)

    def encode(self, text: str) -> list[int]:
        return [i for piece in _tiktoken_pieces(text) for i in self._encoding.encode_ordinary(piece)]

    def encode_chat(self, text: str) -> list[int]:
        return self._encode_pieces(text)

    def _decode(self, ids: list[int]) -> str:
        return self._encoding.decode(ids, errors="replace")

    def token_to_id(self, token: str) -> int | None:
        if token in self.special_tokens:
            return self.special_tokens[token]
        if any(char not in _CHAR_TO_BYTE for char in token):
            return None
        return self._ranks.get(bytes(_CHAR_TO_BYTE[char] for char in token))

    def id_to_token(self, token_id: int) -> str | None:
        if token_id in self._special_by_id:
            return self._special_by_id[token_id]
        if not 0 <= token_id < self.vocab_size:
            return None
        return "".join(_BYTE_TO_CHAR[byte] for byte in self._encoding.decode_single_token_bytes(token_id))


class HFTokenizer(Tokenizer):
    """A `tokenizers` tokenizer.json; tokenizer_config.json may declare added tokens it lacks."""

    def __init__(self, tokenizer_json: str, config: dict[str, Any], chat_template: str | None = None):
        self._chat = tokenizers.Tokenizer.from_str(tokenizer_json)
        _add_config_tokens(self._chat, config)
        # A second copy that treats special-token strings as text: the flag is per tokenizer object, and
        # flipping it on a shared one would race between threads.
        self._plain = tokenizers.Tokenizer.from_str(self._chat.to_str())
        self._plain.encode_special_tokens = True
        added = self._chat.get_added_tokens_decoder()
        special = {token.content: i for i, token in added.items() if token.special}
        vocab_size = max(self._chat.get_vocab(with_added_tokens=True).values()) + 1
        super().__init__(special, vocab_size, config, chat_template)

    def encode(self, text: str) -> list[int]:
        return self._plain.encode(text, add_special_tokens=False).ids

    def encode_chat(self, text: str) -> list[int]:
        if ESCAPE in text:
            return self._encode_pieces(text)
        return self._chat.encode(text, add_special_tokens=False).ids

    def _decode(self, ids: list[int]) -> str:
        return self._chat.decode(ids, skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._chat.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._chat.id_to_token(token_id)


def load_tokenizer(path: str, storage_options: dict[str, Any] | None = None) -> Tokenizer:
    """The tokenizer of a checkpoint directory (local path or fsspec URI, `storage_options` for object stores):
    tiktoken.model or tokenizer.json.

    tiktoken.model wins when both exist: it is what Kimi ships, a tokenizer.json beside it is a conversion.
    The chat template comes from chat_template.jinja, else from tokenizer_config.json.
    """
    fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
    root = root.rstrip("/")

    def read(name: str) -> bytes | None:
        file = f"{root}/{name}"
        return fs.cat_file(file) if fs.isfile(file) else None

    config_file = read("tokenizer_config.json")
    config: dict[str, Any] = json.loads(config_file) if config_file is not None else {}
    template_file = read("chat_template.jinja")
    template = template_file.decode("utf-8") if template_file is not None else _config_template(config)
    if (model_file := read("tiktoken.model")) is not None:
        return TiktokenTokenizer(model_file, config, template)
    if (tokenizer_json := read("tokenizer.json")) is not None:
        return HFTokenizer(tokenizer_json.decode("utf-8"), config, template)
    raise FileNotFoundError(f"{path}: no tiktoken.model or tokenizer.json; a checkpoint must ship one of them")


def _parse_tiktoken_model(data: bytes) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as error:
            raise ValueError(f"tiktoken.model line {number}: expected 'BASE64 RANK', got {line[:80]!r}") from error
    if not ranks:
        raise ValueError("tiktoken.model has no tokens")
    if set(ranks.values()) != set(range(len(ranks))):
        raise ValueError(f"tiktoken.model ranks must be 0..{len(ranks) - 1}, each once; they have gaps or repeats")
    return ranks


def _tiktoken_pieces(text: str) -> Iterator[str]:
    """Cut text into pieces tiktoken can encode: bounded length, no overly long (non-)whitespace run."""
    if len(text) <= _MAX_RUN_CHARS:
        yield text
        return
    for start in range(0, len(text), _MAX_ENCODE_CHARS):
        chunk = text[start : start + _MAX_ENCODE_CHARS]
        cut = 0
        for run in _RUNS.finditer(chunk):
            for end in range(run.start() + _MAX_RUN_CHARS, run.end(), _MAX_RUN_CHARS):
                yield chunk[cut:end]
                cut = end
        yield chunk[cut:]


def _add_config_tokens(tokenizer: tokenizers.Tokenizer, config: dict[str, Any]) -> None:
    """Add tokenizer_config.json's added tokens that tokenizer.json lacks, checking every id agrees."""
    known = {token.content for token in tokenizer.get_added_tokens_decoder().values()}
    for token_id, entry in sorted(config.get("added_tokens_decoder", {}).items(), key=lambda item: int(item[0])):
        content = entry["content"]
        if content not in known:
            token = tokenizers.AddedToken(
                content,
                single_word=entry.get("single_word", False),
                lstrip=entry.get("lstrip", False),
                rstrip=entry.get("rstrip", False),
                normalized=entry.get("normalized", False),
                special=entry.get("special", True),
            )
            (tokenizer.add_special_tokens if token.special else tokenizer.add_tokens)([token])
        actual = tokenizer.token_to_id(content)
        if actual != int(token_id):
            raise ValueError(
                f"added token {content!r} has id {token_id} in tokenizer_config.json but {actual} in tokenizer.json; "
                "the two files come from different tokenizers"
            )


def _config_template(config: dict[str, Any]) -> str | None:
    template = config.get("chat_template")
    # transformers also saves several named templates as a list; the default one is the chat template.
    if isinstance(template, list):
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template
