"""Demo-model training steps with each batch's shared prompt prefix computed once, against every episode's whole
prompt (`k2batch train-demo --no-share-prefix`): the same batches of demo episodes, the same model and optimizer
state on both sides, in this process. Checks that both sides give the same loss, then prints seconds a step of
each, their ratio, and the tokens each forward runs.

    python benchmarks/bench_train_step.py                   # 40 steps a side on 600 episodes
    python benchmarks/bench_train_step.py --steps 10        # a quick look
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer

from k2batch.demo.train import (
    ExpertLoad,
    VOCAB_SIZE,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=600, help="training jobs (episodes) to draw batches from")
    parser.add_argument("--steps", type=int, default=40, help="timed steps a side")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tokenizer = Tokenizer.from_file(str(DEMO_MODEL / "tokenizer.json"))  # the committed model's, ids as trained
    special = {t: tokenizer.token_to_id(t) for t in ("<|im_end|>", "[BOS]")}
    examples = tokenize_episodes(tokenizer, build_data(args.jobs, seed=0))
    stream = batches(examples, 6144, random.Random(0))
    groups = [next(stream) for _ in range(args.steps + 1)]  # the first is a warm-up step

    config = demo_model_config(VOCAB_SIZE, special["<|im_end|>"], special["[BOS]"])
    base = trainable_model(config, seed=0)
    sides = {}
    for share in (False, True):
        model = copy.deepcopy(base)
        sides[share] = (model, optimizers(model, 3e-3, weight_decay=0.01), ExpertLoad(model), [], [])
    # Alternate the sides step by step so that a busy machine slows both alike.
    for step, group in enumerate(groups):
        for share, (model, opts, load, seconds, losses) in sides.items():
            started = time.perf_counter()
            record = train_step(model, opts, load, examples, group, share_prefix=share)
            if step:
                seconds.append(time.perf_counter() - started)
            losses.append(record["loss"])

    (_, _, _, seconds_full, losses_full), (_, _, _, seconds_shared, losses_shared) = sides[False], sides[True]
    first_loss = (losses_full[0], losses_shared[0])
    assert abs(first_loss[0] - first_loss[1]) <= 1e-4 * abs(first_loss[0]), first_loss
    # (episodes, padded length, shared prefix) of each batch: the tokens each side's forward runs.
    shapes = [(len(g), max(len(examples[i][0]) for i in g), shared_prefix(examples, g)) for g in groups]
    tokens_full = statistics.mean(b * t for b, t, _ in shapes)
    tokens_shared = statistics.mean(p + b * (t - p) for b, t, p in shapes)
    prefix = statistics.mean(p for _, _, p in shapes)
    print(f"{args.steps} steps a side, {args.threads} threads, {statistics.mean(len(g) for g in groups):.1f} episodes "
          f"a batch, shared prefix {prefix:.0f} tokens on average")  # fmt: skip
    print(f"first-step loss: whole prompts {first_loss[0]:.6f}, shared prefix {first_loss[1]:.6f}")
    print(f"last loss:       whole prompts {losses_full[-1]:.4f}, shared prefix {losses_shared[-1]:.4f}")
    t_full, t_shared = statistics.median(seconds_full), statistics.median(seconds_shared)
    print(f"tokens a forward: whole prompts {tokens_full:.0f}, shared prefix {tokens_shared:.0f}")
    print(f"seconds a step (median): whole prompts {t_full:.3f}, shared prefix {t_shared:.3f}; "
          f"speedup {t_full / t_shared:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
