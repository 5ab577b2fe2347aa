"""Tiny K2-style tokenizer checkpoints built in the test: a Kimi tiktoken.model and an HF tokenizer.json."""

from __future__ import annotations

import base64
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from k2batch.tokenizer import Tokenizer, load_tokenizer

CORPUS = """\
The quick brown fox jumps over the lazy dog. Tool calls return results; the model reads them and thinks again.
Search the corpus for the population of Paris, then multiply it by two with the calculator.
大型语言模型会先思考，然后调用工具，读取结果，再继续思考。你好，世界！
Emoji too: 😀 👍🏽 🎉, accents: café, naïve, Zürich. Numbers: 12345, 3.14159, 2,102,650.
"""

# K2's special tokens in Kimi's order; the ids below leave gaps, as the real vocabulary does.
K2_SPECIAL = [
    "[BOS]",
    "[EOS]",
    "<|im_end|>",
    "<|im_user|>",
    "<|im_assistant|>",
    "<|im_system|>",
    "<|im_middle|>",
    "<|tool_calls_section_begin|>",
    "<|tool_calls_section_end|>",
    "<|tool_call_begin|>",
    "<|tool_call_argument_begin|>",
    "<|tool_call_end|>",
    "<think>",
    "</think>",
]
SPECIAL_BASE = 1024  # the BPE ranks end well below it: ids in between are reserved
SKIPPED_IDS = {SPECIAL_BASE + 5, SPECIAL_BASE + 9}  # unnamed ids inside the special block


def train_byte_bpe(corpus: str, merges: int) -> dict[bytes, int]:
    """Byte-level BPE ranks: the 256 bytes, then the most frequent adjacent pair, merged `merges` times."""
    ranks = {bytes([b]): b for b in range(256)}
    words = Counter(re.findall(r" ?\w+| ?[^\w\s]+|\s+", corpus))
    pieces = {word: [bytes([b]) for b in word.encode()] for word in words}
    for _ in range(merges):
        pairs: Counter[tuple[bytes, bytes]] = Counter()
        for word, count in words.items():
            seq = pieces[word]
            for pair in zip(seq, seq[1:]):
                pairs[pair] += count
        if not pairs:
            break
        (left, right), _ = max(pairs.items(), key=lambda item: (item[1], item[0]))  # ties broken by bytes
        ranks.setdefault(left + right, len(ranks))
        for word, seq in pieces.items():
            merged, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and seq[i] == left and seq[i + 1] == right:
                    merged.append(left + right)
                    i += 2
                else:
                    merged.append(seq[i])
                    i += 1
            pieces[word] = merged
    return ranks


def added_token(content: str) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def kimi_special_ids() -> dict[str, int]:
    ids = [i for i in range(SPECIAL_BASE, SPECIAL_BASE + len(K2_SPECIAL) + len(SKIPPED_IDS)) if i not in SKIPPED_IDS]
    return dict(zip(K2_SPECIAL, ids))


@pytest.fixture(scope="session")
def kimi_ranks() -> dict[bytes, int]:
    ranks = train_byte_bpe(CORPUS, 300)
    # A token across the Han/Latin boundary: Kimi's pre-tokenizer must never let BPE reach it.
    for token in ("文".encode()[:2], "文".encode(), "文E".encode()):
        ranks.setdefault(token, len(ranks))
    return ranks


@pytest.fixture(scope="session")
def kimi_dir(tmp_path_factory, kimi_ranks) -> Path:
    path = tmp_path_factory.mktemp("kimi")
    lines = [f"{base64.b64encode(token).decode()} {rank}" for token, rank in kimi_ranks.items()]
    (path / "tiktoken.model").write_text("\n".join(lines) + "\n")
    config = {
        "added_tokens_decoder": {str(i): added_token(s) for s, i in kimi_special_ids().items()},
        "bos_token": "[BOS]",
        "eos_token": {"__type": "AddedToken", "content": "[EOS]"},
        "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf")
    in_json, from_config = K2_SPECIAL[:7], K2_SPECIAL[7:]
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=in_json,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    tok.save(str(path / "tokenizer.json"))
    # The rest of K2's special tokens come only from tokenizer_config.json, after the trained vocabulary.
    ids = {s: i for i, s in enumerate(in_json)} | {s: tok.get_vocab_size() + k for k, s in enumerate(from_config)}
    config = {
        "added_tokens_decoder": {str(i): added_token(s) for s, i in ids.items()},
        "bos_token": "[BOS]",
        "eos_token": "[EOS]",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    return path


@pytest.fixture(scope="session", params=["tiktoken", "hf"])
def tokenizer(request, kimi_dir, hf_dir) -> Tokenizer:
    return load_tokenizer(str(kimi_dir if request.param == "tiktoken" else hf_dir))
