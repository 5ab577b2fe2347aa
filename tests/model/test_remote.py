"""Checkpoints behind fsspec URIs stream tensor by tensor from byte ranges: no local copy, bounded reads."""

from pathlib import Path

import fsspec
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem

from k2batch.model import load_model
from k2batch.model import loader as loader_module
from k2batch.model.loader import scan_tensors
from tests.checkpoints import compress_experts_int4, quantize_fp8, random_hf_model, save_hf
from tests.s3_server import s3_bucket, s3_endpoint, s3_options  # noqa: F401 (fixtures)


def _checkpoint(path: Path, kind: str) -> Path:
    hf = random_hf_model()
    if kind == "bf16_sharded":
        return save_hf(hf, path, dtype=torch.bfloat16, max_shard_size="100KB")
    if kind == "int4":  # weights, scales and shapes of an expert sit in different parts of the file
        compress_experts_int4(save_hf(hf, path, max_shard_size="150KB"))
    else:
        quantize_fp8(save_hf(hf, path, fused_experts=True), (24, 40))
    return path


def _ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("kind", ["bf16_sharded", "int4", "fp8_fused"])
def test_memory_uri_streams_byte_ranges(tmp_path, monkeypatch, kind):
    local = _checkpoint(tmp_path, kind)
    expected = load_model(local).score(_ids())
    fs = fsspec.filesystem("memory")
    root = f"/ckpt-{kind}"
    for f in local.iterdir():
        fs.pipe(f"{root}/{f.name}", f.read_bytes())

    window = 4096  # small, so both the windowed small reads and the one-request large reads run
    monkeypatch.setattr(loader_module, "_WINDOW", window)
    reads: list[tuple[str, int, int]] = []
    cat_file = MemoryFileSystem.cat_file

    def recording_cat_file(self, path, start=None, end=None, **kwargs):
        if str(path).endswith(".safetensors"):
            assert start is not None and end is not None, f"{path} read whole"
            reads.append((str(path), start, end))
        return cat_file(self, path, start=start, end=end, **kwargs)

    def no_copy(*args, **kwargs):
        raise AssertionError("the checkpoint was copied out of the filesystem")

    monkeypatch.setattr(MemoryFileSystem, "cat_file", recording_cat_file)
    monkeypatch.setattr(MemoryFileSystem, "get_file", no_copy)
    assert torch.equal(load_model(f"memory://{root}").score(_ids()), expected)

    largest = max(info.end - info.start for info in scan_tensors(fs, root).values())
    assert max(end - start for _, start, end in reads) <= max(window, largest)
    total = sum(f.stat().st_size for f in local.glob("*.safetensors"))
    assert sum(min(end, fs.size(p)) - start for p, start, end in reads) < 1.5 * total


def test_s3_checkpoint_matches_local(tmp_path, s3_bucket, s3_options):  # noqa: F811 (fixtures)
    import s3fs

    local = _checkpoint(tmp_path, "int4")
    uri = f"{s3_bucket}/ckpt"
    s3fs.S3FileSystem(**s3_options).put(f"{local}/", f"{uri}/", recursive=True)
    model = load_model(uri, storage_options=s3_options)
    assert model.layers[1].mlp.experts.quantized
    assert torch.equal(model.score(_ids()), load_model(local).score(_ids()))
