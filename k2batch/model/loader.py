"""Load an HF-style K2 / DeepSeek-V3 checkpoint (local path or fsspec URI) into K2ForCausalLM, tensor by tensor."""

from __future__ import annotations

import json
import logging
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import fsspec
import torch
from safetensors import safe_open

from k2batch.model.config import ModelConfig
from k2batch.model.model import K2ForCausalLM
from kernels.int4_moe import unpack_int4

log = logging.getLogger(__name__)

_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I32": torch.int32, "I64": torch.int64, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "F8_E4M3": torch.float8_e4m3fn,
}  # fmt: skip
_EXPERT = re.compile(r"layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)$")
_FUSED_EXPERTS = re.compile(r"layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_LAYER = re.compile(r"layers\.(\d+)\.")
_COMPANIONS = ("weight_scale_inv", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")


class CheckpointError(ValueError):
    """The checkpoint does not match the architecture its config.json describes."""


@dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: str
    shape: tuple[int, ...]


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}  # fmt: skip
    if dtype not in names:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(names)}")
    return names[dtype]


def read_config(path: str) -> ModelConfig:
    fs, root = fsspec.core.url_to_fs(path)
    config_path = f"{root.rstrip('/')}/config.json"
    if not fs.exists(config_path):
        raise CheckpointError(f"{path}: no config.json")
    with fs.open(config_path, "rb") as f:
        return ModelConfig.from_dict(json.load(f))


@contextmanager
def local_checkpoint(path: str) -> Iterator[Path]:
    """The checkpoint as a local directory: itself if local, else its files copied to a temporary directory
    (safetensors memory-maps local files, so tensors stream from disk instead of being held twice)."""
    fs, root = fsspec.core.url_to_fs(path)
    if "file" in fs.protocol or "local" in fs.protocol:
        yield Path(root)
        return
    with tempfile.TemporaryDirectory(prefix="k2batch-ckpt-") as tmp:
        for remote in fs.ls(root, detail=False):
            name = remote.rstrip("/").rsplit("/", 1)[-1]
            if name.endswith((".safetensors", ".json")):
                fs.get(remote, f"{tmp}/{name}")
        yield Path(tmp)


def scan_tensors(root: Path) -> dict[str, TensorInfo]:
    """Every tensor's file, dtype and shape, from the safetensors headers alone."""
    index = root / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in root.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{root}: no *.safetensors files")
    tensors: dict[str, TensorInfo] = {}
    for name in files:
        with open(root / name, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for key, meta in header.items():
            if key != "__metadata__":
                tensors[key] = TensorInfo(name, meta["dtype"], tuple(meta["shape"]))
    return tensors


def _strip(key: str) -> str:
    return key[len("model.") :] if key.startswith("model.") else key


def load_model(path: str | Path, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu") -> K2ForCausalLM:
    """Build K2ForCausalLM from a checkpoint directory or fsspec URI.

    Routed experts stored as compressed-tensors INT4 stay packed; block-FP8 weights are dequantized on load; every
    other weight is cast to `dtype`. Errors name the tensor and what was expected.
    """
    path = str(path)
    dtype = parse_dtype(dtype)
    config = read_config(path)
    with local_checkpoint(path) as root:
        tensors = scan_tensors(root)
        int4_scale_dtype = _int4_expert_scale_dtype(tensors, config)
        with torch.device("meta"):
            model = K2ForCausalLM(config, int4_scale_dtype)
            for p in model.parameters():  # buffers keep their own dtypes (fp32 router bias, INT4 words/scales)
                p.data = p.data.to(dtype)
        model.to_empty(device=device)
        _fill(model, config, root, tensors, dtype)
    model.eval().requires_grad_(False)
    return model


def _int4_expert_scale_dtype(tensors: dict[str, TensorInfo], config: ModelConfig) -> torch.dtype | None:
    packed = [k for k in tensors if _EXPERT.search(k.removesuffix(".weight_packed")) and k.endswith(".weight_packed")]
    if not packed:
        return None
    if config.quantization is None or config.quantization.method != "int4":
        raise CheckpointError(f"{packed[0]} is INT4-packed but config.json has no compressed-tensors quantization_config")
    scale_key = packed[0].replace("weight_packed", "weight_scale")
    if scale_key not in tensors:
        raise CheckpointError(f"missing tensor {scale_key} (the scales of {packed[0]})")
    return _DTYPES[tensors[scale_key].dtype]


class _Filler:
    """Copies checkpoint tensors into the model's (possibly stacked) parameters and tracks what was filled."""

    def __init__(self, model: K2ForCausalLM, root: Path, tensors: dict[str, TensorInfo], dtype: torch.dtype):
        self.targets = dict(model.named_parameters()) | dict(model.named_buffers())
        self.root, self.tensors, self.dtype = root, tensors, dtype
        self.filled: set[tuple[str, int, int]] = set()  # (target, expert or -1, row offset)
        self._files = ExitStack()
        self._handles: dict[str, object] = {}

    def get(self, key: str) -> torch.Tensor:
        info = self.tensors.get(key)
        if info is None:
            raise CheckpointError(f"missing tensor {key}")
        if info.file not in self._handles:
            self._handles[info.file] = self._files.enter_context(safe_open(self.root / info.file, "pt"))
        return self._handles[info.file].get_tensor(key)

    def dense_weight(self, key_prefix: str) -> torch.Tensor:
        """The float weight of a linear `key_prefix`, dequantizing INT4 or block-FP8 storage."""
        if f"{key_prefix}.weight_packed" in self.tensors:
            w = unpack_int4(self.get(f"{key_prefix}.weight_packed"), self.get(f"{key_prefix}.weight_scale"), torch.float32)
            self._check_shape(f"{key_prefix}.weight_shape", w.shape)
            return w
        w = self.get(f"{key_prefix}.weight")
        if w.dtype == torch.float8_e4m3fn:
            return _dequantize_fp8_block(w, self.get(f"{key_prefix}.weight_scale_inv"), key_prefix)
        return w

    def _check_shape(self, shape_key: str, shape: torch.Size) -> None:
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

    def close(self) -> None:
        self._files.close()


def _dequantize_fp8_block(w: torch.Tensor, scale_inv: torch.Tensor, name: str) -> torch.Tensor:
    out, inp = w.shape
    bo, bi = -(-out // scale_inv.shape[0]), -(-inp // scale_inv.shape[1])
    if scale_inv.shape != (-(-out // bo), -(-inp // bi)):
        raise CheckpointError(f"{name}.weight_scale_inv: shape {tuple(scale_inv.shape)} does not tile {tuple(w.shape)}")
    scale = scale_inv.float().repeat_interleave(bo, 0)[:out].repeat_interleave(bi, 1)[:, :inp]
    return w.float() * scale


def _fill(model: K2ForCausalLM, config: ModelConfig, root: Path, tensors: dict[str, TensorInfo], dtype: torch.dtype) -> None:
    filler = _Filler(model, root, tensors, dtype)
    inter = config.moe_intermediate_size
    unexpected: list[str] = []
    try:
        with torch.no_grad():
            for key in sorted(tensors, key=lambda k: (tensors[k].file, k)):
                name = _strip(key)
                if name.endswith("rotary_emb.inv_freq") or name.rsplit(".", 1)[-1] in _COMPANIONS:
                    continue
                layer = _LAYER.match(name)
                if layer and int(layer.group(1)) >= config.num_hidden_layers:
                    continue  # multi-token-prediction layers: not used for generation
                prefix, _, leaf = name.rpartition(".")
                expert = _EXPERT.search(prefix)
                if expert and leaf in ("weight", "weight_packed"):
                    i, e, proj = int(expert.group(1)), int(expert.group(2)), expert.group(3)
                    stack, row = ("w2", 0) if proj == "down_proj" else ("w13", inter if proj == "up_proj" else 0)
                    base = f"layers.{i}.mlp.experts"
                    if model.layers[i].mlp.experts.quantized:
                        if leaf != "weight_packed":
                            raise CheckpointError(f"{key}: expected INT4-packed experts like the other experts of the model")
                        packed, scale = filler.get(key), filler.get(key.replace("weight_packed", "weight_scale"))
                        filler._check_shape(key.replace("weight_packed", "weight_shape"), torch.Size((packed.shape[0], packed.shape[1] * 8)))
                        filler.copy(f"{base}.{stack}_packed", packed, key, e, row)
                        filler.copy(f"{base}.{stack}_scale", scale, key.replace("weight_packed", "weight_scale"), e, row)
                    else:
                        filler.copy(f"{base}.{stack}", filler.dense_weight(key.rpartition(".")[0]), key, e, row)
                    continue
                fused = _FUSED_EXPERTS.search(name)
                if fused:
                    stack = "w13" if fused.group(2) == "gate_up_proj" else "w2"
                    src = filler.get(key)
                    for e in range(src.shape[0]):
                        filler.copy(f"layers.{fused.group(1)}.mlp.experts.{stack}", src[e], key, e, 0)
                    continue
                if leaf in ("weight", "weight_packed") and f"{prefix}.weight" in filler.targets:
                    filler.copy(f"{prefix}.weight", filler.dense_weight(key.rpartition(".")[0]), key)
                elif name in filler.targets:
                    filler.copy(name, filler.get(key), key)
                else:
                    unexpected.append(key)
    finally:
        filler.close()

    if config.tie_word_embeddings and ("lm_head.weight", -1, 0) not in filler.filled:
        model.lm_head.weight = model.embed_tokens.weight
        filler.filled.add(("lm_head.weight", -1, 0))
    missing = _missing(model, config, filler.filled)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"missing tensors: {', '.join(missing[:5])}{more}")
    if unexpected:
        log.warning("ignored %d checkpoint tensors the model does not use, e.g. %s", len(unexpected), unexpected[:3])


def _missing(model: K2ForCausalLM, config: ModelConfig, filled: set[tuple[str, int, int]]) -> list[str]:
    missing = []
    inter = config.moe_intermediate_size
    for name, _ in list(model.named_parameters()) + list(model.named_buffers()):
        m = re.match(r"layers\.(\d+)\.mlp\.experts\.(w13|w2)(_packed|_scale)?$", name)
        if not m:
            if (name, -1, 0) not in filled:
                missing.append(f"model.{name}" if not name.startswith("lm_head") else name)
            continue
        layer, stack = m.group(1), m.group(2)
        parts = [("down_proj", 0)] if stack == "w2" else [("gate_proj", 0), ("up_proj", inter)]
        for e in range(config.n_routed_experts):
            for proj, row in parts:
                if (name, e, row) not in filled:
                    missing.append(f"model.layers.{layer}.mlp.experts.{e}.{proj}")
    return sorted(set(missing))
