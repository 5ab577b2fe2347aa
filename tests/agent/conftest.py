"""A tiny random K2 checkpoint with a Kimi tokenizer (built-in K2 Thinking template), and a scripted engine."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import torch

from k2batch.engine import Engine, EngineConfig
from k2batch.model.config import ModelConfig
from k2batch.model.export import random_model, save_checkpoint
from tests.tokenizer.conftest import CORPUS, added_token, kimi_special_ids, train_byte_bpe

SPECIAL = kimi_special_ids()


@pytest.fixture(scope="session")
def k2_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("k2-agent")
    config = ModelConfig.from_dict(
        dict(
            model_type="kimi_k2",
            vocab_size=1088,
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            q_lora_rank=32,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=16,
            v_head_dim=16,
            n_routed_experts=4,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=1,
            routed_scaling_factor=2.827,
            max_position_embeddings=4096,
            eos_token_id=SPECIAL["[EOS]"],
            rope_theta=50000.0,
        )
    )
    save_checkpoint(random_model(config, seed=0), path, int4_experts=False)
    ranks = train_byte_bpe(CORPUS, 200)
    lines = [f"{base64.b64encode(token).decode()} {rank}" for token, rank in ranks.items()]
    (path / "tiktoken.model").write_text("\n".join(lines) + "\n")
    tokenizer_config = {
        "added_tokens_decoder": {str(i): added_token(s) for s, i in SPECIAL.items()},
        "bos_token": "[BOS]",
        "eos_token": "[EOS]",
    }  # no chat_template: the built-in K2 Thinking format renders
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return path


def script_steps(engine: Engine, scripts: dict[str, list[int]]) -> None:
    """Make every request whose id ("JOB:STEP") ends with a key of `scripts` emit that key's ids, then decode
    freely: a test-only policy that forces known tool-call sections and answers out of a random model while the
    real engine runs every token. Keys: ":1" (step 1 of every job) or "job:1" (one job's step)."""
    compute_logits = engine.runner.compute_logits

    def scripted(plan):
        logits = compute_logits(plan).clone()
        for k, (row, done) in enumerate(zip(plan.sample_rows.tolist(), plan.sample_index.tolist())):
            request_id = plan.request_ids[row]
            script = next((ids for key, ids in scripts.items() if request_id.endswith(key)), None)
            if script is not None and done < len(script):
                logits[k] = torch.full_like(logits[k], -1e9)
                logits[k, script[done]] = 0.0
        return logits

    engine.runner.compute_logits = scripted


def script_first_step(engine: Engine, script: list[int], steps: tuple[int, ...] = (0,)) -> None:
    """Make every request of the given steps (step 0 by default) emit `script`, then decode freely."""
    script_steps(engine, {f":{step}": script for step in steps})


def engine_for(path: Path, **overrides) -> Engine:
    return Engine.from_pretrained(str(path), EngineConfig(**{"max_num_seqs": 8, "num_kv_blocks": 512, **overrides}))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny model's ops are too small to split: extra threads only contend for the box's two cores (~10x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
