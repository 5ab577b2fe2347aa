"""Kernel roofline: the fused INT4 MoE and MLA paged decode at K2's shapes against this device's measured peaks.

Measures, in the same run, the device copy bandwidth (a large device-to-device copy) and the bf16 matmul rate
(an 8192^3 torch.mm), then for each case prints the Triton kernel's time, achieved HBM bandwidth and TFLOP/s, their
fractions of those peaks, the torch baseline's time (dequantize the touched experts, then bf16 grouped matmuls;
gathered fp32 attention) with the speedup, and the kernel's max error against it. Bytes count what must move at
least: the touched experts' packed weights and scales plus activations in and out; the cached latents plus q and out.

    python benchmarks/bench_kernels.py                            # CUDA: K2 shapes, decode batch 1-512, prefill
    python benchmarks/bench_kernels.py --json benchmarks/results/kernels_h100.json
    python benchmarks/bench_kernels.py --smoke                    # tiny shapes; on CPU under TRITON_INTERPRET=1
    python benchmarks/bench_kernels.py --tune                     # CUDA: sweep launch shapes per case first

Targets on H100: decode MoE and MLA decode >= 75% of copy bandwidth, prefill MoE >= 50% of the bf16 matmul rate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout, installed or not

# K2: 384 experts top-8, hidden 7168, expert width 2048; MLA with 64 heads over 512 latent + 64 rope dims.
K2_MOE = dict(experts=384, top_k=8, hidden=7168, inter=2048)
K2_MLA = dict(heads=64, latent=512, rope=64)
MOE_DECODE = [1, 4, 16, 64, 128, 256, 512]
MOE_PREFILL = [1024, 2048, 4096, 8192]
MLA_BATCHES = [1, 8, 32, 64, 128, 256, 512]
MLA_CONTEXTS = [1024, 8192, 32768]
PAGE_SIZE = 16  # tokens per cache block, as the engine's default
REFERENCE_BYTES_MAX = 4 << 30  # the MLA reference gathers [B, T, 576] in fp32; skip it above this

SMOKE_MOE = dict(experts=8, top_k=2, hidden=128, inter=64)
SMOKE_MLA = dict(heads=16, latent=64, rope=16)


@dataclass
class Row:
    kernel: str
    case: str
    ms: float
    gb_s: float
    tflop_s: float
    pct_copy_bw: float
    pct_matmul: float
    target: str
    reference_ms: float | None
    speedup: float | None
    max_rel_err: float | None


def measure(fn, device: torch.device) -> float:
    """Median seconds per call: triton's do_bench on CUDA (flushes L2 between calls), one timed call on CPU."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def device_peaks(device: torch.device, smoke: bool) -> tuple[float, float]:
    """(copy bytes/s counting read + write, bf16 matmul FLOP/s), measured now on `device`."""
    numel = (1 << 20) if smoke else (1 << 30)
    src = torch.empty(numel, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    copy = 2 * src.numel() * src.element_size() / measure(lambda: dst.copy_(src), device)
    n = 256 if smoke else 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    matmul = 2 * n**3 / measure(lambda: torch.mm(a, b), device)
    return copy, matmul


def max_rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def bench_moe(device, copy_bw, matmul_rate, smoke) -> list[Row]:
    from k2batch.kernels.int4_moe import Int4Weight, fused_moe_grouped_reference, fused_moe_triton

    shape = SMOKE_MOE if smoke else K2_MOE
    e, k, h, i = shape["experts"], shape["top_k"], shape["hidden"], shape["inter"]
    torch.manual_seed(0)

    def packed(rows, cols):  # random nibbles and scales: timing does not depend on the values
        words = torch.randint(-(2**31), 2**31 - 1, (e, rows, cols // 8), dtype=torch.int32, device=device)
        scale = (torch.rand(e, rows, cols // 32, device=device) * 0.02 + 0.01).to(torch.bfloat16)
        return Int4Weight(words, scale)

    w13, w2 = packed(2 * i, h), packed(h, i)
    expert_bytes = sum(t[0].numel() * t.element_size() for t in (w13.packed, w13.scale, w2.packed, w2.scale))
    rows = []
    cases = [("decode", m) for m in ([1, 5] if smoke else MOE_DECODE)]
    cases += [("prefill", m) for m in ([300] if smoke else MOE_PREFILL)]
    for phase, m in cases:
        x = torch.randn(m, h, dtype=torch.bfloat16, device=device)
        topk_ids = torch.rand(m, e, device=device).topk(k, dim=1).indices
        topk_weights = torch.rand(m, k, device=device).softmax(dim=1)
        out = fused_moe_triton(x, w13, w2, topk_weights, topk_ids)
        seconds = measure(lambda: fused_moe_triton(x, w13, w2, topk_weights, topk_ids), device)
        ref = fused_moe_grouped_reference(x, w13, w2, topk_weights, topk_ids)
        ref_seconds = measure(lambda: fused_moe_grouped_reference(x, w13, w2, topk_weights, topk_ids), device)
        touched = topk_ids.unique().numel()
        moved = touched * expert_bytes + 2 * x.numel() * x.element_size()
        flops = 2 * m * k * 3 * h * i
        target = "bw>=75%" if phase == "decode" else "mm>=50%"
        rows.append(
            row(
                "moe",
                f"{phase} M={m} experts={touched}",
                seconds,
                moved,
                flops,
                copy_bw,
                matmul_rate,
                target,
                ref_seconds,
                max_rel_err(out, ref),
            )
        )
    return rows


def bench_mla(device, copy_bw, matmul_rate, smoke) -> list[Row]:
    from k2batch.kernels.mla_decode import mla_decode_reference, mla_decode_triton

    shape = SMOKE_MLA if smoke else K2_MLA
    heads, latent, rope = shape["heads"], shape["latent"], shape["rope"]
    dim = latent + rope
    sm_scale = 192**-0.5  # K2's qk head dim (128 nope + 64 rope), which the absorbed scores keep
    torch.manual_seed(0)
    rows = []
    cases = [(1, 40), (3, 300)] if smoke else [(b, t) for b in MLA_BATCHES for t in MLA_CONTEXTS]
    for batch, context in cases:
        pages_per_seq = -(-context // PAGE_SIZE)
        kv_cache = torch.randn(batch * pages_per_seq, PAGE_SIZE, dim, dtype=torch.bfloat16, device=device)
        # Each sequence gets scattered pages, as a long-running cache hands them out.
        block_table = torch.randperm(batch * pages_per_seq, device=device).view(batch, pages_per_seq).int()
        seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
        q = torch.randn(batch, heads, dim, dtype=torch.bfloat16, device=device)
        args = (q, kv_cache, block_table, seq_lens, sm_scale, latent)
        out = mla_decode_triton(*args)
        seconds = measure(lambda: mla_decode_triton(*args), device)
        ref_seconds = err = None
        if batch * context * dim * 4 <= REFERENCE_BYTES_MAX:
            err = max_rel_err(out, mla_decode_reference(*args))
            ref_seconds = measure(lambda: mla_decode_reference(*args), device)
        moved = batch * context * dim * 2 + q.numel() * 2 + out.numel() * 2
        flops = 2 * batch * heads * context * (dim + latent)
        rows.append(
            row(
                "mla",
                f"decode B={batch} T={context}",
                seconds,
                moved,
                flops,
                copy_bw,
                matmul_rate,
                "bw>=75%",
                ref_seconds,
                err,
            )
        )
    return rows


def measure_quick(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=40, return_mode="median") / 1e3


MOE_DECODE_CANDIDATES = [(bn, bk, 4, st) for bn in (32, 64, 128) for bk in (128, 256) for st in (3, 4, 5)] + [
    (64, 128, 8, 4),
    (128, 128, 8, 4),
    (128, 256, 8, 3),
]
MOE_PREFILL_CANDIDATES = [  # (block_m, block_n, block_k, warps, stages)
    (64, 64, 64, 4, 3),
    (64, 128, 64, 4, 3),
    (64, 128, 64, 8, 3),
    (64, 256, 64, 8, 3),
    (128, 64, 64, 4, 4),
    (128, 64, 64, 8, 3),
    (128, 128, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (128, 128, 32, 8, 4),
    (128, 128, 128, 8, 3),
    (128, 256, 64, 8, 3),
]


def tune_moe(device, copy_bw, matmul_rate) -> list[dict]:
    """Each expert GEMM alone (gate/up, down) over candidate launch shapes, per case; the best per case."""
    from k2batch.kernels.int4_moe import (
        GemmConfig,
        Int4Weight,
        _block_m,
        align_tokens_to_experts,
        default_config,
        expert_down,
        expert_gate_up,
    )

    e, k, h, i = (K2_MOE[x] for x in ("experts", "top_k", "hidden", "inter"))
    torch.manual_seed(0)

    def packed(rows, cols):
        words = torch.randint(-(2**31), 2**31 - 1, (e, rows, cols // 8), dtype=torch.int32, device=device)
        return Int4Weight(words, (torch.rand(e, rows, cols // 32, device=device) * 0.02 + 0.01).to(torch.bfloat16))

    w13, w2 = packed(2 * i, h), packed(h, i)
    per_expert = {
        name: w.packed[0].numel() * 4 + w.scale[0].numel() * 2 for name, w in (("gate_up", w13), ("down", w2))
    }
    results = []
    for phase, m in [("decode", m) for m in MOE_DECODE] + [("prefill", m) for m in MOE_PREFILL]:
        x = torch.randn(m, h, dtype=torch.bfloat16, device=device)
        topk_ids = torch.rand(m, e, device=device).topk(k, dim=1).indices
        topk_weights = torch.rand(m, k, device=device).softmax(dim=1)
        touched = topk_ids.unique().numel()
        candidates = (
            [(_block_m(m * k, e), *c) for c in MOE_DECODE_CANDIDATES] if phase == "decode" else MOE_PREFILL_CANDIDATES
        )
        default_bm = _block_m(m * k, e)
        hidden_in = torch.randn(m * k, i, dtype=torch.bfloat16, device=device)
        for gemm in ("gate_up", "down"):
            best, default_s = None, None
            for bm, bn, bk, warps, stages in candidates + [(default_bm, None, None, None, None)]:
                blocks = align_tokens_to_experts(topk_ids, e, bm)
                config = None if bn is None else GemmConfig(bn, bk, warps, stages)
                if gemm == "gate_up":
                    fn = lambda: expert_gate_up(x, w13, blocks, config=config)  # noqa: E731
                else:
                    fn = lambda: expert_down(hidden_in, w2, topk_weights, blocks, config=config)  # noqa: E731
                try:
                    fn()
                    seconds = measure_quick(fn)
                except Exception as exc:  # out of shared memory or registers: not a candidate
                    print(f"  skip {gemm} M={m} {(bm, bn, bk, warps, stages)}: {type(exc).__name__}")
                    continue
                if config is None:
                    default_s = seconds
                    config = default_config(bm, gemm == "gate_up")
                elif best is None or seconds < best[0]:
                    best = (seconds, bm, config)
            seconds, bm, config = best
            moved = touched * per_expert[gemm] + (m * h * 2 if gemm == "gate_up" else m * k * i * 2)
            flops = 2 * m * k * (2 if gemm == "gate_up" else 1) * h * i
            result = dict(
                case=f"{phase} M={m}",
                gemm=gemm,
                block_m=bm,
                block_n=config.block_n,
                block_k=config.block_k,
                num_warps=config.num_warps,
                num_stages=config.num_stages,
                ms=seconds * 1e3,
                default_ms=default_s * 1e3,
                pct_copy_bw=100 * moved / seconds / copy_bw,
                pct_matmul=100 * flops / seconds / matmul_rate,
            )
            results.append(result)
            print(
                f"moe {result['case']:<16} {gemm:<8} best bm={bm} bn={config.block_n} bk={config.block_k} "
                f"w={config.num_warps} s={config.num_stages}: {seconds * 1e3:.3f} ms (default {default_s * 1e3:.3f}) "
                f"{result['pct_copy_bw']:.1f}% copy {result['pct_matmul']:.1f}% mm",
                flush=True,
            )
    return results


def tune_mla(device, copy_bw) -> list[dict]:
    """Launch shapes of the split kernel on three cases, then the smallest split on the small batches."""
    from k2batch.kernels.mla_decode import mla_decode_triton

    heads, latent, rope = K2_MLA["heads"], K2_MLA["latent"], K2_MLA["rope"]
    dim = latent + rope
    results = []

    def inputs(batch, context):
        pages = -(-context // PAGE_SIZE)
        kv_cache = torch.randn(batch * pages, PAGE_SIZE, dim, dtype=torch.bfloat16, device=device)
        table = torch.randperm(batch * pages, device=device).view(batch, pages).int()
        lens = torch.full((batch,), context, dtype=torch.int32, device=device)
        q = torch.randn(batch, heads, dim, dtype=torch.bfloat16, device=device)
        return (q, kv_cache, table, lens, 192**-0.5, latent), batch * context * dim * 2

    shapes = [(bn, st, w) for bn in (16, 32, 64) for st in (1, 2, 3) for w in (4, 8)]
    for batch, context in [(1, 32768), (64, 8192), (256, 1024), (512, 8192)]:
        args, moved = inputs(batch, context)
        timed = []
        for bn, st, w in shapes:
            fn = lambda: mla_decode_triton(*args, block_n=bn, num_stages=st, num_warps=w)  # noqa: E731
            try:
                fn()
                timed.append((measure_quick(fn), bn, st, w))
            except Exception as exc:
                print(f"  skip mla B={batch} T={context} {(bn, st, w)}: {type(exc).__name__}")
        default_s = measure_quick(lambda: mla_decode_triton(*args))
        seconds, bn, st, w = min(timed)
        results.append(
            dict(
                case=f"B={batch} T={context}",
                block_n=bn,
                num_stages=st,
                num_warps=w,
                ms=seconds * 1e3,
                default_ms=default_s * 1e3,
                pct_copy_bw=100 * moved / seconds / copy_bw,
            )
        )
        print(
            f"mla B={batch} T={context}: best block_n={bn} stages={st} warps={w} {seconds * 1e3:.3f} ms "
            f"(default {default_s * 1e3:.3f}) {100 * moved / seconds / copy_bw:.1f}% copy",
            flush=True,
        )
    for batch, context in [(1, 1024), (1, 8192), (8, 1024), (8, 8192), (32, 1024)]:
        args, moved = inputs(batch, context)
        for min_split in (32, 64, 128, 256, 512):
            seconds = measure_quick(lambda: mla_decode_triton(*args, min_split=min_split))
            results.append(
                dict(
                    case=f"B={batch} T={context}",
                    min_split=min_split,
                    ms=seconds * 1e3,
                    pct_copy_bw=100 * moved / seconds / copy_bw,
                )
            )
            print(
                f"mla B={batch} T={context} min_split={min_split}: {seconds * 1e3:.4f} ms "
                f"{100 * moved / seconds / copy_bw:.1f}% copy",
                flush=True,
            )
    return results


def row(kernel, case, seconds, moved, flops, copy_bw, matmul_rate, target, ref_seconds, err) -> Row:
    return Row(
        kernel=kernel,
        case=case,
        ms=seconds * 1e3,
        gb_s=moved / seconds / 1e9,
        tflop_s=flops / seconds / 1e12,
        pct_copy_bw=100 * moved / seconds / copy_bw,
        pct_matmul=100 * flops / seconds / matmul_rate,
        target=target,
        reference_ms=None if ref_seconds is None else ref_seconds * 1e3,
        speedup=None if ref_seconds is None else ref_seconds / seconds,
        max_rel_err=err,
    )


def print_rows(rows: list[Row]) -> None:
    print(
        f"{'kernel':<5} {'case':<28} {'ms':>9} {'GB/s':>8} {'TFLOP/s':>8} {'%copy':>6} {'%mm':>6} {'target':>8} "
        f"{'ref ms':>9} {'speedup':>8} {'max err':>8}"
    )
    for r in rows:
        ref = "-" if r.reference_ms is None else f"{r.reference_ms:9.3f}"
        speedup = "-" if r.speedup is None else f"{r.speedup:7.1f}x"
        err = "-" if r.max_rel_err is None else f"{r.max_rel_err:8.1e}"
        print(
            f"{r.kernel:<5} {r.case:<28} {r.ms:9.3f} {r.gb_s:8.1f} {r.tflop_s:8.2f} {r.pct_copy_bw:5.1f}% "
            f"{r.pct_matmul:5.1f}% {r.target:>8} {ref:>9} {speedup:>8} {err:>8}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one call each; runs on CPU (interpreter)")
    parser.add_argument("--only", choices=["moe", "mla"], help="run one kernel's cases")
    parser.add_argument("--json", type=Path, help="also write the peaks and rows here")
    parser.add_argument("--tune", action="store_true", help="CUDA: sweep launch shapes per case before the roofline")
    parser.add_argument("--tune-only", action="store_true", help="with --tune: skip the roofline table")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        parser.error("the roofline needs a CUDA device; on CPU run --smoke")
    if not cuda:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are defined, i.e. at their import below
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name(device) if cuda else "cpu (Triton interpreter)"

    copy_bw, matmul_rate = device_peaks(device, args.smoke)
    print(f"{name}: copy {copy_bw / 1e9:.1f} GB/s, bf16 matmul {matmul_rate / 1e12:.2f} TFLOP/s (measured)")
    tuning = {}
    if args.tune:
        if not cuda:
            parser.error("--tune needs a CUDA device")
        if args.only in (None, "moe"):
            tuning["moe"] = tune_moe(device, copy_bw, matmul_rate)
        if args.only in (None, "mla"):
            tuning["mla"] = tune_mla(device, copy_bw)
    rows = []
    if args.tune_only:
        args.only = "none"
    if args.only in (None, "moe"):
        rows += bench_moe(device, copy_bw, matmul_rate, args.smoke)
    if args.only in (None, "mla"):
        rows += bench_mla(device, copy_bw, matmul_rate, args.smoke)
    print_rows(rows)
    if args.json:
        peaks = {"device": name, "copy_gb_s": copy_bw / 1e9, "bf16_matmul_tflop_s": matmul_rate / 1e12}
        args.json.write_text(
            json.dumps({**peaks, "rows": [asdict(r) for r in rows], "tuning": tuning}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
