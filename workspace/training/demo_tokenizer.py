"""The demo model's tokenizer: a small byte-level BPE trained on the demo episodes, with K2's special tokens and
the K2 Thinking chat template, written as tokenizer.json + tokenizer_config.json + chat_template.jinja."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from k2batch.tokenizer.chat import BUILTIN_TEMPLATE

# K2's special tokens in Kimi's order; here they take the ids right after the BPE vocabulary.
SPECIAL_TOKENS = [
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
_SPECIAL = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """BPE over bytes with single-digit number tokens (so numbers are copied digit by digit); `vocab_size`
    counts the special tokens, which come last."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Special-token strings are control tokens, never text the BPE should learn to spell.
    tokenizer.train_from_iterator((part for text in texts for part in _SPECIAL.split(text) if part), trainer)
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, path: str | Path) -> dict[str, int]:
    """Write the tokenizer files of a checkpoint; returns the special tokens' ids."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path / "tokenizer.json"))
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "[BOS]",
        "eos_token": "[EOS]",
        "added_tokens_decoder": {
            str(i): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for t, i in ids.items()
        },
        "model_max_length": 4096,
        "chat_template": BUILTIN_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (path / "chat_template.jinja").write_text(BUILTIN_TEMPLATE)
    return ids
