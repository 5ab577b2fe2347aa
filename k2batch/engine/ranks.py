"""The rank processes of a data-parallel engine: each loads the shared weights and its own experts, holds its own
KV cache, and executes the plans its scheduler (in the user's process) sends it; all ranks step together.

Plans and results cross the process boundary as pickled bytes over a pipe; the MoE exchange between ranks goes
through torch.distributed. A rank that dies, fails or does not answer in time ends the engine with a RankFailure
naming it, within the configured timeout; nothing waits forever.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import socket
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from k2batch.engine.config import EngineConfig
from k2batch.engine.plan import StepPlan, StepResult

log = logging.getLogger(__name__)


class RankFailure(RuntimeError):
    """A rank process died, raised, or did not answer in time; the engine cannot go on."""


@dataclass(frozen=True)
class RankSpec:
    path: str
    config: EngineConfig
    storage_options: dict[str, Any] | None
    num_blocks: int
    rank: int
    world_size: int
    port: int
    threads: int


@dataclass(frozen=True)
class RankInfo:
    """What a rank reports once loaded."""

    rank: int
    experts: range
    checkpoint_bytes_read: int
    device: str


def _rank_main(spec: RankSpec, conn) -> None:
    """A rank process: load, then execute plans until told to stop or the engine's end of the pipe closes."""
    import torch.distributed as dist

    from k2batch.engine.expert_parallel import enable_expert_parallel, expert_range, join_moe_layers
    from k2batch.engine.model_runner import ModelRunner
    from k2batch.model import load_model
    from k2batch.model.layers import RoutedExperts
    from k2batch.model.loader import read_config

    config = spec.config
    try:
        cuda = config.device.startswith("cuda")
        device = f"cuda:{spec.rank}" if cuda else config.device
        if cuda:
            torch.cuda.set_device(device)
        else:
            torch.set_num_threads(spec.threads)
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the ranks of one machine talk over loopback
        dist.init_process_group(
            "nccl" if cuda else "gloo",
            init_method=f"tcp://127.0.0.1:{spec.port}",
            rank=spec.rank,
            world_size=spec.world_size,
            timeout=timedelta(seconds=config.rank_timeout_s),
        )
        experts = expert_range(
            read_config(spec.path, spec.storage_options).n_routed_experts, spec.rank, spec.world_size
        )
        model = load_model(spec.path, config.dtype, device, spec.storage_options, experts=experts)
        if config.dequantize_int4:
            for module in model.modules():
                if isinstance(module, RoutedExperts):
                    module.dequantize_(model.dtype)
        enable_expert_parallel(model)
        runner = ModelRunner(model, config, spec.num_blocks)
        _send(conn, ("ready", RankInfo(spec.rank, experts, model.checkpoint_bytes_read, str(model.device))))
    except BaseException:
        _send(conn, ("error", traceback.format_exc()))
        return
    try:
        while True:
            try:
                kind, plan = pickle.loads(conn.recv_bytes())
            except EOFError:  # the engine's process is gone
                return
            if kind == "close":
                return
            try:
                if plan is None:
                    join_moe_layers(model)
                    result = None
                else:
                    result = runner.execute(plan)
            except BaseException:
                _send(conn, ("error", traceback.format_exc()))
                return
            _send(conn, ("result", result))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _send(conn, message: tuple) -> None:
    try:
        conn.send_bytes(pickle.dumps(message))
    except (BrokenPipeError, OSError):
        pass  # the engine's end is gone; the rank exits next


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankGroup:
    """The engine's handle on its rank processes (spawned, so CUDA and thread pools start clean in each)."""

    def __init__(self, path: str, config: EngineConfig, storage_options: dict[str, Any] | None, num_blocks: int):
        self.size = config.data_parallel_size
        self.timeout_s = config.rank_timeout_s
        self.steps = 0
        ctx = mp.get_context("spawn")
        port = _free_port()
        threads = max(1, (os.cpu_count() or 1) // self.size)
        self._procs: list[mp.Process] = []
        self._conns = []
        for rank in range(self.size):
            ours, theirs = ctx.Pipe()
            spec = RankSpec(path, config, storage_options, num_blocks, rank, self.size, port, threads)
            proc = ctx.Process(target=_rank_main, args=(spec, theirs), name=f"k2batch-rank-{rank}", daemon=True)
            proc.start()
            theirs.close()
            self._procs.append(proc)
            self._conns.append(ours)
        try:
            self.info: list[RankInfo] = self._gather("loading", "ready", config.rank_start_timeout_s)
        except BaseException:
            self.close(grace_s=1.0)
            raise
        log.info(
            "%d ranks ready: %s",
            self.size,
            ", ".join(f"{i.device} experts {i.experts.start}-{i.experts.stop - 1}" for i in self.info),
        )

    def execute(self, plans: list[StepPlan | None]) -> list[StepResult | None]:
        """Run one step on every rank (a rank without a plan joins the MoE exchanges only); their results."""
        if not self._procs:
            raise RankFailure("the engine's ranks were shut down after an earlier failure; build a new engine")
        self.steps += 1
        try:
            for conn, plan in zip(self._conns, plans):
                conn.send_bytes(pickle.dumps(("step", plan)))
            return self._gather(f"step {self.steps}", "result", self.timeout_s)
        except BaseException:
            self.close(grace_s=1.0)
            raise

    def _gather(self, what: str, expected: str, timeout_s: float) -> list[Any]:
        """Every rank's reply. A rank that failed, died or is silent past the deadline fails the whole group; once
        one has failed the others get a moment to report, since a rank that hangs or dies usually shows up first
        as a collective timing out on its peers."""
        deadline = time.monotonic() + timeout_s
        replies: dict[int, Any] = {}
        failures: dict[int, str] = {}
        pending = set(range(self.size))
        grace_end = None
        while pending:
            for rank in sorted(pending):
                conn, proc = self._conns[rank], self._procs[rank]
                try:
                    kind, payload = pickle.loads(conn.recv_bytes()) if conn.poll() else (None, None)
                except (EOFError, OSError):
                    kind, payload = "gone", None
                if kind == expected:
                    replies[rank] = payload
                elif kind == "error":
                    failures[rank] = f"rank {rank} failed:\n{payload}"
                elif kind == "gone" or not proc.is_alive():
                    proc.join(0.5)
                    failures[rank] = f"rank {rank} exited with code {proc.exitcode}"
                else:
                    continue
                pending.discard(rank)
            now = time.monotonic()
            if failures and grace_end is None:
                grace_end = now + 2.0
            if pending and (now > deadline or (grace_end is not None and now > grace_end)):
                break
            if pending:
                mp.connection.wait([self._conns[r] for r in pending], timeout=0.05)
        if not failures and not pending:
            return [replies[r] for r in range(self.size)]
        silent = [
            f"rank {r} did not answer within {timeout_s:g} s"
            if time.monotonic() > deadline
            else f"rank {r} did not answer"
            for r in sorted(pending)
        ]
        # The dead and the silent first: they are the cause; their peers' collectives time out after them.
        ordered = sorted(failures.items(), key=lambda item: "failed" in item[1])
        reasons = silent + [reason for _, reason in ordered]
        raise RankFailure(f"during {what}: " + "; ".join(reasons) + " (EngineConfig.rank_timeout_s bounds each step)")

    def close(self, grace_s: float = 5.0) -> None:
        """Stop every rank: ask, then terminate, then kill what is left."""
        for conn in self._conns:
            try:
                conn.send_bytes(pickle.dumps(("close", None)))
            except (BrokenPipeError, OSError):
                pass
        deadline = time.monotonic() + grace_s
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()  # SIGKILL: a stopped or hung rank does not act on SIGTERM
                proc.join(2.0)
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]
