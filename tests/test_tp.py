"""Tensor parallel over gloo (2 and 4 CPU processes) against one process on the same checkpoint.

One spawn per world size runs every scenario (spawning is the slow part) and returns plain lists:

* planner (LLaDA names; no cache, prefix, dual, threshold, sampled with a seed, random remasking
  with guidance) and executor (HF Llama names: GQA, q/k/v/o and MLP biases, tied embeddings, an
  uneven vocabulary split, seven safetensors shards with an index; greedy left-padded, sampled
  with a seed, shared-prefix samples, a latent prefix): exactly the tokens of one process
  (``DiffusionPlanner`` / ``ARExecutor`` on ``Transformer.from_pretrained``), the same on every rank;
* the vocabulary-parallel unmask partial merge against ``reference.unmask_step`` on the full
  vocabulary (random scores; top-k, threshold, Gumbel sampling, random remasking, Dream's
  topk_margin and entropy, banned tokens covering a whole shard, deferred tokens, unmasked rows,
  a maximum tied across shards);
* loading: each rank's tensors equal the full checkpoint's slices, and the bytes it read;
* errors on every rank, never a hang: a world size that does not divide the kv heads, ranks that
  disagree on their arguments.

Every process has a timeout (gloo's, and the parent's join): a bug fails the test in seconds.
"""

from __future__ import annotations

import os

import pytest
import torch

from hybridkernels import ops
from hybridkernels.distributed import (
    TensorParallelTransformer,
    TPGroup,
    check_divisible,
    load_shard,
    parameter_slice,
    vocab_parallel_unmask_step,
    vocab_range,
)
from hybridkernels.distributed.comm import llada_8b, llama_8b, step_communication
from hybridkernels.distributed.local import free_port, run_on_ranks
from hybridkernels.distributed.unmask import triton_shard_entry
from hybridkernels.models import ARExecutor, DiffusionPlanner, Transformer, TransformerConfig, save_pretrained
from hybridkernels.models.checkpoint import read_config
from hybridkernels.reference import unmask_step as reference_unmask_step

PV, MASK = 128, 127  # planner vocabulary and mask id
EV = 130  # executor vocabulary: 4 ranks hold 33, 33, 33, 31 rows
TIMEOUT_S = 90

PLANNER_CASES = {
    "no-cache": dict(gen_length=8, block_length=4, steps=8),
    "prefix": dict(gen_length=8, block_length=4, steps=8, cache="prefix"),
    "dual": dict(gen_length=8, block_length=4, steps=8, cache="dual"),
    "threshold": dict(gen_length=8, block_length=4, steps=8, cache="dual", threshold=0.3),
    "sampled": dict(gen_length=8, block_length=4, steps=8, temperature=0.7),
    "random-cfg": dict(gen_length=8, block_length=4, steps=4, remasking="random", cfg_scale=0.5),
}
EXECUTOR_CASES = {
    "greedy": dict(max_new_tokens=6),
    "sampled": dict(max_new_tokens=6, temperature=0.8, top_k=20, seed=3),
    "shared-prefix": dict(max_new_tokens=5, temperature=1.0, num_samples=3, seed=5),
    "latent-prefix": dict(max_new_tokens=5),
}


# ------------------------------------------------------------------------------------------ models
def planner_model(heads=4, kv_heads=4) -> Transformer:
    config = TransformerConfig.from_dict(
        {
            "d_model": 64,
            "n_heads": heads,
            "n_kv_heads": kv_heads,
            "n_layers": 2,
            "mlp_hidden_size": 96,
            "vocab_size": PV,
            "mask_token_id": MASK,
            "eos_token_id": 5,
        }
    )
    model = Transformer(config, attention_backend="reference")
    model.reset_parameters(std=0.3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.lm_head_weight[MASK] = 0
    return model.eval()


def executor_model() -> Transformer:
    config = TransformerConfig(
        vocab_size=EV,
        hidden_size=64,
        intermediate_size=96,
        num_layers=2,
        num_heads=8,
        num_kv_heads=4,
        head_dim=64,  # the _C decode kernels' head dim
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        tie_word_embeddings=True,
        family="llama",
    )
    model = Transformer(config)
    g = torch.Generator().manual_seed(2)
    model.reset_parameters(std=0.3, generator=g)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):  # column-parallel biases are split, row-parallel ones added once
                p.normal_(0, 0.3, generator=g)
    return model.eval()


def planner_prompt():
    ids = torch.randint(0, PV - 1, (2, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, :2] = 0
    return ids, mask


def executor_prompt():
    ids = torch.randint(0, EV, (2, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :3] = 0
    return ids, mask


def run_planner(model, case):
    ids, mask = planner_prompt()
    kw = dict(PLANNER_CASES[case])
    if kw.get("temperature") or kw.get("remasking") == "random":
        kw["generator"] = torch.Generator().manual_seed(7)
    return DiffusionPlanner(model, mask_id=MASK).generate(ids, mask, **kw).tokens.tolist()


def run_executor(model, case):
    ids, mask = executor_prompt()
    kw = dict(EXECUTOR_CASES[case])
    if kw.get("num_samples"):
        ids, mask = ids[1:], mask[1:]
    if case == "latent-prefix":  # the pipeline's latent mode: projected planner states first
        kw["prefix_embeds"] = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(6))
    return ARExecutor(model).generate(ids, mask, **kw).tokens.tolist()


def unmask_inputs(seed):
    """Random fused-path inputs: x with masked and unmasked rows, hidden [B, Lr, d], head [V, d]."""
    g = torch.Generator().manual_seed(seed)
    B, L, Lr, d, V = 3, 9, 6, 16, 37
    x = torch.randint(0, V - 1, (B, L), generator=g)
    x[:, 2 : 2 + Lr] = V - 1
    x[0, 3] = 4  # an unmasked row inside the window
    hidden = torch.randn(B, Lr, d, generator=g)
    hidden[2, 1] = hidden[2, 0]  # two identical rows: a confidence tie
    head = torch.randn(V, d, generator=g)
    head[30] = head[3]  # one row in two shards: the tie across ranks goes to the lower id
    hidden[1, 2] = 2 * head[3]
    return x, hidden, head


UNMASK_CASES = {
    "top-k": dict(num_transfer=torch.tensor([2, 1, 3])),
    "threshold": dict(threshold=0.2),
    "sampled": dict(num_transfer=torch.tensor([1, 2, 2]), temperature=0.9, seed=1),
    "random": dict(num_transfer=torch.tensor([3, 3, 1]), remasking="random", temperature=0.5, seed=2),
    "banned-shard": dict(num_transfer=torch.tensor([2, 2, 2]), banned_token_ids=list(range(0, 10)) + [33]),
    "deferred": dict(num_transfer=torch.tensor([4, 4, 4]), deferred_token_ids=[1, 7, 20, 30]),
    "topk-margin": dict(num_transfer=torch.tensor([2, 3, 1]), remasking="topk_margin"),
    "entropy": dict(num_transfer=torch.tensor([1, 2, 4]), remasking="entropy", temperature=0.6, seed=4),
}


TRITON_CASES = ("top-k", "sampled", "topk-margin", "banned-shard")


def unmask_case(case, vocab=None, group=None, backend="reference"):
    """Run an unmask case; on the full vocabulary (the reference, or ``ops.unmask_step`` with
    ``backend``) or on this rank's shard."""
    x, hidden, head = unmask_inputs(list(UNMASK_CASES).index(case))
    kw = dict(UNMASK_CASES[case], mask_id=head.shape[0] - 1, start=2)
    if group is None and backend != "reference":
        res = ops.unmask_step(x, hidden=hidden, lm_head=head, backend=backend, **kw)
    elif group is None:
        res = reference_unmask_step(
            x,
            hidden=hidden,
            lm_head=head,
            **{k: v for k, v in kw.items() if k != "seed"},
            generator=torch.Generator().manual_seed(kw["seed"]) if "seed" in kw else None,
        )
    else:
        v0, v1 = vocab
        res = vocab_parallel_unmask_step(
            x,
            hidden=hidden,
            lm_head_shard=head[v0:v1],
            vocab_start=v0,
            vocab_size=head.shape[0],
            group=group,
            backend=backend,
            **kw,
        )
    return [t.tolist() for t in res]


# ------------------------------------------------------------------------------------------ workers
def _scenarios(rank, world, paths):
    tp = TPGroup()
    out = {"rank": rank}
    planner = TensorParallelTransformer.from_pretrained(
        paths["planner"], tp_group=tp, causal=False, attention_backend="reference"
    )
    for case in PLANNER_CASES:
        out[f"planner/{case}"] = run_planner(planner, case)
    executor = TensorParallelTransformer.from_pretrained(paths["executor"], tp_group=tp, causal=True)
    tp.stats.reset()
    for case in EXECUTOR_CASES:
        out[f"executor/{case}"] = run_executor(executor, case)
    out["executor_comm_bytes"] = tp.stats.bytes
    # Sampled without a seed (each rank's generator draws a fresh one): rank 0's draws on every
    # rank, the prompt's first token too.
    ids, mask = executor_prompt()
    out["executor/unseeded"] = (
        ARExecutor(executor).generate(ids, mask, max_new_tokens=4, temperature=1.0).tokens.tolist()
    )
    out["load"] = {
        "planner": planner.load_stats.bytes_read,
        "executor": executor.load_stats.bytes_read,
        "checkpoint": planner.load_stats.checkpoint_bytes,
    }
    vocab = vocab_range(37, rank, world)
    for case in UNMASK_CASES:
        out[f"unmask/{case}"] = unmask_case(case, vocab, tp)
        if triton_shard_entry() is not None and case in TRITON_CASES:
            out[f"triton/{case}"] = unmask_case(case, vocab, tp, backend="triton")
    # A world size that does not divide the kv heads (2 kv heads over 4 ranks), and ranks that
    # disagree (rank 1 asks for another dtype): the same error on every rank.
    errors = {}
    if world == 4:
        try:
            TensorParallelTransformer.from_pretrained(paths["bad_kv"], tp_group=tp)
        except ValueError as exc:
            errors["world"] = str(exc)
    try:
        dtype = torch.float16 if rank == 1 else torch.float32
        TensorParallelTransformer.from_pretrained(paths["planner"], tp_group=tp, dtype=dtype)
    except ValueError as exc:
        errors["disagree"] = str(exc)
    out["errors"] = errors
    return out


def spawn(world: int, paths: dict) -> list[dict]:
    """Run :func:`_scenarios` on ``world`` gloo processes; results sorted by rank."""
    try:
        return run_on_ranks(_scenarios, world, (paths,), timeout_s=TIMEOUT_S, wait_s=TIMEOUT_S + 30)
    except RuntimeError as exc:
        pytest.fail(str(exc))


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    paths = {name: str(root / name) for name in ("planner", "executor", "bad_kv")}
    save_pretrained(planner_model(), paths["planner"], names="llada")
    save_pretrained(executor_model(), paths["executor"], names="hf", max_shard_bytes=200_000)
    save_pretrained(planner_model(heads=4, kv_heads=2), paths["bad_kv"], names="llada")
    return paths


@pytest.fixture(scope="module")
def single(checkpoints):
    """One process on the same checkpoints: the expected tokens."""
    planner = Transformer.from_pretrained(checkpoints["planner"], causal=False, attention_backend="reference")
    executor = Transformer.from_pretrained(checkpoints["executor"], causal=True)
    out = {f"planner/{c}": run_planner(planner, c) for c in PLANNER_CASES}
    out |= {f"executor/{c}": run_executor(executor, c) for c in EXECUTOR_CASES}
    out |= {f"unmask/{c}": unmask_case(c) for c in UNMASK_CASES}
    return out


@pytest.fixture(scope="module", params=[2, 4], ids=["tp2", "tp4"])
def ranks(request, checkpoints):
    return spawn(request.param, checkpoints)


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("case", PLANNER_CASES)
def test_planner_tokens_equal_one_process(ranks, single, case):
    for r in ranks:
        assert r[f"planner/{case}"] == single[f"planner/{case}"], f"rank {r['rank']}"


@pytest.mark.parametrize("case", EXECUTOR_CASES)
def test_executor_tokens_equal_one_process(ranks, single, case):
    for r in ranks:
        assert r[f"executor/{case}"] == single[f"executor/{case}"], f"rank {r['rank']}"


@pytest.mark.parametrize("case", UNMASK_CASES)
def test_unmask_partial_merge_equals_reference(ranks, single, case):
    x, committed, tokens, confidence = single[f"unmask/{case}"]
    for r in ranks:
        rx, rcommitted, rtokens, rconfidence = r[f"unmask/{case}"]
        assert (rx, rcommitted, rtokens) == (x, committed, tokens), f"rank {r['rank']}"
        torch.testing.assert_close(torch.tensor(rconfidence), torch.tensor(confidence), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", TRITON_CASES)
def test_triton_shards_equal_the_single_device_kernel(ranks, case):
    """The Triton path (interpreter on the CPU): each rank's kernel on its shard, the partials
    gathered, against ``ops.unmask_step(backend="triton")`` on the whole vocabulary: the same
    tokens and samples (the Philox counter is the global token id)."""
    if triton_shard_entry() is None:
        pytest.skip("hybridkernels.triton.unmask.unmask_step has no vocabulary-shard entry point yet")
    x, committed, tokens, confidence = unmask_case(case, backend="triton")
    for r in ranks:
        rx, rcommitted, rtokens, rconfidence = r[f"triton/{case}"]
        assert (rx, rcommitted, rtokens) == (x, committed, tokens), f"rank {r['rank']}"
        torch.testing.assert_close(torch.tensor(rconfidence), torch.tensor(confidence), rtol=1e-5, atol=1e-7)


def test_each_rank_reads_only_its_slices(ranks, checkpoints):
    world = len(ranks)
    config = read_config(checkpoints["planner"])
    full = Transformer.from_pretrained(checkpoints["planner"]).state_dict()
    replicated = sum(t.numel() * 4 for n, t in full.items() if parameter_slice(n, config, 0, world) is None)
    for r in ranks:
        state, stats = load_shard(checkpoints["planner"], config, r["rank"], world)
        for name, t in state.items():
            sl = parameter_slice(name, config, r["rank"], world)
            expected = full[name] if sl is None else full[name].narrow(sl.dim, sl.start, sl.stop - sl.start)
            assert torch.equal(t, expected), name
        assert r["load"]["planner"] == stats.bytes_read == sum(t.numel() * 4 for t in state.values())
        sharded = stats.checkpoint_bytes - replicated
        assert stats.bytes_read == replicated + sharded // world  # this model splits evenly
        assert stats.bytes_read < stats.checkpoint_bytes / world + replicated + 1


def test_errors_on_every_rank(ranks):
    for r in ranks:
        assert "disagree" in r["errors"]["disagree"]
        if len(ranks) == 4:
            assert "num_kv_heads = 2" in r["errors"]["world"]


def test_unseeded_sampling_emits_the_same_tokens_on_every_rank(ranks):
    assert all(r["executor/unseeded"] == ranks[0]["executor/unseeded"] for r in ranks)


def test_executor_sends_no_logits_at_temperature_zero(ranks):
    """Greedy decoding's LM head gathers [N, 2] partials; the sampled cases gather logits."""
    assert all(r["executor_comm_bytes"] > 0 for r in ranks)


# ------------------------------------------------------------------------------------------ one process
def test_sharding_errors_name_the_sizes():
    config = llama_8b()
    check_divisible(config, 8)
    with pytest.raises(ValueError, match="num_kv_heads = 8"):
        check_divisible(config, 16)
    with pytest.raises(ValueError, match="num_heads = 32.*num_kv_heads = 8.*intermediate_size = 14336"):
        check_divisible(config, 3)
    with pytest.raises(ValueError, match="world_size"):
        check_divisible(config, 0)


def test_single_process_group_is_the_plain_model(checkpoints):
    """World of one: the sharded classes run the ordinary model's computation, bit for bit."""
    full = Transformer.from_pretrained(checkpoints["executor"], causal=True)
    tp = TensorParallelTransformer.from_pretrained(
        checkpoints["executor"], tp_group=TPGroup.single(), causal=True
    )
    ids, mask = executor_prompt()
    with torch.no_grad():
        torch.testing.assert_close(tp(ids, mask).logits, full(ids, mask).logits, rtol=0, atol=0)
    assert run_executor(tp, "greedy") == run_executor(full, "greedy")


def test_communication_volume_of_8b_shapes():
    llada = step_communication(llada_8b(), 8, batch=1, tokens=32, lm_head_rows=32)
    # 65 all-reduces of 32 x 4096 bf16 (256 KiB each), 32 rows x 9 float64 partials.
    assert llada["all_reduces"] == 65
    assert llada["all_reduce_bytes"] == 65 * 32 * 4096 * 2
    assert llada["all_gather_bytes"] == 32 * 9 * 8
    llama = step_communication(llama_8b(), 8, batch=1, tokens=1, lm_head_rows=1, lm_head="greedy")
    assert llama["payload_bytes"] == 65 * 4096 * 2 + 16
    assert step_communication(llama_8b(), 1, batch=1, tokens=1, lm_head_rows=1)["payload_bytes"] == 0


def test_tp_group_outside_torchrun():
    with pytest.raises(TypeError, match="tp_group"):
        TPGroup.of("nccl")
    assert TPGroup.of(None).world_size == 1


def test_cli_tp_without_torchrun_is_one_error_line(capsys, monkeypatch):
    from hybridkernels.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["generate", "6,3,9,27", "--tp", "2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--tp 2 needs 2 processes" in err and "torchrun --nproc-per-node 2" in err
    assert main(["bench", "--preset", "tiny", "--tp", "0", "--device", "cpu"]) == 2
    assert "--tp must be >= 1" in capsys.readouterr().err


def test_torchrun_generate_equals_one_process(tmp_path, capsys):
    """``torchrun --nproc-per-node 2 hybridkernels generate ... --tp 2`` (init_from_env, the
    command-line check, each rank loading its slices) prints what one process prints."""
    import json
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from hybridkernels.cli import main
    from hybridkernels.models.checkpoint import read_config
    from hybridkernels.toy import toy_dir

    toy = Path(toy_dir())
    executor = tmp_path / "executor"  # the toy executor has 1 kv head: a 2 kv-head random one
    model = Transformer(read_config(toy / "executor").replace(num_kv_heads=2))
    model.reset_parameters(std=0.1, generator=torch.Generator().manual_seed(0))
    save_pretrained(model, executor)
    for f in ("special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(toy / "executor" / f, executor / f)
    args = ["generate", "6,3,9,27", "--planner", str(toy / "planner"), "--executor", str(executor)]
    args += ["--mode", "text", "--gen-length", "8", "--max-new-tokens", "4", "--device", "cpu", "--json"]
    assert main(args) == 0
    expected = json.loads(capsys.readouterr().out)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port"]
    cmd += [str(free_port()), "-m", "hybridkernels.cli", *args, "--tp", "2"]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout[run.stdout.index("{") :])  # rank 0 prints, the others not
    assert (got["plans"], got["answers"]) == (expected["plans"], expected["answers"])
