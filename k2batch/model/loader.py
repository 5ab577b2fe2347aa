"""Load an HF-style K2 / DeepSeek-V3 checkpoint (local path or fsspec URI) into K2ForCausalLM, tensor by tensor."""

from __future__ import annotations

import bisect
import json
import logging
import re
import struct
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fsspec import AbstractFileSystem
from safetensors import safe_open

from k2batch.kernels.int4_moe import unpack_int4
from k2batch.model.config import ModelConfig
from k2batch.model.model import K2ForCausalLM
from k2batch.storage import filesystem

log = logging.getLogger(__name__)

_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I32": torch.int32,
    "I64": torch.int64,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "F8_E4M3": torch.float8_e4m3fn,
}
_EXPERT = re.compile(r"layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)$")
# transformers 5 holds each layer's experts stacked (gate||up [E, 2I, H], down [E, H, I]) and writes them so
# with save_pretrained(save_original_format=False); FP8 scales then sit beside them as `..._scale_inv`.
_FUSED_EXPERTS = re.compile(r"layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_LAYER = re.compile(r"layers\.(\d+)\.")
_COMPANIONS = ("weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")  # read with their weight
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header
# Remote reads: a tensor of _WINDOW bytes or more is one ranged read; smaller ones come out of the last
# _WINDOWS windows read, since a K2 file holds thousands of small tensors (a request each would take hours on S3)
# and the weights of a layer and their scales lie in different parts of the file.
_WINDOW = 8 << 20
_WINDOWS = 4


class CheckpointError(ValueError):
    """The checkpoint does not match the architecture its config.json describes."""


@dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # byte range of the data within the file
    end: int


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in names:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(names)}")
    return names[dtype]


def read_config(path: str, storage_options: Mapping[str, Any] | None = None) -> ModelConfig:
    fs, root = filesystem(str(path), storage_options)
    config_path = f"{root.rstrip('/')}/config.json"
    if not fs.exists(config_path):
        raise CheckpointError(f"{path}: no config.json")
    with fs.open(config_path, "rb") as f:
        return ModelConfig.from_dict(json.load(f))


def scan_tensors(fs: AbstractFileSystem, root: str) -> dict[str, TensorInfo]:
    """Every tensor's file, dtype, shape and byte range, from the safetensors headers alone."""
    index = f"{root}/model.safetensors.index.json"
    if fs.exists(index):
        with fs.open(index, "rb") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        names = (p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
        files = sorted(n for n in names if n.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{root}: no *.safetensors files")
    tensors: dict[str, TensorInfo] = {}
    for name in files:
        head = fs.cat_file(f"{root}/{name}", start=0, end=8)  # little-endian u64 length, then the JSON header
        size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < size <= _MAX_HEADER:
            raise CheckpointError(f"{root}/{name}: not a safetensors file")
        header = json.loads(fs.cat_file(f"{root}/{name}", start=8, end=8 + size))
        for key, meta in header.items():
            if key != "__metadata__":
                begin, end = meta["data_offsets"]
                tensors[key] = TensorInfo(name, meta["dtype"], tuple(meta["shape"]), 8 + size + begin, 8 + size + end)
    return tensors


def _rows(info: TensorInfo, rows: range) -> TensorInfo:
    """The byte range of rows `rows` (of the first dimension) of a tensor."""
    row_bytes = (info.end - info.start) // info.shape[0] if info.shape and info.shape[0] else 0
    return TensorInfo(
        info.file,
        info.dtype,
        (len(rows), *info.shape[1:]),
        info.start + rows.start * row_bytes,
        info.start + rows.stop * row_bytes,
    )


class _LocalTensors:
    """Tensors of local safetensors files, memory-mapped by safetensors: each is read when it is asked for."""

    def __init__(self, root: str):
        self.root = Path(root)
        self._files = ExitStack()
        self._handles: dict[str, Any] = {}
        self.bytes_read = 0

    def get(self, key: str, info: TensorInfo, rows: range | None = None) -> torch.Tensor:
        if info.file not in self._handles:
            self._handles[info.file] = self._files.enter_context(safe_open(self.root / info.file, "pt"))
        handle = self._handles[info.file]
        if rows is None:
            self.bytes_read += info.end - info.start
            return handle.get_tensor(key)
        part = _rows(info, rows)
        self.bytes_read += part.end - part.start
        return handle.get_slice(key)[rows.start : rows.stop]

    def close(self) -> None:
        self._files.close()


class _RemoteTensors:
    """Tensors of safetensors files behind fsspec, each built from its byte range as it is asked for: nothing is
    copied to local disk, and memory holds one tensor (plus a few small-read windows) beyond the model."""

    def __init__(self, fs: AbstractFileSystem, root: str, skipped: dict[str, list[int]] | None = None):
        """`skipped`: per file, the sorted start offsets of byte ranges the load never needs (another rank's
        experts); a window stops short of them, so a rank reads little beyond its own share."""
        self.fs, self.root = fs, root
        self._windows: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._skipped = skipped or {}
        self.bytes_read = 0

    def get(self, key: str, info: TensorInfo, rows: range | None = None) -> torch.Tensor:
        if rows is not None:
            info = _rows(info, rows)
        if info.dtype not in _DTYPES:
            raise CheckpointError(f"{key}: dtype {info.dtype} is not supported")
        data = self._read(info.file, info.start, info.end)
        if len(data) != info.end - info.start:
            raise CheckpointError(f"{key}: {info.file} ends after {len(data)} of its {info.end - info.start} bytes")
        if not data:
            return torch.empty(info.shape, dtype=_DTYPES[info.dtype])
        with warnings.catch_warnings():
            # The bytes are read-only; the loader only ever copies out of them, so no writable copy is needed.
            warnings.filterwarnings("ignore", "The given buffer is not writable")
            return torch.frombuffer(data, dtype=_DTYPES[info.dtype]).reshape(info.shape)

    def _read(self, file: str, start: int, end: int) -> bytes | memoryview:
        path = f"{self.root}/{file}"
        if end - start >= _WINDOW:
            self.bytes_read += end - start
            return self.fs.cat_file(path, start=start, end=end)
        for (w_file, w_start), window in self._windows.items():
            if w_file == file and w_start <= start and end <= w_start + len(window):
                self._windows.move_to_end((w_file, w_start))
                return memoryview(window)[start - w_start : end - w_start]
        stops = self._skipped.get(file, [])
        i = bisect.bisect_left(stops, end)
        window_end = min(start + _WINDOW, stops[i]) if i < len(stops) else start + _WINDOW
        window = self.fs.cat_file(path, start=start, end=max(end, window_end))
        self.bytes_read += len(window)
        self._windows[(file, start)] = window
        if len(self._windows) > _WINDOWS:
            self._windows.popitem(last=False)
        return memoryview(window)[: end - start]

    def close(self) -> None:
        self._windows.clear()


def _is_local(fs: AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return bool({"file", "local"} & set(protocols))


def _strip(key: str) -> str:
    return key[len("model.") :] if key.startswith("model.") else key


def load_model(
    path: str | Path,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    storage_options: Mapping[str, Any] | None = None,
    experts: range | None = None,
) -> K2ForCausalLM:
    """Build K2ForCausalLM from a checkpoint directory or fsspec URI (`storage_options` go to object stores).

    Routed experts stored as compressed-tensors INT4 stay packed; block-FP8 weights are dequantized on load; every
    other weight is cast to `dtype`. Errors name the tensor and what was expected. `experts` loads only those
    routed experts (a rank's share under expert parallelism): the others' bytes are never read.
    `model.checkpoint_bytes_read` tells how many bytes came from storage.
    """
    config = read_config(str(path), storage_options)
    dtype = parse_dtype(dtype)
    if experts is not None and not (
        0 <= experts.start <= experts.stop <= config.n_routed_experts and experts.step == 1
    ):
        raise ValueError(f"experts {experts} is not a range within the model's {config.n_routed_experts} experts")
    fs, root = filesystem(str(path), storage_options)
    root = root.rstrip("/")
    tensors = scan_tensors(fs, root)
    int4_scale_dtype = _int4_expert_scale_dtype(tensors, config)
    with torch.device("meta"):
        model = K2ForCausalLM(config, int4_scale_dtype, experts)
        for p in model.parameters():  # buffers keep their own dtypes (fp32 router bias, INT4 words/scales)
            p.data = p.data.to(dtype)
    model.to_empty(device=device)
    share = experts or range(config.n_routed_experts)
    reader = _LocalTensors(root) if _is_local(fs) else _RemoteTensors(fs, root, _skipped(tensors, config, share))
    try:
        _fill(model, config, _Filler(model, reader, tensors, config), share)
    finally:
        reader.close()
    model.eval().requires_grad_(False)
    model.checkpoint_bytes_read = reader.bytes_read
    return model


def _skipped(tensors: dict[str, TensorInfo], config: ModelConfig, experts: range) -> dict[str, list[int]]:
    """Per file, the sorted starts of the byte ranges a load of `experts` never reads: other experts' tensors (with
    their companions) and the other rows of stacked expert tensors."""
    starts: dict[str, list[int]] = {}
    for key, info in tensors.items():
        name = _strip(key)
        expert = _EXPERT.search(name.rpartition(".")[0])
        fused = _FUSED_EXPERTS.search(name.removesuffix("_scale_inv"))
        if expert and int(expert.group(2)) not in experts:
            starts.setdefault(info.file, []).append(info.start)
        elif fused and len(experts) < config.n_routed_experts and info.shape:
            # Rows before the share start where the tensor does; the rows after it, where the share ends.
            if experts.start > 0:
                starts.setdefault(info.file, []).append(info.start)
            if experts.stop < info.shape[0]:
                starts.setdefault(info.file, []).append(_rows(info, range(experts.stop, info.shape[0])).start)
    return {file: sorted(s) for file, s in starts.items()}


def _int4_expert_scale_dtype(tensors: dict[str, TensorInfo], config: ModelConfig) -> torch.dtype | None:
    packed = [k for k in tensors if k.endswith(".weight_packed") and _EXPERT.search(k.removesuffix(".weight_packed"))]
    if not packed:
        return None
    if config.quantization is None or config.quantization.method != "int4":
        raise CheckpointError(
            f"{packed[0]} is INT4-packed but config.json has no compressed-tensors quantization_config"
        )
    scale_key = packed[0].replace("weight_packed", "weight_scale")
    if scale_key not in tensors:
        raise CheckpointError(f"missing tensor {scale_key} (the scales of {packed[0]})")
    return _DTYPES[tensors[scale_key].dtype]


def dequantize_fp8_block(
    w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], scale_key: str
) -> torch.Tensor:
    """Float32 weight of an e4m3 `w` [..., out, in] stored in `block` tiles, each with its factor in `scale_inv`
    [..., ceil(out/b0), ceil(in/b1)]; edge tiles are partial (K2's kv_a_proj_with_mqa has 576 rows in [128, 128])."""
    *lead, out, inp = w.shape
    b0, b1 = block
    expected = (*lead, -(-out // b0), -(-inp // b1))
    if tuple(scale_inv.shape) != expected:
        raise CheckpointError(
            f"{scale_key}: shape {tuple(scale_inv.shape)}, expected {expected} for a {tuple(w.shape)} weight "
            f"in the [{b0}, {b1}] blocks of config.json's weight_block_size"
        )
    scale = scale_inv.float().repeat_interleave(b0, -2)[..., :out, :].repeat_interleave(b1, -1)[..., :inp]
    return w.float() * scale


class _Filler:
    """Copies checkpoint tensors into the model's (possibly stacked) parameters and tracks what was filled."""

    def __init__(
        self,
        model: K2ForCausalLM,
        reader: _LocalTensors | _RemoteTensors,
        tensors: dict[str, TensorInfo],
        config: ModelConfig,
    ):
        self.targets = dict(model.named_parameters()) | dict(model.named_buffers())
        self.reader, self.tensors = reader, tensors
        quant = config.quantization
        self.fp8_block = quant.block_size if quant is not None and quant.method == "fp8_block" else None
        self.filled: set[tuple[str, int, int]] = set()  # (target, expert or -1, row offset); (target, -1, 0): all of it

    def get(self, key: str, rows: range | None = None) -> torch.Tensor:
        """The tensor stored under `key`, or only its `rows` (of the first dimension): only those bytes are read."""
        info = self.tensors.get(key)
        if info is None:
            raise CheckpointError(f"missing tensor {key}")
        return self.reader.get(key, info, rows)

    def float_weight(self, key: str, rows: range | None = None) -> torch.Tensor:
        """The float weight stored under `key`, dequantizing INT4 (`*.weight_packed`) or block-FP8 storage."""
        if key.endswith(".weight_packed"):
            base = key.removesuffix("_packed")
            w = unpack_int4(self.get(key), self.get(f"{base}_scale"), torch.float32)
            self.check_shape(f"{base}_shape", w.shape)
            return w
        w = self.get(key, rows)
        if w.dtype != torch.float8_e4m3fn:
            return w
        if self.fp8_block is None:
            raise CheckpointError(f"{key} is FP8 but config.json has no fp8 quantization_config (weight_block_size)")
        scale = self.get(f"{key}_scale_inv", rows)
        return dequantize_fp8_block(w, scale, self.fp8_block, f"{key}_scale_inv")

    def check_shape(self, shape_key: str, shape: torch.Size) -> None:
        if shape_key in self.tensors:
            stored = tuple(int(x) for x in self.get(shape_key).tolist())
            if stored != tuple(shape):
                raise CheckpointError(f"{shape_key} says {stored} but the packed weight unpacks to {tuple(shape)}")

    def copy(self, target: str, src: torch.Tensor, key: str, expert: int = -1, row: int = 0) -> None:
        if target not in self.targets:
            raise CheckpointError(f"{key}: the model has no parameter {target}")
        dst = self.targets[target]
        if expert >= 0:
            dst = dst[expert]
        dst = dst[row : row + src.shape[0]] if (expert >= 0 or row) else dst
        if tuple(dst.shape) != tuple(src.shape):
            raise CheckpointError(f"{key}: shape {tuple(src.shape)}, expected {tuple(dst.shape)} for {target}")
        dst.copy_(src.to(dst.dtype))
        self.filled.add((target, expert, row))


def _fill(model: K2ForCausalLM, config: ModelConfig, filler: _Filler, experts: range) -> None:
    tensors, inter = filler.tensors, config.moe_intermediate_size
    unexpected: list[str] = []
    with torch.no_grad():
        # In file order, so remote reads move forward through each file.
        for key in sorted(tensors, key=lambda k: (tensors[k].file, tensors[k].start)):
            name = _strip(key)
            prefix, _, leaf = name.rpartition(".")
            if leaf in _COMPANIONS or leaf.endswith("_scale_inv") or name.endswith("rotary_emb.inv_freq"):
                continue  # companions are read with their weight; rope frequencies come from config.json
            layer = _LAYER.match(name)
            if layer and int(layer.group(1)) >= config.num_hidden_layers:
                continue  # multi-token-prediction layers: not used for generation
            expert = _EXPERT.search(prefix)
            fused = _FUSED_EXPERTS.search(name)
            if expert and leaf in ("weight", "weight_packed"):
                i, e, proj = int(expert.group(1)), int(expert.group(2)), expert.group(3)
                if e not in experts:
                    continue  # another rank's expert
                e -= experts.start
                stack, row = ("w2", 0) if proj == "down_proj" else ("w13", inter if proj == "up_proj" else 0)
                base = f"layers.{i}.mlp.experts"
                if model.layers[i].mlp.experts.quantized:
                    if leaf != "weight_packed":
                        raise CheckpointError(f"{key}: expected INT4-packed experts like the model's other experts")
                    scale_key = key.replace("weight_packed", "weight_scale")
                    packed, scale = filler.get(key), filler.get(scale_key)
                    unpacked = torch.Size((packed.shape[0], packed.shape[1] * 8))
                    filler.check_shape(key.replace("weight_packed", "weight_shape"), unpacked)
                    filler.copy(f"{base}.{stack}_packed", packed, key, e, row)
                    filler.copy(f"{base}.{stack}_scale", scale, scale_key, e, row)
                else:
                    filler.copy(f"{base}.{stack}", filler.float_weight(key), key, e, row)
            elif fused:
                stack = "w13" if fused.group(2) == "gate_up_proj" else "w2"
                rows = experts if len(experts) < config.n_routed_experts else None
                filler.copy(f"layers.{fused.group(1)}.mlp.experts.{stack}", filler.float_weight(key, rows), key)
            elif leaf in ("weight", "weight_packed") and f"{prefix}.weight" in filler.targets:
                filler.copy(f"{prefix}.weight", filler.float_weight(key), key)
            elif name in filler.targets:
                filler.copy(name, filler.get(key), key)
            else:
                unexpected.append(key)

    if config.tie_word_embeddings and ("lm_head.weight", -1, 0) not in filler.filled:
        model.lm_head.weight = model.embed_tokens.weight
        filler.filled.add(("lm_head.weight", -1, 0))
    missing = _missing(model, config, filler.filled, experts)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"missing tensors: {', '.join(missing[:5])}{more}")
    if unexpected:
        log.warning("ignored %d checkpoint tensors the model does not use, e.g. %s", len(unexpected), unexpected[:3])


def _missing(model: K2ForCausalLM, config: ModelConfig, filled: set[tuple[str, int, int]], experts: range) -> list[str]:
    missing = []
    inter = config.moe_intermediate_size
    for name, _ in list(model.named_parameters()) + list(model.named_buffers()):
        if (name, -1, 0) in filled:
            continue
        m = re.match(r"layers\.(\d+)\.mlp\.experts\.(w13|w2)(_packed|_scale)?$", name)
        if not m:
            missing.append(f"model.{name}" if not name.startswith("lm_head") else name)
            continue
        layer, stack = m.group(1), m.group(2)
        parts = [("down_proj", 0)] if stack == "w2" else [("gate_proj", 0), ("up_proj", inter)]
        for e in experts:
            for proj, row in parts:
                if (name, e - experts.start, row) not in filled:
                    missing.append(f"model.layers.{layer}.mlp.experts.{e}.{proj}")
    return sorted(set(missing))
