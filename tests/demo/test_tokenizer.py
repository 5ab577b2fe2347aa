"""The demo tokenizer: K2's special tokens as single ids, lossless round trips, the K2 Thinking template."""

from __future__ import annotations

import pytest
from demo_tokenizer import SPECIAL_TOKENS, save_tokenizer, train_tokenizer

from k2batch.tokenizer import load_tokenizer, parse_assistant
from k2batch.tokenizer.chat import BUILTIN_TEMPLATE


@pytest.fixture(scope="module")
def checkpoint_tokenizer(episodes, tmp_path_factory):
    path = tmp_path_factory.mktemp("demo-tokenizer")
    trained = train_tokenizer((text for pieces in episodes for text, _ in pieces), vocab_size=400)
    ids = save_tokenizer(trained, path)
    return load_tokenizer(str(path)), ids


def test_special_tokens_are_single_ids_after_the_bpe_vocabulary(checkpoint_tokenizer):
    tokenizer, ids = checkpoint_tokenizer
    assert list(ids) == SPECIAL_TOKENS
    assert sorted(ids.values()) == list(range(400 - len(SPECIAL_TOKENS), 400))
    assert tokenizer.vocab_size == 400
    for token, token_id in ids.items():
        assert tokenizer.encode_chat(token) == [token_id]
        assert tokenizer.special_tokens[token] == token_id
        assert len(tokenizer.encode(token)) > 1  # as plain text it is spelled out, never a control token
    assert tokenizer.eos_token_id == ids["[EOS]"] and tokenizer.bos_token_id == ids["[BOS]"]


def test_episodes_round_trip_and_parse(checkpoint_tokenizer, episodes):
    tokenizer, _ = checkpoint_tokenizer
    assert tokenizer.chat_template == BUILTIN_TEMPLATE
    for pieces in episodes[:6]:
        for text, generated in pieces:
            ids = tokenizer.encode_chat(text)
            assert tokenizer.decode(ids) == text
            if generated:
                parsed = parse_assistant(tokenizer.decode(ids))
                assert parsed.reasoning and not parsed.errors
    unseen = "Zzyx Qorb founded 1987; café 🎉"  # bytes the data never had still round-trip
    assert tokenizer.decode(tokenizer.encode(unseen)) == unseen
    assert tokenizer.encode("12345") == [tokenizer.token_to_id(d) for d in "12345"]  # digits one by one
