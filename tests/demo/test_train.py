"""Training steps of a tiny demo model: Muon, QK-clip, expert-bias balancing, INT4 QAT, and the export round trip."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import train_demo
from one_thread_arithmetic import OneThreadArithmetic
from train_demo import (
    ExpertLoad,
    TrainableExperts,
    TrainingAttention,
    batches,
    collate,
    demo_model_config,
    export,
    fake_quant_int4,
    loss_on_generated,
    optimizers,
    qk_clip,
    shared_prefix,
    token_multiplicity,
    train_model,
    train_step,
    trainable_model,
)

from k2batch.kernels.int4_moe import pack_int4, quantize_int4, unpack_int4
from k2batch.model import load_model
from k2batch.model.config import ModelConfig

TINY = ModelConfig.from_dict(
    dict(
        model_type="kimi_k2",
        vocab_size=64,
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
        max_position_embeddings=256,
        rope_theta=50000.0,
        eos_token_id=1,
    )
)


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TINY.vocab_size, (3, 24), generator=g)
    target = torch.zeros_like(ids, dtype=torch.bool)
    target[:, 12:] = True
    return ids, target


def experts(model):
    return [m for m in model.modules() if isinstance(m, TrainableExperts)]


def test_muon_takes_the_hidden_matrices_and_training_lowers_the_loss():
    model = trainable_model(TINY, seed=0)
    muon, adamw = optimizers(model, lr=3e-3, weight_decay=0.0)
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in in_muon}
    assert "layers.1.mlp.experts.gate_up.0" in names and "layers.0.self_attn.kv_b_proj.weight" in names
    assert not any(n.startswith(("embed_tokens", "lm_head")) or "norm" in n or ".gate." in n for n in names)
    ids, target = batch()
    losses = []
    for _ in range(12):
        loss, _, _ = loss_on_generated(model, ids, target)
        for opt in (muon, adamw):
            opt.zero_grad()
        loss.backward()
        for opt in (muon, adamw):
            opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_qk_clip_rescales_heads_over_the_threshold_to_it():
    model = trainable_model(TINY, seed=0)
    ids, target = batch()
    _, attention, _ = loss_on_generated(model, ids, target)
    before = {layer: m.clone() for layer, m in attention.max_logits.items()}
    threshold = float(min(m.min() for m in before.values())) * 0.5
    clipped = qk_clip(model, attention.max_logits, threshold)
    assert clipped == TINY.num_hidden_layers * TINY.num_attention_heads
    with torch.no_grad():
        _, after, _ = loss_on_generated(model, ids, target)
    # The first layer sees the same inputs, so its heads now peak exactly at the threshold (later layers' inputs
    # changed with it).
    assert torch.allclose(after.max_logits[0], torch.full_like(after.max_logits[0], threshold), rtol=1e-4)


def test_bias_update_moves_routing_toward_balance():
    model = trainable_model(TINY, seed=0)
    router = model.layers[1].mlp.gate
    router.e_score_correction_bias[0] = 1.0  # expert 0 is chosen for every token
    load = ExpertLoad(model)
    ids, _ = batch()
    model.score(ids)
    counts = load.counts[0].clone()
    assert counts.sum() == ids.numel() * TINY.num_experts_per_tok
    first = load.update_bias(0.05)
    bias = router.e_score_correction_bias
    assert bias[0] == 0.95 and bias[counts.argmin()] == 0.05  # the busy expert loses, idle ones gain
    for _ in range(30):
        model.score(ids)
        last = load.update_bias(0.05)
    assert first == 2.0 and last < 1.5


def test_qat_fake_quant_is_the_int4_checkpoint_values_with_straight_through_gradient():
    w = torch.randn(2, 8, 64, requires_grad=True)
    fq = fake_quant_int4(w)
    q, scale = quantize_int4(w.detach())
    assert torch.equal(fq.detach(), unpack_int4(pack_int4(q), scale, torch.float32))
    fq.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_export_then_load_round_trip_int4_and_bf16(tmp_path):
    model = trainable_model(TINY, seed=1)
    for m in experts(model):
        m.fake_quant = True
    ids, target = batch()
    loss, _, _ = loss_on_generated(model, ids, target)
    loss.backward()  # the QAT path trains: gradients reach the float master weights
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for m in experts(model) for p in m.gate_up)
    model.layers[1].mlp.gate.e_score_correction_bias += torch.arange(4.0) / 10
    export(model, TINY, tmp_path / "int4", int4_experts=True)
    export(model, TINY, tmp_path / "bf16", int4_experts=False)
    raw = json.loads((tmp_path / "int4" / "config.json").read_text())
    assert raw["model_type"] == "kimi_k2" and raw["quantization_config"]["format"] == "pack-quantized"
    assert raw["torch_dtype"] == "bfloat16"
    int4 = load_model(tmp_path / "int4")
    bf16 = load_model(tmp_path / "bf16")
    loaded = int4.layers[1].mlp.experts
    assert loaded.quantized and loaded.w13_scale.dtype == torch.bfloat16
    w13 = torch.stack(list(experts(model)[0].gate_up)).detach()
    assert torch.equal(loaded.weights()[0].dequantize(torch.float32), fake_quant_int4(w13))
    assert torch.equal(bf16.layers[1].mlp.experts.w13, w13.to(torch.bfloat16).float())
    assert torch.equal(
        int4.layers[1].mlp.gate.e_score_correction_bias, model.layers[1].mlp.gate.e_score_correction_bias
    )
    assert int4.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    # The loaded INT4 model computes what the QAT model computes, up to bf16 rounding of the other weights.
    assert torch.allclose(int4.score(ids), model.score(ids), atol=0.1)


@pytest.mark.parametrize("threshold", [1e9])
def test_qk_clip_leaves_heads_under_the_threshold_alone(threshold):
    model = trainable_model(TINY, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids, target = batch()
    _, attention, _ = loss_on_generated(model, ids, target)
    assert qk_clip(model, attention.max_logits, threshold) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def prefixed_batch(prefix: int = 10):
    """Three sequences of 24 tokens whose first `prefix` are the same, trained from token 12 on."""
    ids, target = batch(seed=1)
    ids[:, :prefix] = ids[0, :prefix]
    return ids, target


def test_shared_prefix_is_the_common_start_cut_before_the_first_trained_token():
    examples = [
        ([5, 6, 7, 8, 9], [False, False, False, True, True]),
        ([5, 6, 7, 8, 1, 2], [False, False, False, False, True, True]),
        ([5, 6, 3], [False, False, True]),
    ]
    assert shared_prefix(examples, [0, 1]) == 2  # common start 4, but token 3 of episode 0 is trained
    assert shared_prefix(examples, [1, 1]) == 3  # identical episodes: short of the token that predicts a target
    assert shared_prefix(examples, [0, 2]) == 1
    assert shared_prefix(examples, [1]) == 0  # nothing to share
    ids, target = prefixed_batch()
    rows = [(ids[i].tolist(), target[i].tolist()) for i in range(3)]
    assert shared_prefix(rows, [0, 1, 2]) == 10


def test_shared_prefix_training_step_equals_the_full_batch():
    """Loss, every gradient, the logits QK-clip reads and the expert load are those of the full batch."""
    ids, target = prefixed_batch()
    results = []
    for prefix in (0, 10):
        model = trainable_model(TINY, seed=0)
        load = ExpertLoad(model)
        load.multiplicity = token_multiplicity(prefix, *ids.shape) if prefix else None
        loss, attention, accuracy = loss_on_generated(model, ids, target, prefix)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((loss.item(), accuracy, grads, attention.max_logits, [c.clone() for c in load.counts]))
    (loss0, acc0, grads0, logits0, counts0), (loss1, acc1, grads1, logits1, counts1) = results
    assert loss1 == pytest.approx(loss0, rel=1e-5) and acc1 == acc0
    assert grads1.keys() == grads0.keys() and len(grads0) > 10
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-4, atol=1e-6, msg=name)
    for layer in logits0:
        torch.testing.assert_close(logits1[layer], logits0[layer])
    for c1, c0 in zip(counts1, counts0, strict=True):
        assert torch.equal(c1, c0) and c0.sum() == ids.numel() * TINY.num_experts_per_tok


def test_loss_refuses_a_prefix_the_rows_do_not_share_or_that_holds_a_target():
    model = trainable_model(TINY, seed=0)
    ids, target = prefixed_batch()
    with pytest.raises(ValueError, match="shared, untrained prefix"):
        loss_on_generated(model, ids, target, prefix=11)  # token 10 differs between rows
    target[:, 5] = True
    with pytest.raises(ValueError, match="shared, untrained prefix"):
        loss_on_generated(model, ids, target, prefix=10)


def test_training_loop_with_a_shared_prefix_trains_and_exports_as_the_whole_prompt_loop_does(tmp_path):
    """train_model end to end (Muon steps, QK-clip, bias balancing, a QAT step, export) on episodes that start with
    the same 40 tokens: sharing that prefix changes the losses and expert biases by float rounding only."""
    g = torch.Generator().manual_seed(0)
    head = torch.randint(10, 1000, (40,), generator=g).tolist()
    examples = []
    for n in range(24):
        tail = torch.randint(10, 1000, (20 + n % 5,), generator=g).tolist()
        examples.append((head + tail, [False] * (40 + 8) + [True] * (len(tail) - 8)))
    special = {"<|im_end|>": 1, "[BOS]": 2, "[EOS]": 3}
    runs = {}
    for share in (False, True):
        out = tmp_path / f"share-{share}"
        summary = train_model(examples, special, out, steps=3, qat_steps=1, tokens_per_batch=256, share_prefix=share)
        bias = torch.stack(
            [m.e_score_correction_bias for m in summary["model"].modules() if hasattr(m, "e_score_correction_bias")]
        )
        runs[share] = (summary, bias)
        assert (out / "config.json").exists() and summary["share_prefix"] is share
    (full, bias_full), (shared, bias_shared) = runs[False], runs[True]
    # Same weights, same first batch: the prefix run once gives the whole-prompt loss up to float summation order.
    assert shared["losses"][0] == pytest.approx(full["losses"][0], rel=1e-5)
    # After that, torch.optim.Muon orthogonalizes in bfloat16, which rounds some update entries of the two runs
    # differently (how much depends on the CPU's matmul kernels; up to 4e-4 seen)...
    assert len(full["losses"]) == 4 and shared["losses"][1:3] == pytest.approx(full["losses"][1:3], rel=2e-3)
    # ...and the QAT step's INT4 rounding moves a weight that sits near a level boundary to the next level (4e-3 seen).
    assert shared["losses"][3] == pytest.approx(full["losses"][3], rel=2e-2)
    # Float summation order differs (prefix once vs per row), and Muon carries that on; an expert whose load sits
    # at the mean can then move its bias the other way, one update (1e-3) at a time (3 of the 24 biases, with the
    # fused attention kernel's order). Nothing more may differ.
    assert bias_full.abs().sum() > 0
    assert (bias_shared - bias_full).abs().max() <= 2e-3 + 1e-9
    assert (bias_shared == bias_full).float().mean() >= 0.75


def test_training_goes_on_from_a_checkpoint_with_its_weights_and_router_biases(tmp_path):
    """train_model(init=...) (`train_demo.py --init`): a second stage starts from the first one's exported
    bf16 weights and expert biases, not from a fresh initialization, and refuses a checkpoint of another shape."""
    g = torch.Generator().manual_seed(1)
    examples = []
    for n in range(16):
        seq = torch.randint(10, 1000, (30 + n % 4,), generator=g).tolist()
        examples.append((seq, [False] * 10 + [True] * (len(seq) - 10)))
    special = {"<|im_end|>": 1, "[BOS]": 2, "[EOS]": 3}
    first = train_model(examples, special, tmp_path / "first", steps=6, qat_steps=0, tokens_per_batch=128, lr=1e-2)
    export(first["model"], first["config"], tmp_path / "first-bf16", int4_experts=False)

    second = train_model(
        examples, special, tmp_path / "second", steps=1, qat_steps=0, tokens_per_batch=128, init=tmp_path / "first-bf16"
    )
    # The same seed gives the same first batch: a fresh start would repeat the first run's first loss.
    loaded = load_model(tmp_path / "first-bf16", torch.float32)
    ids, target = collate(examples, next(batches(examples, 128, random.Random(0))))
    with torch.no_grad():
        hidden = loaded(
            ids.reshape(-1), torch.arange(ids.shape[1]).repeat(ids.shape[0]), TrainingAttention(*ids.shape)
        ).view(*ids.shape, -1)
        logits = loaded.lm_head(hidden[:, :-1][target[:, 1:]])
        expected = float(torch.nn.functional.cross_entropy(logits, ids[:, 1:][target[:, 1:]]))
    assert second["losses"][0] == pytest.approx(expected, rel=1e-4)
    assert second["losses"][0] < 0.8 * first["losses"][0]
    assert second["init"] == str(tmp_path / "first-bf16")
    biases = [m.e_score_correction_bias for m in loaded.modules() if hasattr(m, "e_score_correction_bias")]
    assert any(b.abs().sum() > 0 for b in biases)  # the first run's balancing, carried over

    other = demo_model_config(512, 1, 2)
    export(trainable_model(other, 0), other, tmp_path / "other", int4_experts=False)
    with pytest.raises(ValueError, match="not a demo model of this architecture"):
        train_model(examples, special, tmp_path / "third", steps=1, qat_steps=0, init=tmp_path / "other")


def test_train_demo_command_goes_on_from_a_checkpoint_and_records_both_runs(tmp_path):
    """`train_demo.py --init`: the second run keeps the first checkpoint's tokenizer byte for byte, and its
    training.json (in both of its checkpoints) holds its own command line and settings and the first run's record."""
    tiny = ["--jobs", "6", "--fresh-worlds", "1", "--steps", "1", "--qat-steps", "0", "--threads", "1"]
    first, second = tmp_path / "first", tmp_path / "second"
    train_demo.main([*tiny, "--out", str(first), "--bf16-out", f"{first}-bf16"])
    argv = [
        *tiny,
        "--seed",
        "1",
        "--lr",
        "1e-4",
        "--init",
        f"{first}-bf16",
        "--out",
        str(second),
        "--bf16-out",
        f"{second}-bf16",
    ]
    train_demo.main(argv)

    assert (second / "tokenizer.json").read_bytes() == (first / "tokenizer.json").read_bytes()
    record = json.loads((second / "training.json").read_text())
    assert record == json.loads((tmp_path / "second-bf16" / "training.json").read_text())
    assert record["command"] == shlex.join(["python", "workspace/training/train_demo.py", *argv])
    assert record["init"] == f"{first}-bf16"
    assert (record["seed"], record["lr"], record["steps"], record["num_jobs"]) == (1, 1e-4, 1, 6)
    assert record["init_training"] == json.loads((first / "training.json").read_text())
    assert "init_training" not in record["init_training"] and record["init_training"]["init"] is None
    reparsed = train_demo.build_parser().parse_args(shlex.split(record["command"])[2:])
    assert (reparsed.init, reparsed.lr, reparsed.seed) == (f"{first}-bf16", 1e-4, 1)
    # The code that trained it: this checkout's commit (the tests run from a git clone).
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True)
    assert record["code"]["commit"] == head.stdout.strip() and isinstance(record["code"]["dirty"], bool)


def test_train_demo_runs_as_the_script_the_model_card_gives(tmp_path):
    """`python workspace/training/train_demo.py` from the repository root, as workspace/README.md runs it."""
    out = tmp_path / "k2-demo"
    argv = ["--jobs", "3", "--fresh-worlds", "1", "--steps", "1", "--qat-steps", "0", "--threads", "1"]
    done = subprocess.run(
        [sys.executable, "workspace/training/train_demo.py", *argv, "--out", str(out), "--bf16-out", f"{out}-bf16"],
        cwd=train_demo.REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "trained in" in done.stdout and (out / "model.safetensors").exists()
    assert load_model(out).config.n_routed_experts == 8


def reference_attention(q, k, v, mask, scale):
    """The attention the fused kernel replaces: the logits materialized, masked, softmaxed; and their max per head."""
    logits = ((q @ k.transpose(-1, -2)) * scale).masked_fill(~mask, float("-inf"))
    return logits.softmax(-1) @ v, logits.detach().amax(dim=(0, 2, 3))


@pytest.mark.parametrize("prefix", [0, 10])
def test_fused_training_attention_equals_the_materialized_softmax(prefix):
    """TrainingAttention / SharedPrefixAttention (fused kernel with MLA's narrower v padded, max logit apart)
    give the outputs, gradients and per-head max logits of the explicit masked softmax."""
    from train_demo import SharedPrefixAttention

    model = trainable_model(TINY, seed=0)
    mla = model.layers[0].self_attn
    h, b, t = mla.num_heads, 3, 24
    s = t - prefix
    n = prefix + b * s
    g = torch.Generator().manual_seed(1)
    q_nope, q_pe = (torch.randn(n, h, d, generator=g, requires_grad=True) for d in (mla.qk_nope_dim, mla.qk_rope_dim))
    latent = torch.randn(n, mla.kv_lora_rank, generator=g, requires_grad=True)
    k_pe = torch.randn(n, mla.qk_rope_dim, generator=g, requires_grad=True)
    inputs = (q_nope, q_pe, latent, k_pe)
    attention = SharedPrefixAttention(prefix, b, s) if prefix else TrainingAttention(b, t)
    out = attention(0, mla, *inputs)
    weight = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad((out * weight).sum(), inputs)

    # The reference: every sequence whole ([prefix, own tokens]), causal.
    q, k, v = mla.expand_qkv(q_nope, q_pe, latent, k_pe)
    rows = torch.stack([torch.cat((torch.arange(prefix), prefix + r * s + torch.arange(s))) for r in range(b)])
    qf, kf, vf = (x[rows].transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
    ref, ref_max = reference_attention(qf, kf, vf, torch.ones(t, t, dtype=torch.bool).tril(), mla.scale)
    ref = ref.transpose(1, 2)  # [B, T, H, v]
    ref_out = torch.cat((ref[0, :prefix], ref[:, prefix:].reshape(b * s, h, -1)))
    ref_weight = torch.zeros(b, t, h, v.shape[-1])
    ref_weight[:, prefix:] = weight[prefix:].view(b, s, h, -1)
    ref_weight[0, :prefix] = weight[:prefix]  # the prefix's output counts once, as the shared forward has it
    ref_grads = torch.autograd.grad((ref * ref_weight).sum(), inputs)

    assert v.shape[-1] < q.shape[-1]  # MLA: v narrower than q and k, the case the kernel needs padded
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attention.max_logits[0], ref_max, rtol=1e-5, atol=1e-5)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5)


def demo_size_examples(seed: int, rows: int = 5, length: int = 835) -> list[tuple[list[int], list[bool]]]:
    """Random episodes at the demo model's real sizes: 5 x 835 tokens put 4175 x 8 router scores through the
    sigmoid, whose two-thread split ends a thread's vectorized loop mid-row (one thread's bits differ there)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1024, (rows, length), generator=g).tolist()
    return [(row, [i >= length // 3 for i in range(length)]) for row in ids]


@pytest.mark.slow
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores")
def test_one_thread_arithmetic_on_two_threads_trains_to_one_threads_bits(tmp_path):
    """`train_demo.py --one-thread-arithmetic`: training steps on two threads (the last in INT4 QAT) end at the
    parameters one thread gives, bit for bit, and export the same INT4 checkpoint."""
    config = demo_model_config(1024, eos_token_id=1, bos_token_id=0)
    runs = []
    for threads, arithmetic in ((1, None), (2, OneThreadArithmetic(2))):
        torch.set_num_threads(threads)
        model = trainable_model(config, seed=0)
        opts, load = optimizers(model, 3e-3, weight_decay=0.01), ExpertLoad(model)
        for seed in range(3):
            if seed == 2:
                for m in experts(model):
                    m.fake_quant = True
            examples = demo_size_examples(seed)
            train_step(model, opts, load, examples, list(range(len(examples))), arithmetic=arithmetic)
        with arithmetic or contextlib.nullcontext():
            export(model.eval(), config, tmp_path / str(threads), int4_experts=True)
        runs.append(model.state_dict())
    one, two = runs
    assert one.keys() == two.keys()
    assert all(torch.equal(one[name], two[name]) for name in one)
    for file in sorted((tmp_path / "1").glob("*.safetensors")):
        assert file.read_bytes() == (tmp_path / "2" / file.name).read_bytes(), file.name


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores")
def test_the_ops_outside_one_thread_arithmetic_give_the_same_bits_on_one_and_two_threads():
    """OneThreadArithmetic covers the forward and backward; the gradient clipping, Muon and AdamW steps, QK-clip and
    the expert-bias update run on the parameters' fixed shapes on all threads, which must not change their bits."""
    config = demo_model_config(1024, eos_token_id=1, bos_token_id=0)
    examples = demo_size_examples(0)
    torch.set_num_threads(1)
    model = trainable_model(config, seed=0)
    opts, load = optimizers(model, 3e-3, weight_decay=0.01), ExpertLoad(model)
    train_step(model, opts, load, examples, list(range(len(examples))))  # optimizer state that is not zero
    ids, target = collate(examples, list(range(len(examples))))
    loss, attention, _ = loss_on_generated(model, ids, target)
    loss.backward()
    for counts in load.counts:  # an uneven load, so that the bias update moves
        counts.copy_(torch.arange(config.n_routed_experts, dtype=counts.dtype))
    after = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        m, o, balance = copy.deepcopy((model, opts, load))
        for p, q in zip(model.parameters(), m.parameters(), strict=True):
            q.grad = None if p.grad is None else p.grad.clone()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        for opt in o:
            opt.step()
        qk_clip(m, {layer: x * 20 for layer, x in attention.max_logits.items()}, 50.0)  # some heads over 50
        balance.update_bias(1e-3)
        after.append(m.state_dict())
    assert all(torch.equal(after[0][name], after[1][name]) for name in after[0])


def test_one_thread_arithmetic_is_refused_off_the_cpu_before_any_data_is_built(tmp_path):
    with pytest.raises(ValueError, match="one_thread_arithmetic is a CPU setting"):
        train_demo.train_demo(tmp_path / "out", num_jobs=10, device="cuda", one_thread_arithmetic=True)
    assert not (tmp_path / "out-data").exists() and not (tmp_path / "out").exists()
