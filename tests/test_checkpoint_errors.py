"""Issue 16 §2: a broken checkpoint directory gives a ValueError / TypeError naming the file (or
the tensor / argument), never a bare SafetensorError, KeyError or a late failure in a kernel;
index entries may not leave the checkpoint directory; the CLI prints one line and exits non-zero."""

import json
import os
from pathlib import Path

import pytest
import torch

from hybridkernels import cli
from hybridkernels.models import ARExecutor, Transformer, TransformerConfig, save_pretrained
from hybridkernels.models.checkpoint import iter_safetensors

CONFIG = TransformerConfig(
    vocab_size=32,
    hidden_size=32,
    intermediate_size=48,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    head_dim=16,
)


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return Transformer(CONFIG).to(dtype)


@pytest.fixture
def ckpt(tmp_path) -> Path:
    path = tmp_path / "ckpt"
    save_pretrained(_model(), path)
    return path


@pytest.fixture
def sharded(tmp_path) -> Path:
    path = tmp_path / "sharded"
    save_pretrained(_model(), path, max_shard_bytes=5_000)
    assert (path / "model.safetensors.index.json").exists()
    return path


def _corrupt(path: Path, how: str) -> Path:
    file = path / "model.safetensors"
    data = file.read_bytes()
    if how == "truncated":
        file.write_bytes(data[: len(data) // 2])
    elif how == "header-only":
        file.write_bytes(data[:20])
    elif how == "empty":
        file.write_bytes(b"")
    elif how == "garbage":
        file.write_bytes(os.urandom(4096))
    elif how == "pickle":
        file.unlink()
        torch.save({"model.embed_tokens.weight": torch.zeros(32, 32)}, file)
    elif how == "dev-zero":
        file.unlink()
        file.symlink_to("/dev/zero")
    elif how == "directory":
        file.unlink()
        file.mkdir()
    return file


@pytest.mark.parametrize(
    "how", ["truncated", "header-only", "empty", "garbage", "pickle", "dev-zero", "directory"]
)
def test_corrupt_safetensors_name_the_file(ckpt, how):
    if how == "dev-zero" and not Path("/dev/zero").exists():
        pytest.skip("no /dev/zero")
    file = _corrupt(ckpt, how)
    with pytest.raises(ValueError, match="model.safetensors") as info:
        Transformer.from_pretrained(ckpt)
    assert str(file) in str(info.value)


@pytest.mark.parametrize(
    "index, words",
    [
        ({"metadata": {}}, "weight_map"),
        ({"weight_map": ["a"]}, "weight_map"),
        ({"weight_map": {"model.norm.weight": 3}}, "weight_map"),
        ([1, 2], "weight_map"),
    ],
)
def test_index_without_a_proper_weight_map(sharded, index, words):
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"model.safetensors.index.json.*{words}"):
        Transformer.from_pretrained(sharded)


def test_index_that_is_not_json(sharded):
    (sharded / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ValueError, match="model.safetensors.index.json.*JSON"):
        Transformer.from_pretrained(sharded)


@pytest.mark.parametrize("entry", ["../outside/model.safetensors", "../../x/model.safetensors", "/abs"])
def test_index_entries_may_not_leave_the_checkpoint_directory(tmp_path, sharded, entry):
    outside = tmp_path / "outside"
    save_pretrained(_model(), outside)  # a loadable file the entry points at
    index_file = sharded / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = str(outside / "model.safetensors") if entry == "/abs" else entry
    index_file.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="outside the checkpoint directory"):
        list(iter_safetensors(sharded))


def test_symlinked_shards_still_load(tmp_path, sharded):
    # HF's cache links each snapshot file to a blob elsewhere: the entry's *name* is what counts.
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for shard in sharded.glob("*.safetensors"):
        target = blobs / shard.name
        shard.rename(target)
        shard.symlink_to(target)
    Transformer.from_pretrained(sharded)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8])
def test_non_float_weights_are_refused_at_load(tmp_path, dtype):
    from safetensors.torch import save_file

    path = tmp_path / "ints"
    save_pretrained(_model(), path)
    file = path / "model.safetensors"
    from safetensors.torch import load_file

    state = load_file(str(file))
    state["model.norm.weight"] = state["model.norm.weight"].to(dtype)
    save_file(state, str(file))
    with pytest.raises(TypeError, match=r"(?s)floating point.*model\.norm\.weight: torch\."):
        Transformer.from_pretrained(path)


def test_float64_checkpoint_needs_a_dtype(tmp_path):
    path = tmp_path / "f64"
    save_pretrained(_model(torch.float64), path)
    with pytest.raises(TypeError, match="float64.*dtype"):
        Transformer.from_pretrained(path)
    model = Transformer.from_pretrained(path, dtype=torch.float32)  # an explicit dtype casts
    assert model.dtype == torch.float32
    with pytest.raises(TypeError, match="dtype"):
        Transformer.from_pretrained(path, dtype=torch.float64)
    with pytest.raises(TypeError, match="dtype"):
        ARExecutor.from_pretrained(path, dtype=torch.int32)


@pytest.mark.parametrize("eos", [2.5, "2", [1, 2.5], True, -1])
def test_config_eos_token_id_must_be_ints(ckpt, eos):
    config = json.loads((ckpt / "config.json").read_text())
    config["eos_token_id"] = eos
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="eos_token_id"):
        Transformer.from_pretrained(ckpt)


# --------------------------------------------------------------------------- CLI: one line


@pytest.mark.parametrize("how", ["truncated", "garbage", "pickle"])
def test_cli_prints_one_line_for_a_corrupt_checkpoint(ckpt, capsys, how):
    _corrupt(ckpt, how)
    code = cli.main(["generate", "--mode", "ar", "--executor", str(ckpt), "--device", "cpu", "1,2,3,6"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and "model.safetensors" in err[0] and "Traceback" not in err[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--device", "cuda", "1,2,3,6"],
        ["generate", "--device", "cuda:1", "1,2,3,6"],
        ["bench", "--device", "cuda"],
        ["generate", "--device", "tpu", "1,2,3,6"],
    ],
)
def test_cli_device_cuda_without_a_gpu_is_one_line(capsys, argv):
    code = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and "--device" in err[0]
