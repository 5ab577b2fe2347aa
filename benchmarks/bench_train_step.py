"""Demo-model training steps, two ways, on the same batches of demo episodes from the same model and optimizer
state, in this process; checks that both sides give the same first loss, then prints seconds a step of each and
their ratio.

--compare prefix (the default): each batch's shared prompt prefix computed once, against every episode's whole
prompt (`train_demo.py --no-share-prefix`); also prints the tokens each forward runs.
--compare attention: the fused attention kernel the trainer uses, against the attention it replaced (logits
materialized, masked and softmaxed, their max per head taken from them), both with the shared prefix.
--compare threads: one thread, against `--threads` threads with one thread's arithmetic (`train_demo.py
--one-thread-arithmetic`, OneThreadArithmetic), and plain `--threads` threads for reference; checks that the first
two end with the same parameters, bit for bit, and says whether the third does.

    python benchmarks/bench_train_step.py                       # 40 steps a side on 600 episodes
    python benchmarks/bench_train_step.py --steps 10            # a quick look
    python benchmarks/bench_train_step.py --compare attention --steps 20
    python benchmarks/bench_train_step.py --compare threads --steps 20
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer

# The training recipe lives beside the model it trains, as a script and its modules.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "workspace" / "training"))

import train_demo as train
from one_thread_arithmetic import OneThreadArithmetic
from train_demo import (
    VOCAB_SIZE,
    ExpertLoad,
    batches,
    build_data,
    demo_model_config,
    optimizers,
    shared_prefix,
    tokenize_episodes,
    train_step,
    trainable_model,
)

DEMO_MODEL = Path(__file__).resolve().parent.parent / "workspace" / "models" / "k2-demo"


class MaterializedPrefixAttention(train.SharedPrefixAttention):
    """SharedPrefixAttention as it was before the fused kernel: every logit kept for the backward."""

    def __call__(self, layer, mla, q_nope, q_pe, latent, k_pe):
        q, k, v = mla.expand_qkv(q_nope, q_pe, latent, k_pe)
        p, b, s, h = self.prefix, self.batch, self.suffix_len, mla.num_heads
        qp, kp, vp = (x[:p].view(1, p, h, -1).transpose(1, 2) for x in (q, k, v))
        qs, ks, vs = (x[p:].view(b, s, h, -1).transpose(1, 2) for x in (q, k, v))
        keys = torch.cat((kp.expand(b, -1, -1, -1), ks), dim=2)
        values = torch.cat((vp.expand(b, -1, -1, -1), vs), dim=2)
        if self.masks is None:
            causal = torch.ones(max(p, s), max(p, s), dtype=torch.bool, device=q.device).tril()
            self.masks = causal[:p, :p], torch.cat((causal.new_ones(s, p), causal[:s, :s]), dim=1)
        logits_p = ((qp @ kp.transpose(-1, -2)) * mla.scale).masked_fill(~self.masks[0], float("-inf"))
        logits_s = ((qs @ keys.transpose(-1, -2)) * mla.scale).masked_fill(~self.masks[1], float("-inf"))
        self.max_logits[layer] = torch.maximum(
            logits_p.detach().amax(dim=(0, 2, 3)), logits_s.detach().amax(dim=(0, 2, 3))
        )
        out_p = (logits_p.softmax(-1) @ vp).transpose(1, 2).reshape(p, h, -1)
        out_s = (logits_s.softmax(-1) @ values).transpose(1, 2).reshape(b * s, h, -1)
        return torch.cat((out_p, out_s))


def step(side: str, threads: int, *args, **kwargs) -> dict:
    """train_step with side "materialized" run through MaterializedPrefixAttention, "one thread" on one thread and
    "one-thread arithmetic" under OneThreadArithmetic."""
    fused = train.SharedPrefixAttention
    if side == "materialized":
        train.SharedPrefixAttention = MaterializedPrefixAttention
    torch.set_num_threads(1 if side == "one thread" else threads)
    arithmetic = OneThreadArithmetic(threads) if side == "one-thread arithmetic" else None
    try:
        return train_step(*args, share_prefix=side != "whole prompts", arithmetic=arithmetic, **kwargs)
    finally:
        train.SharedPrefixAttention = fused
        torch.set_num_threads(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=600, help="training jobs (episodes) to draw batches from")
    parser.add_argument("--steps", type=int, default=40, help="timed steps a side")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compare", choices=("prefix", "attention", "threads"), default="prefix")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tokenizer = Tokenizer.from_file(str(DEMO_MODEL / "tokenizer.json"))  # the committed model's, ids as trained
    special = {t: tokenizer.token_to_id(t) for t in ("<|im_end|>", "[BOS]")}
    examples = tokenize_episodes(tokenizer, build_data(args.jobs, seed=0))
    stream = batches(examples, 6144, random.Random(0))
    groups = [next(stream) for _ in range(args.steps + 1)]  # the first is a warm-up step

    config = demo_model_config(VOCAB_SIZE, special["<|im_end|>"], special["[BOS]"])
    base = trainable_model(config, seed=0)
    names = {
        "prefix": ("whole prompts", "shared prefix"),
        "attention": ("materialized", "fused"),
        "threads": ("one thread", "one-thread arithmetic", f"{args.threads} threads"),
    }[args.compare]
    sides = {}
    for name in names:
        model = copy.deepcopy(base)
        sides[name] = (model, optimizers(model, 3e-3, weight_decay=0.01), ExpertLoad(model), [], [])
    # Alternate the sides step by step so that a busy machine slows both alike.
    for i, group in enumerate(groups):
        for name, (model, opts, load, seconds, losses) in sides.items():
            started = time.perf_counter()
            record = step(name, args.threads, model, opts, load, examples, group)
            if i:
                seconds.append(time.perf_counter() - started)
            losses.append(record["loss"])

    (before, (model_0, _, _, seconds_0, losses_0)), (after, (model_1, _, _, seconds_1, losses_1)) = list(sides.items())[
        :2
    ]
    first_loss = (losses_0[0], losses_1[0])
    assert abs(first_loss[0] - first_loss[1]) <= 1e-4 * abs(first_loss[0]), first_loss
    # (episodes, padded length, shared prefix) of each batch: the tokens each side's forward runs.
    shapes = [(len(g), max(len(examples[i][0]) for i in g), shared_prefix(examples, g)) for g in groups]
    prefix = statistics.mean(p for _, _, p in shapes)
    print(
        f"{args.steps} steps a side, {args.threads} threads, {statistics.mean(len(g) for g in groups):.1f} episodes "
        f"a batch, shared prefix {prefix:.0f} tokens on average"
    )
    print(f"first-step loss: {before} {first_loss[0]:.6f}, {after} {first_loss[1]:.6f}")
    print(f"last loss:       {before} {losses_0[-1]:.4f}, {after} {losses_1[-1]:.4f}")
    if args.compare == "prefix":
        tokens_full = statistics.mean(b * t for b, t, _ in shapes)
        tokens_shared = statistics.mean(p + b * (t - p) for b, t, p in shapes)
        print(f"tokens a forward: whole prompts {tokens_full:.0f}, shared prefix {tokens_shared:.0f}")
    t0, t1 = statistics.median(seconds_0), statistics.median(seconds_1)
    print(f"seconds a step (median): {before} {t0:.3f}, {after} {t1:.3f}; speedup {t0 / t1:.2f}x")
    if args.compare == "threads":

        def same(a, b):
            return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))

        assert same(model_0, model_1), f"{after} did not give one thread's parameters"
        model_2, _, _, seconds_2, _ = sides[names[2]]
        t2 = statistics.median(seconds_2)
        print(
            f"after {args.steps + 1} steps the parameters of {before} and {after} are the same, bit for bit; "
            f"{names[2]} ({t2:.3f} s a step, {t0 / t2:.2f}x one thread's speed) "
            f"{'gives them too' if same(model_0, model_2) else 'does not'}"
        )


if __name__ == "__main__":
    main()
