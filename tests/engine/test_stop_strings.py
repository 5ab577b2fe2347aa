"""Stop strings: generation ends at the first occurrence and the text is cut before it."""

import json

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from k2batch.engine import Engine, EngineConfig, SamplingParams
from tests.checkpoints import random_hf_model, save_hf


def test_stop_string_cuts_text(tmp_path):
    path = save_hf(random_hf_model(vocab_size=400), tmp_path)
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["[BOS]", "[EOS]"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "[BOS]", "eos_token": "[EOS]"}))

    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 7]}))
    engine = Engine.from_pretrained(str(path), EngineConfig())
    assert engine.tokenizer is not None and engine.tokenizer.eos_token_id in engine.eos_token_ids
    assert 7 in engine.eos_token_ids
    free = engine.generate(["the quick brown"], SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True))[0]
    stop = free.text[6:9]
    out = engine.generate(
        ["the quick brown"], SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True, stop=(stop,))
    )[0]
    assert out.finish_reason == "stop"
    assert out.text == free.text[: free.text.index(stop)]
    assert free.token_ids[: len(out.token_ids)] == out.token_ids
