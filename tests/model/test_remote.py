"""Checkpoints behind fsspec URIs stream tensor by tensor from byte ranges: no local copy, bounded reads."""

import re
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


def test_s3_checkpoint_matches_local(tmp_path, s3_bucket, s3_options):
    import s3fs

    local = _checkpoint(tmp_path, "int4")
    uri = f"{s3_bucket}/ckpt"
    s3fs.S3FileSystem(**s3_options).put(f"{local}/", f"{uri}/", recursive=True)
    model = load_model(uri, storage_options=s3_options)
    assert model.layers[1].mlp.experts.quantized
    assert torch.equal(model.score(_ids()), load_model(local).score(_ids()))


@pytest.mark.parametrize("kind", ["int4", "fp8_fused", "bf16_sharded"])
@pytest.mark.parametrize("where", ["local", "memory"])
def test_one_ranks_experts_read_alone(tmp_path, monkeypatch, kind, where):
    """A rank's share of the routed experts (3-5 of 8) loads to exactly the full model's experts, and storage gives
    it the shared weights and its own experts only: per-expert tensors of others are never read, stacked ones in
    part, and no read window reaches into another expert's bytes."""
    local = _checkpoint(tmp_path, kind)
    path, reads = str(local), []
    if where == "memory":
        fs = fsspec.filesystem("memory")
        path = f"memory:///share-{kind}"
        for f in local.iterdir():
            fs.pipe(f"/share-{kind}/{f.name}", f.read_bytes())
        monkeypatch.setattr(loader_module, "_WINDOW", 4096)  # windows smaller than the files, as on a real K2
        cat_file = MemoryFileSystem.cat_file

        def recording_cat_file(self, p, start=None, end=None, **kwargs):
            data = cat_file(self, p, start=start, end=end, **kwargs)
            if str(p).endswith(".safetensors") and start and start > 8:
                reads.append((str(p).rsplit("/", 1)[-1], start, start + len(data)))
            return data

        monkeypatch.setattr(MemoryFileSystem, "cat_file", recording_cat_file)
    full = load_model(local)
    share = load_model(path, experts=range(3, 6))
    for layer, whole in zip(share.layers[1:], full.layers[1:]):
        assert layer.mlp.expert_range == range(3, 6)
        for name, t in layer.mlp.experts.state_dict().items():
            assert torch.equal(t, whole.mlp.experts.state_dict()[name][3:6]), name
    tensors = scan_tensors(fsspec.filesystem("file"), str(local))
    total = sum(t.end - t.start for t in tensors.values())
    expert_bytes = sum(t.end - t.start for k, t in tensors.items() if ".mlp.experts." in k)
    own = total - expert_bytes + expert_bytes * 3 // 8
    if where == "local":  # exact: every tensor, or its rows, is read alone
        assert full.checkpoint_bytes_read == total and share.checkpoint_bytes_read == own
    else:
        others = []
        for key, t in tensors.items():
            m = re.search(r"\.experts\.(\d+)\.", key)
            if m and int(m.group(1)) not in range(3, 6):
                others.append((t.file, t.start, t.end))
            elif m is None and ".mlp.experts." in key:  # stacked: the rows of experts 0-2 and 6-7
                row = (t.end - t.start) // t.shape[0]
                others += [(t.file, t.start, t.start + 3 * row), (t.file, t.start + 6 * row, t.end)]
        for file, start, end in reads:
            assert not any(f == file and start < e and s < end for f, s, e in others), (file, start, end)
        assert own <= share.checkpoint_bytes_read < 1.5 * own
    with pytest.raises(ValueError, match="not a range within the model's 8 experts"):
        load_model(local, experts=range(6, 9))
