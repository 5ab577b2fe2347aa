"""Train the demo model (workspace/models/k2-demo): a few-million-parameter K2 (MLA with q_lora, MoE with a shared
expert, noaux_tc routing) on the demo episodes with Muon + QK-clip and auxiliary-loss-free expert balancing, then INT4
quantization-aware training of the routed experts, exported in the K2 Thinking checkpoint format.

Run from the repository root: `.venv/bin/python workspace/training/train_demo.py --seed 0` (the defaults are the
committed checkpoint's first run; workspace/README.md gives the whole recipe)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import torch
import torch.nn.functional as F
from demo_episodes import training_pieces
from demo_tokenizer import save_tokenizer, train_tokenizer
from one_thread_arithmetic import OneThreadArithmetic
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torch import nn

from k2batch.demo.tasks import TASKS
from k2batch.kernels.int4_moe import quantize_int4
from k2batch.model.config import ModelConfig
from k2batch.model.export import save_checkpoint
from k2batch.model.layers import MLAttention, RoutedExperts, Router
from k2batch.model.model import K2ForCausalLM

log = logging.getLogger(__name__)

VOCAB_SIZE = 1024
REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "workspace" / "models"
PROGRAM = ["python", "workspace/training/train_demo.py"]
"""How training.json records the command line of a run (its arguments follow)."""


def demo_model_config(vocab_size: int, eos_token_id: int, bos_token_id: int) -> ModelConfig:
    """K2's layout at a few million parameters: 1 dense layer then MoE layers of 8 routed experts (top 2) plus
    one shared expert, MLA with a query LoRA."""
    return ModelConfig.from_dict(
        dict(
            model_type="kimi_k2",
            vocab_size=vocab_size,
            hidden_size=256,
            intermediate_size=512,
            moe_intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            q_lora_rank=128,
            kv_lora_rank=64,
            qk_nope_head_dim=32,
            qk_rope_head_dim=16,
            v_head_dim=32,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=1,
            norm_topk_prob=True,
            routed_scaling_factor=2.827,
            max_position_embeddings=4096,
            rope_theta=50000.0,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
        )
    )


def fake_quant_int4(w: torch.Tensor) -> torch.Tensor:
    """The values the INT4 checkpoint will hold (k2batch.kernels.int4_moe's quantizer, products rounded in the scale
    dtype as unpack_int4 does), with a straight-through gradient."""
    q, scale = quantize_int4(w.detach())
    deq = (q.to(scale.dtype).unflatten(-1, (-1, 32)) * scale.unsqueeze(-1)).flatten(-2).to(w.dtype)
    return w + (deq - w).detach()


class TrainableExperts(RoutedExperts):
    """Routed experts as one 2-D parameter per expert matrix (Muon orthogonalizes 2-D matrices), stacked per
    forward; `fake_quant` turns on INT4 quantization-aware training."""

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor):
        nn.Module.__init__(self)
        self.quantized = False
        self.fake_quant = False
        self.gate_up = nn.ParameterList(nn.Parameter(w.clone()) for w in w13)
        self.down = nn.ParameterList(nn.Parameter(w.clone()) for w in w2)

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        w13, w2 = torch.stack(list(self.gate_up)), torch.stack(list(self.down))
        if self.fake_quant:
            return fake_quant_int4(w13), fake_quant_int4(w2)
        return w13, w2


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float):
    """softmax(q k^T * scale, masked) v without materializing the logits: torch's fused attention (on CPU the flash
    kernel, which needs v as wide as q and k: MLA's narrower v is zero-padded and the pad sliced off the output).
    `mask` (True: may attend) or, if None, causal."""
    pad = q.shape[-1] - v.shape[-1]
    out = F.scaled_dot_product_attention(
        q, k, F.pad(v, (0, pad)) if pad > 0 else v, attn_mask=mask, is_causal=mask is None, scale=scale
    )
    return out[..., : v.shape[-1]] if pad > 0 else out


@torch.no_grad()
def max_logit(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Each head's largest attention logit over the unmasked pairs of q [B, H, Tq, D] and k [B, H, Tk, D], for
    QK-clip. Apart from the fused kernel and without autograd: a fraction of the cost of logits kept for the
    backward."""
    logits = (q @ k.transpose(-1, -2)).masked_fill_(~mask, float("-inf"))
    return logits.amax(dim=(0, 2, 3)) * scale  # scale > 0: the max of the scaled logits


class TrainingAttention:
    """Causal attention over B padded sequences of T tokens that records each head's largest attention logit,
    which QK-clip needs."""

    def __init__(self, batch: int, seq_len: int):
        self.batch, self.seq_len = batch, seq_len
        self.max_logits: dict[int, torch.Tensor] = {}
        self.mask: torch.Tensor | None = None

    def __call__(self, layer, mla, q_nope, q_pe, latent, k_pe):
        q, k, v = mla.expand_qkv(q_nope, q_pe, latent, k_pe)
        b, t = self.batch, self.seq_len
        q, k, v = (x.view(b, t, mla.num_heads, -1).transpose(1, 2) for x in (q, k, v))
        if self.mask is None:
            self.mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        self.max_logits[layer] = max_logit(q, k, self.mask, mla.scale)
        out = fused_attention(q, k, v, None, mla.scale)
        return out.transpose(1, 2).reshape(b * t, mla.num_heads, -1)


class SharedPrefixAttention:
    """TrainingAttention for B sequences that begin with the same P tokens (the system prompt and tool schemas
    every episode carries), with that prefix computed once: the forward holds P + B*S flattened tokens, the prefix
    and then each sequence's own S tokens. The prefix attends causally to itself; each suffix to all of the prefix
    and causally to itself. Outputs, gradients and the largest logits equal TrainingAttention's on the B full
    sequences (the prefix's gradient is the sum over the sequences, as autograd gives it through `expand`)."""

    def __init__(self, prefix: int, batch: int, suffix_len: int):
        self.prefix, self.batch, self.suffix_len = prefix, batch, suffix_len
        self.max_logits: dict[int, torch.Tensor] = {}
        self.masks: tuple[torch.Tensor, torch.Tensor] | None = None

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
        self.max_logits[layer] = torch.maximum(
            max_logit(qp, kp, self.masks[0], mla.scale), max_logit(qs, keys, self.masks[1], mla.scale)
        )
        out_p = fused_attention(qp, kp, vp, None, mla.scale).transpose(1, 2).reshape(p, h, -1)
        out_s = fused_attention(qs, keys, values, self.masks[1], mla.scale).transpose(1, 2).reshape(b * s, h, -1)
        return torch.cat((out_p, out_s))


def shared_prefix(examples, group: list[int]) -> int:
    """How many leading tokens all episodes of `group` share and can compute once: their common prefix, cut
    short of the first token any of them is trained to predict (a shared hidden state predicts one next token).
    0 for a single episode."""
    seqs = [examples[i][0] for i in group]
    if len(seqs) < 2:
        return 0
    first, common = seqs[0], min(len(x) for x in seqs)
    for seq in seqs[1:]:
        n = 0
        while n < common and seq[n] == first[n]:
            n += 1
        common = n
    first_target = min(examples[i][1].index(True) if True in examples[i][1] else len(examples[i][1]) for i in group)
    return max(0, min(common, first_target - 1))


@torch.no_grad()
def qk_clip(model: K2ForCausalLM, max_logits: dict[int, torch.Tensor], threshold: float) -> int:
    """MuonClip's QK-clip for MLA (Kimi K2 report): a head whose largest logit S exceeded `threshold` gets
    gamma = threshold / S; its head-specific query/key parts scale by sqrt(gamma) (nope dims of q and k) or gamma
    (q's rope dims: the rope key is shared by all heads, so it is left alone). Returns the heads clipped."""
    clipped = 0
    for layer, layer_max in max_logits.items():
        mla: MLAttention = model.layers[layer].self_attn
        q_proj = mla.q_b_proj if hasattr(mla, "q_b_proj") else mla.q_proj
        q_w = q_proj.weight.view(mla.num_heads, mla.qk_nope_dim + mla.qk_rope_dim, -1)
        kv_w = mla.kv_b_proj.weight.view(mla.num_heads, mla.qk_nope_dim + mla.v_dim, -1)
        for head in torch.nonzero(layer_max > threshold).flatten().tolist():
            gamma = threshold / float(layer_max[head])
            q_w[head, : mla.qk_nope_dim] *= gamma**0.5
            q_w[head, mla.qk_nope_dim :] *= gamma
            kv_w[head, : mla.qk_nope_dim] *= gamma**0.5
            clipped += 1
    return clipped


class ExpertLoad:
    """Counts tokens per routed expert in every forward (router hooks), and nudges each router's
    e_score_correction_bias toward balance: DeepSeek-V3's auxiliary-loss-free balancing."""

    def __init__(self, model: nn.Module):
        self.routers = [m for m in model.modules() if isinstance(m, Router)]
        self.counts = [torch.zeros_like(r.e_score_correction_bias) for r in self.routers]
        # How many sequences each token of the next forward stands for (a shared prefix's tokens count once per
        # sequence, as if every sequence had run it); None: one each.
        self.multiplicity: torch.Tensor | None = None
        for router, counts in zip(self.routers, self.counts, strict=True):
            router.register_forward_hook(self._counter(counts))

    def _counter(self, counts: torch.Tensor):
        def hook(module, args, output) -> None:
            ids = output[1]
            weights = None if self.multiplicity is None else self.multiplicity.repeat_interleave(ids.shape[1])
            counts.add_(torch.bincount(ids.flatten(), weights=weights, minlength=counts.numel()).to(counts.dtype))

        return hook

    @torch.no_grad()
    def update_bias(self, speed: float) -> float:
        """bias_i += speed * sign(mean load - load_i); returns the worst expert's load over the mean, before."""
        worst = 0.0
        for router, counts in zip(self.routers, self.counts, strict=True):
            if counts.sum() == 0:
                continue
            mean = counts.mean()
            worst = max(worst, float(counts.max() / mean))
            router.e_score_correction_bias += speed * torch.sign(mean - counts)
            counts.zero_()
        return worst


def trainable_model(config: ModelConfig, seed: int, init: str | Path | None = None) -> K2ForCausalLM:
    """A float32 model to train: freshly initialized from `seed`, or the weights (router biases included) of the
    checkpoint `init` (a bf16 one holds the weights before INT4 rounding; an INT4 one gives the rounded experts)."""
    if init is None:
        torch.manual_seed(seed)
        model = K2ForCausalLM(config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name == "embed_tokens.weight":
                    p.normal_(0, 1.0)
                else:
                    p.normal_(0, p.shape[-1] ** -0.5)
    else:
        from k2batch.model import load_model

        model = load_model(init, torch.float32)
        if msgspec.structs.replace(model.config, quantization=None) != config:
            raise ValueError(f"{init} is not a demo model of this architecture: {model.config} != {config}")
        model.train().requires_grad_(True)
    with torch.no_grad():
        for layer in model.layers:
            if hasattr(layer.mlp, "experts"):
                layer.mlp.experts.dequantize_(torch.float32)
                layer.mlp.experts = TrainableExperts(layer.mlp.experts.w13, layer.mlp.experts.w2)
    return model


def optimizers(model: nn.Module, lr: float, weight_decay: float) -> list[torch.optim.Optimizer]:
    """Muon for the 2-D hidden matrices (attention, MLPs, experts); AdamW for embeddings, the head, norms and
    routers. Muon's update is scaled to AdamW's RMS so both share one learning rate."""
    muon, adamw = [], []
    for name, p in model.named_parameters():
        hidden_matrix = p.ndim == 2 and not name.startswith(("embed_tokens", "lm_head")) and ".gate." not in name
        (muon if hidden_matrix else adamw).append(p)
    return [
        torch.optim.Muon(muon, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw"),
        torch.optim.AdamW(adamw, lr=lr, weight_decay=0.0, betas=(0.9, 0.95)),
    ]


def tokenize_episodes(tokenizer, episodes: list[list[tuple[str, bool]]]) -> list[tuple[list[int], list[bool]]]:
    """Token ids of each episode and which of them the model generated (the loss targets). Each piece is encoded
    alone, as the episode loop encodes it (all of them in one batch call, which runs on all cores)."""
    texts = [text for pieces in episodes for text, _ in pieces]
    encoded = iter(tokenizer.encode_batch(texts, add_special_tokens=False))
    out = []
    for pieces in episodes:
        ids: list[int] = []
        generated: list[bool] = []
        for (_, is_generated), encoding in zip(pieces, encoded):
            ids += encoding.ids
            generated += [is_generated] * len(encoding.ids)
        out.append((ids, generated))
    return out


def batches(examples, tokens_per_batch: int, rng: random.Random):
    """Endless batches of similar-length episodes (little padding), about `tokens_per_batch` tokens each."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    groups, group, longest = [], [], 0
    for i in order:
        longest = max(longest, len(examples[i][0]))
        if group and longest * (len(group) + 1) > tokens_per_batch:
            groups.append(group)
            group, longest = [], len(examples[i][0])
        group.append(i)
    groups.append(group)
    while True:
        rng.shuffle(groups)
        yield from groups


def token_multiplicity(prefix: int, batch: int, seq_len: int) -> torch.Tensor:
    """For ExpertLoad: a shared prefix's tokens stand for `batch` sequences each, the rest for one."""
    return torch.cat((torch.full((prefix,), float(batch)), torch.ones(batch * (seq_len - prefix))))


def collate(examples, group: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    t = max(len(examples[i][0]) for i in group)
    ids = torch.zeros(len(group), t, dtype=torch.long)
    target = torch.zeros(len(group), t, dtype=torch.bool)
    for row, i in enumerate(group):
        seq, gen = examples[i]
        ids[row, : len(seq)] = torch.tensor(seq)
        target[row, : len(seq)] = torch.tensor(gen)
    return ids, target


def loss_on_generated(
    model: K2ForCausalLM, ids: torch.Tensor, target: torch.Tensor, prefix: int = 0
) -> tuple[torch.Tensor, TrainingAttention | SharedPrefixAttention, float]:
    """Cross-entropy of the tokens the model generates in an episode (reasoning, calls, answers), not of
    prompts or tool results; the head runs only where a target is predicted. With `prefix` > 0 the sequences'
    first `prefix` tokens (equal in every row, none of them or the token after them a target: `shared_prefix`)
    run once (SharedPrefixAttention); the loss is the same."""
    b, t = ids.shape
    positions = torch.arange(t, device=ids.device)
    if prefix:
        if not bool((ids[:, :prefix] == ids[:1, :prefix]).all()) or bool(target[:, : prefix + 1].any()):
            raise ValueError(f"the {prefix} leading tokens are not a shared, untrained prefix of every row")
        attention = SharedPrefixAttention(prefix, b, t - prefix)
        flat = torch.cat((ids[0, :prefix], ids[:, prefix:].reshape(-1)))
        hidden = model(flat, torch.cat((positions[:prefix], positions[prefix:].repeat(b))), attention)
        hidden = hidden[prefix:].view(b, t - prefix, -1)
    else:
        attention = TrainingAttention(b, t)
        hidden = model(ids.reshape(-1), positions.repeat(b), attention).view(b, t, -1)
    predict = target[:, prefix + 1 :]
    logits = model.lm_head(hidden[:, :-1][predict])
    labels = ids[:, prefix + 1 :][predict]
    loss = F.cross_entropy(logits.float(), labels)
    accuracy = float((logits.argmax(-1) == labels).float().mean())
    return loss, attention, accuracy


def export(model: K2ForCausalLM, config: ModelConfig, path: Path, *, int4_experts: bool) -> None:
    """Write a checkpoint: experts stacked back (INT4-packed from the float32 master weights, the exact values
    QAT trained with), every other weight in bf16 as K2 Thinking ships, the router bias in float32."""
    plain = K2ForCausalLM(config)
    state = {}
    for name, value in model.state_dict().items():
        if ".experts.gate_up." in name or ".experts.down." in name:
            continue
        state[name] = value
    for i, layer in enumerate(model.layers):
        if isinstance(getattr(layer.mlp, "experts", None), TrainableExperts):
            state[f"layers.{i}.mlp.experts.w13"] = torch.stack(list(layer.mlp.experts.gate_up)).detach()
            state[f"layers.{i}.mlp.experts.w2"] = torch.stack(list(layer.mlp.experts.down)).detach()
    plain.load_state_dict(state)
    save_checkpoint(plain, path, int4_experts=int4_experts)
    tensors = load_file(path / "model.safetensors")
    tensors = {
        k: (v.to(torch.bfloat16) if v.dtype == torch.float32 and not k.endswith("e_score_correction_bias") else v)
        for k, v in tensors.items()
    }
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    raw = json.loads((path / "config.json").read_text())
    raw["torch_dtype"] = "bfloat16"
    (path / "config.json").write_text(json.dumps(raw, indent=2))


def write_generation_config(path: Path, special: dict[str, int]) -> None:
    """K2 Thinking's generation defaults: turns end at <|im_end|>, sampled at temperature 1.0, top_p 0.95."""
    (path / "generation_config.json").write_text(
        json.dumps(
            {
                "bos_token_id": special["[BOS]"],
                "eos_token_id": [special["<|im_end|>"], special["[EOS]"]],
                "temperature": 1.0,
                "top_p": 0.95,
            },
            indent=2,
        )
    )


FRESH_WORLD_SEED = 1_000_000  # fresh world i of training seed s is make_world(FRESH_WORLD_SEED + 1000 * s + i)
# Share of synthesis pairs whose digit counts are drawn uniformly (make_jobs): 0 from scratch; the recipe's annealing
# runs set 0.5 (workspace/README.md).
BALANCED_LENGTHS = 0.0


def build_data(
    num_jobs: int,
    seed: int,
    corpus: str | Path | None = None,
    *,
    fresh_worlds: int = 0,
    work_dir: str | Path | None = None,
    tasks: tuple[str, ...] = TASKS,
    balanced_lengths: float = 0.0,
    echo_names: float = 0.0,
    echo_digits: float = 0.0,
    typos: float = 0.0,
) -> list[list[tuple[str, bool]]]:
    """Gold episodes of `num_jobs` training jobs, tool results from the real tools; `tasks` and
    `balanced_lengths` set the job mix (`make_jobs`), `echo_names` and `echo_digits` the fresh worlds' share of
    names with a repeated syllable or letter and of numbers with a repeated chunk of digits (`make_world`), `typos`
    the share of episodes that recover from a search for a miscopied name (`training_pieces`).

    With `fresh_worlds` = 0, over the demo world's training entities. Otherwise (the committed recipe: 16)
    spread over that many fresh worlds, each with its own corpus under `work_dir`, whose names share no word with
    the demo world: entities seldom repeat, so the model cannot answer from memory and must copy what the tools
    return, as it has to on held-out entities."""
    from k2batch.config import load_config
    from k2batch.demo.tasks import make_jobs
    from k2batch.demo.world import make_world, name_words, write_corpus

    if not fresh_worlds and (echo_names or echo_digits):
        raise ValueError("echo_names and echo_digits need fresh_worlds: the demo world is fixed")
    config = load_config()
    world = make_world()
    mix = {"tasks": tuple(tasks), "balanced_lengths": balanced_lengths}
    if not fresh_worlds:
        corpus = Path(corpus or config.tools.search_corpus)
        if not corpus.exists():
            write_corpus(world, corpus)
        jobs = make_jobs(world, num_jobs, seed, held_out=False, prefix="train", **mix)
        return training_pieces(jobs, world, config, corpus, None, typos, seed)
    if fresh_worlds < 0:
        raise ValueError(f"fresh_worlds must be >= 0, got {fresh_worlds}")
    if work_dir is None:
        raise ValueError("fresh_worlds needs a work_dir for their corpora")
    reserved = name_words(world)
    episodes: list[list[tuple[str, bool]]] = []
    for i in range(fresh_worlds):
        fresh = make_world(
            FRESH_WORLD_SEED + 1000 * seed + i,
            held_out_fraction=0.0,
            reserved=reserved,
            echo_names=echo_names,
            echo_digits=echo_digits,
        )
        fresh_corpus = write_corpus(fresh, Path(work_dir) / f"fresh-{seed}-{i}.parquet")
        count = num_jobs // fresh_worlds + (i < num_jobs % fresh_worlds)
        jobs = make_jobs(fresh, count, seed + i, held_out=False, prefix=f"train{i}", **mix)
        episodes += training_pieces(jobs, fresh, config, fresh_corpus, None, typos, seed + i)
    return episodes


def code_version() -> dict | None:
    """The git commit of the code that trains, and whether tracked files differed from it; None outside a git
    checkout of this repository. training.json keeps it: a run from scratch lands where the exact float arithmetic
    takes it, so the code is part of the recipe (workspace/README.md)."""
    if not (REPO / "pyproject.toml").exists():
        return None
    try:
        git = ["git", "-C", str(REPO)]
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout
        changes = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": commit.strip(), "dirty": bool(changes.strip())}


def train_demo(
    out: str | Path,
    *,
    seed: int = 0,
    num_jobs: int = 16000,
    corpus: str | Path | None = None,
    bf16_out: str | Path | None = None,
    threads: int | None = None,
    fresh_worlds: int = 16,
    tasks: tuple[str, ...] = TASKS,
    balanced_lengths: float = BALANCED_LENGTHS,
    echo_names: float = 0.0,
    echo_digits: float = 0.0,
    typos: float = 0.0,
    init: str | Path | None = None,
    command: str | None = None,
    **train_options,
) -> dict:
    """Build the data, train the tokenizer and the model, export; returns a summary of the run, also written as
    training.json of both checkpoints (with `command`, the command line that ran it, if given). With `init` (a demo
    checkpoint), its tokenizer is kept, training goes on from its weights, and its training.json is kept as
    `init_training`."""
    started = time.perf_counter()
    code = code_version()  # now: the tree may change while the run goes on
    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    tokenizer, init_record = None, None
    if train_options.get("one_thread_arithmetic") and train_options.get("device", "cpu") != "cpu":
        raise ValueError("one_thread_arithmetic is a CPU setting")  # train_model's check, before the data is built
    if init is not None:
        # Checked before the data is built (minutes), not after.
        init_dir = Path(init)
        if not (init_dir / "config.json").exists() or not (init_dir / "tokenizer.json").exists():
            raise FileNotFoundError(f"init {init}: not a demo checkpoint (needs config.json and tokenizer.json)")
        tokenizer = Tokenizer.from_file(str(init_dir / "tokenizer.json"))
        # The record of the run this one goes on from, so the checkpoint's whole recipe stays on file.
        if (init_dir / "training.json").exists():
            init_record = json.loads((init_dir / "training.json").read_text())
    data_dir = out.with_name(out.name + "-data")  # the fresh worlds' corpora, if any
    episodes = build_data(
        num_jobs,
        seed,
        corpus,
        fresh_worlds=fresh_worlds,
        work_dir=data_dir,
        tasks=tasks,
        balanced_lengths=balanced_lengths,
        echo_names=echo_names,
        echo_digits=echo_digits,
        typos=typos,
    )
    if tokenizer is None:
        tokenizer = train_tokenizer((text for pieces in episodes for text, _ in pieces), VOCAB_SIZE)
    special = save_tokenizer(tokenizer, out)
    examples = tokenize_episodes(tokenizer, episodes)
    log.info(
        "%d episodes, %d tokens (%d generated)",
        len(examples),
        sum(len(e[0]) for e in examples),
        sum(sum(e[1]) for e in examples),
    )
    summary = train_model(examples, special, out, seed=seed, init=init, **train_options)
    model, config = summary.pop("model"), summary.pop("config")
    summary.pop("losses")  # one a step: the log has them; training.json keeps the settings and final figures
    if bf16_out is not None:
        bf16_out = Path(bf16_out)
        export(model, config, bf16_out, int4_experts=False)
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
            (bf16_out / name).write_bytes((out / name).read_bytes())
    summary.update(
        num_jobs=num_jobs,
        fresh_worlds=fresh_worlds,
        tasks=list(tasks),
        balanced_lengths=balanced_lengths,
        echo_names=echo_names,
        echo_digits=echo_digits,
        typos=typos,
        episodes=len(examples),
        wall_s=round(time.perf_counter() - started, 1),
        threads=torch.get_num_threads(),
    )
    if command is not None:
        summary["command"] = command
    summary["code"] = code
    if init_record is not None:
        summary["init_training"] = init_record
    for path in (out, bf16_out):
        if path is not None:
            (path / "training.json").write_text(json.dumps(summary, indent=2))
    return summary


def train_step(
    model: K2ForCausalLM,
    opts: list[torch.optim.Optimizer],
    load: ExpertLoad,
    examples: list[tuple[list[int], list[bool]]],
    group: list[int],
    *,
    device: str = "cpu",
    share_prefix: bool = True,
    qk_clip_threshold: float = 50.0,
    bias_update_speed: float = 1e-3,
    arithmetic: OneThreadArithmetic | None = None,
) -> dict:
    """One optimizer step on the episodes `group`: loss, backward, clipped gradients, Muon + AdamW, QK-clip, and
    the expert-bias update. Returns the step's loss, token accuracy, largest logit, heads clipped and load."""
    ids, target = (t.to(device) for t in collate(examples, group))
    # The tool schemas (and system prompt) the episodes start with run once per batch, not once per episode.
    prefix = shared_prefix(examples, group) if share_prefix else 0
    load.multiplicity = token_multiplicity(prefix, *ids.shape).to(device) if prefix else None
    for opt in opts:
        opt.zero_grad(set_to_none=True)
    with arithmetic or contextlib.nullcontext():
        loss, attention, accuracy = loss_on_generated(model, ids, target, prefix)
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    for opt in opts:
        opt.step()
    clipped = qk_clip(model, attention.max_logits, qk_clip_threshold)
    imbalance = load.update_bias(bias_update_speed)
    max_logit = max(float(m.max()) for m in attention.max_logits.values())
    return {
        "loss": float(loss.detach()),
        "accuracy": accuracy,
        "max_logit": max_logit,
        "clipped_heads": clipped,
        "max_load_over_mean": imbalance,
        "shared_prefix": prefix,
    }


def train_model(
    examples: list[tuple[list[int], list[bool]]],
    special: dict[str, int],
    out: Path,
    *,
    seed: int = 0,
    steps: int = 3000,
    qat_steps: int = 300,
    tokens_per_batch: int = 6144,
    lr: float = 3e-3,
    qk_clip_threshold: float = 50.0,
    bias_update_speed: float = 1e-3,
    snapshot_every: int = 0,
    device: str = "cpu",
    share_prefix: bool = True,
    init: str | Path | None = None,
    one_thread_arithmetic: bool = False,
) -> dict:
    """The training loop: Muon + AdamW, QK-clip after every step, expert-bias balancing, then INT4 QAT of the
    routed experts for the last `qat_steps`; exports the INT4 checkpoint (model files) into `out`. With `init`,
    training goes on from that checkpoint's weights (fresh optimizer state, the same schedule shape). With
    `one_thread_arithmetic` (CPU), the run gives the bits it would on one thread, using torch's threads where
    that changes none (OneThreadArithmetic)."""
    if one_thread_arithmetic and device != "cpu":
        raise ValueError("one_thread_arithmetic is a CPU setting")
    # The forward and backward, whose shapes change with every batch, run under OneThreadArithmetic; the optimizer
    # steps run on the parameters' fixed shapes, which give the same bits on one thread and on more (tested).
    arithmetic = OneThreadArithmetic(torch.get_num_threads()) if one_thread_arithmetic else None
    started = time.perf_counter()
    config = demo_model_config(VOCAB_SIZE, special["<|im_end|>"], special["[BOS]"])
    model = trainable_model(config, seed, init).to(device)
    opts = optimizers(model, lr, weight_decay=0.01)
    load = ExpertLoad(model)
    rng = random.Random(seed)
    stream = batches(examples, tokens_per_batch, rng)
    total = steps + qat_steps
    warmup = max(1, total // 30)
    history: list[dict] = []
    clipped_total = 0
    for step in range(total):
        if step == steps:
            for m in model.modules():
                if isinstance(m, TrainableExperts):
                    m.fake_quant = True
        # Warmup, then constant, then linear decay to 10% over the last 40% of steps (QAT included).
        decay_start = int(total * 0.6)
        scale = min(1.0, (step + 1) / warmup)
        if step >= decay_start:
            scale *= 1.0 - 0.9 * (step - decay_start) / max(1, total - decay_start)
        for opt in opts:
            for group in opt.param_groups:
                group["lr"] = lr * scale
        record = train_step(
            model,
            opts,
            load,
            examples,
            next(stream),
            device=device,
            share_prefix=share_prefix,
            qk_clip_threshold=qk_clip_threshold,
            bias_update_speed=bias_update_speed,
            arithmetic=arithmetic,
        )
        clipped_total += record["clipped_heads"]
        history.append({"step": step, **record})
        if snapshot_every and step and step % snapshot_every == 0:
            # A checkpoint to evaluate while training goes on (same files as the final one).
            snapshot = out.with_name(out.name + "-snapshot")
            export(model, config, snapshot, int4_experts=True)
            for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
                (snapshot / name).write_bytes((out / name).read_bytes())
            write_generation_config(snapshot, special)
        if step % 25 == 0 or step == total - 1:
            log.info(
                "step %d/%d loss %.4f token acc %.4f max logit %.1f clipped %d load max/mean %.2f%s (%.0f s)",
                step,
                total,
                record["loss"],
                record["accuracy"],
                record["max_logit"],
                clipped_total,
                record["max_load_over_mean"],
                " QAT" if step >= steps else "",
                time.perf_counter() - started,
            )
    model = model.cpu().eval()
    with arithmetic or contextlib.nullcontext():
        export(model, config, out, int4_experts=True)
    write_generation_config(out, special)
    last = history[-20:]
    return {
        "seed": seed,
        "steps": steps,
        "qat_steps": qat_steps,
        "tokens_per_batch": tokens_per_batch,
        "lr": lr,
        "qk_clip_threshold": qk_clip_threshold,
        "clipped_heads": clipped_total,
        "share_prefix": share_prefix,
        "bias_update_speed": bias_update_speed,
        "parameters": sum(p.numel() for p in model.parameters()),
        "losses": [h["loss"] for h in history],
        "final_loss": sum(h["loss"] for h in last) / len(last),
        "final_token_accuracy": sum(h["accuracy"] for h in last) / len(last),
        "final_max_load_over_mean": last[-1]["max_load_over_mean"],
        "train_s": round(time.perf_counter() - started, 1),
        "device": device,
        "init": None if init is None else str(init),
        "one_thread_arithmetic": one_thread_arithmetic,
        "model": model,
        "config": config,
    }


def _count(text: str) -> int:
    """argparse type: a whole number >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _tasks(text: str) -> tuple[str, ...]:
    """argparse type: comma-separated demo task kinds."""
    from k2batch.demo.tasks import check_tasks

    tasks = tuple(t.strip() for t in text.split(",") if t.strip())
    try:
        check_tasks(tasks)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return tasks


def _fraction(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command line; its defaults are the committed checkpoint's first run (workspace/models/k2-demo/training.json
    records every run's command)."""
    p = argparse.ArgumentParser(
        prog="train_demo.py", description="Train the demo model (a tiny K2) on synthetic agentic episodes"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(MODELS / "k2-demo"), help="INT4 checkpoint directory")
    p.add_argument("--bf16-out", default=str(MODELS / "k2-demo-bf16"), help="the same weights before INT4 quantization")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps before quantization-aware training")
    p.add_argument("--qat-steps", type=int, default=300, help="steps of INT4 quantization-aware training")
    p.add_argument("--jobs", type=int, default=16000, help="training jobs (gold episodes) to generate")
    p.add_argument(
        "--fresh-worlds",
        type=_count,
        default=16,
        help="spread the jobs over this many fresh worlds (0: over the demo world's training entities)",
    )
    p.add_argument(
        "--tasks",
        type=_tasks,
        default=TASKS,
        help="comma-separated task kinds the training jobs take in turn (one listed twice gets twice the "
        "jobs); default retrieval,draft,synthesis",
    )
    p.add_argument(
        "--balanced-lengths",
        type=_fraction,
        default=0.0,
        help="fraction of synthesis jobs whose two values' digit counts are drawn uniformly",
    )
    p.add_argument(
        "--echo-names",
        type=_fraction,
        default=0.0,
        help="fraction of fresh-world name words with a repeated syllable or letter (Ralolis, Finmimi)",
    )
    p.add_argument(
        "--echo-digits",
        type=_fraction,
        default=0.0,
        help="fraction of fresh-world numbers with a repeated chunk of digits (588989, 747000)",
    )
    p.add_argument(
        "--typos",
        type=_fraction,
        default=0.0,
        help="fraction of episodes that search for a miscopied name first and recover (no loss on the mistake)",
    )
    p.add_argument("--qk-clip", type=float, default=50.0, help="QK-clip threshold on attention logits")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (Muon and AdamW)")
    p.add_argument("--init", help="go on training from this demo checkpoint (its weights and tokenizer)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument(
        "--one-thread-arithmetic",
        action="store_true",
        help="give the bits of a --threads 1 run, using the threads where that changes none (faster)",
    )
    p.add_argument("--device", default="cpu", help="where the training loop runs: cpu or cuda")
    p.add_argument("--snapshot-every", type=int, default=0, help="also export OUT-snapshot every N steps")
    p.add_argument(
        "--no-share-prefix",
        dest="share_prefix",
        action="store_false",
        help="run every episode's whole prompt, not a batch's shared prefix once (same loss, slower)",
    )
    return p


def main(argv: list[str] | None = None) -> dict:
    """Train and export as the command line says; training.json records it (PROGRAM and the arguments)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    summary = train_demo(
        args.out,
        seed=args.seed,
        steps=args.steps,
        qat_steps=args.qat_steps,
        num_jobs=args.jobs,
        bf16_out=args.bf16_out,
        threads=args.threads,
        snapshot_every=args.snapshot_every,
        qk_clip_threshold=args.qk_clip,
        device=args.device,
        fresh_worlds=args.fresh_worlds,
        share_prefix=args.share_prefix,
        tasks=args.tasks,
        balanced_lengths=args.balanced_lengths,
        echo_names=args.echo_names,
        echo_digits=args.echo_digits,
        typos=args.typos,
        lr=args.lr,
        init=args.init,
        one_thread_arithmetic=args.one_thread_arithmetic,
        command=shlex.join([*PROGRAM, *argv]),
    )
    print(f"trained in {summary['wall_s']:.0f} s: final loss {summary['final_loss']:.4f}; checkpoint at {args.out}")
    return summary


if __name__ == "__main__":
    main()
