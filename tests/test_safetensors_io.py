import pytest
import torch
from safetensors.torch import load_file, save_file

from workers.tensors.safetensors_io import (
    PlannedTensor,
    SafetensorsError,
    ShardedWriter,
    TensorReader,
)


def test_reader_reads_what_safetensors_wrote(tmp_path):
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.arange(4, dtype=torch.int64),
        "empty": torch.zeros(0, 3),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    with TensorReader(tmp_path) as reader:
        assert sorted(reader.names) == sorted(tensors)
        for name, t in tensors.items():
            assert torch.equal(reader.load(name), t)
            assert torch.equal(reader.map(name), t)


def test_mapped_tensor_is_private_to_the_process(tmp_path):
    save_file({"w": torch.randn(4096, 3)}, tmp_path / "model.safetensors")
    before = (tmp_path / "model.safetensors").read_bytes()
    with TensorReader(tmp_path) as reader:
        mapped = reader.map("w")
        mapped.mul_(0)  # copy-on-write: only this process's pages change
        assert not mapped.any()
        assert reader.load("w").abs().sum() > 0
    assert (tmp_path / "model.safetensors").read_bytes() == before


def test_map_of_a_truncated_file_says_so(tmp_path):
    save_file({"w": torch.randn(1000)}, tmp_path / "model.safetensors")
    path = tmp_path / "model.safetensors"
    with TensorReader(tmp_path) as reader, pytest.raises(SafetensorsError, match="truncated"):
        path.write_bytes(path.read_bytes()[:-100])  # shrinks after its header was checked
        reader.map("w")
    with pytest.raises(SafetensorsError, match="tensor 'w'.*outside the file's data"):
        TensorReader(tmp_path)  # already short: refused before any tensor is read


def test_sharded_writer_output_loads_with_safetensors_and_is_indexed(tmp_path):
    tensors = {f"t{i}": torch.randn(64, 16) for i in range(5)}  # 4 KiB each
    plan = [PlannedTensor(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    writer = ShardedWriter(tmp_path, plan, max_shard_bytes=9000)
    for name, t in tensors.items():
        writer.write(name, t)
    writer.close()
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(writer.files) == 3
    loaded = {}
    for f in writer.files:
        loaded.update(load_file(tmp_path / f))
    assert loaded.keys() == tensors.keys()
    for name in tensors:
        assert torch.equal(loaded[name], tensors[name])
    with TensorReader(tmp_path) as reader:
        assert torch.equal(reader.load("t4"), tensors["t4"])


def test_writer_rejects_out_of_order_or_misshaped_tensors(tmp_path):
    plan = [PlannedTensor("a", torch.float32, (2,)), PlannedTensor("b", torch.float32, (2,))]
    writer = ShardedWriter(tmp_path, plan)
    with pytest.raises(SafetensorsError, match="expected tensor a"):
        writer.write("b", torch.zeros(2))
    with pytest.raises(SafetensorsError, match="planned"):
        writer.write("a", torch.zeros(3))
    writer.write("a", torch.zeros(2))
    with pytest.raises(SafetensorsError, match="only 1 of 2"):
        writer.close()
