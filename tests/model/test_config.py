"""config.json parsing: values given are kept, defaults fill only what is absent."""

import pytest

from k2batch.model.config import ModelConfig, RopeConfig
from tests.checkpoints import BASE_CONFIG, YARN


def _rope(params: dict) -> RopeConfig:
    return ModelConfig.from_dict({**BASE_CONFIG, "model_type": "deepseek_v3", "rope_parameters": params}).rope


def test_yarn_betas_default_only_when_absent_or_null():
    absent = {k: v for k, v in YARN.items() if not k.startswith("beta")}
    for params in (absent, {**YARN, "beta_fast": None, "beta_slow": None}):
        assert (_rope(params).beta_fast, _rope(params).beta_slow) == (32.0, 1.0)
    given = _rope({**YARN, "beta_fast": 16, "beta_slow": 0.5})
    assert (given.beta_fast, given.beta_slow) == (16.0, 0.5)


@pytest.mark.parametrize("key", ["beta_fast", "beta_slow"])
def test_zero_yarn_beta_is_an_error_not_replaced_by_the_default(key):
    with pytest.raises(ValueError, match=f"rope {key} is 0; it counts rotations and must be positive"):
        _rope({**YARN, key: 0})


def test_fp8_block_size_is_read_from_config():
    quant = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [64, 32]}
    raw = {**BASE_CONFIG, "model_type": "kimi_k2", "quantization_config": quant}
    assert ModelConfig.from_dict(raw).quantization.block_size == (64, 32)
