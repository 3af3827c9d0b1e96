"""LatentProjector (MLP, pooling, rescaling, checkpoints) and train_projector (learns a task only
the planner's latents can solve; checkpoints, resume and reload reproduce it exactly; bad input).
Tiny models in fp32 on the CPU, one thread (tiny matmuls are slower multi-threaded)."""

import json

import pytest
import torch
from hybrid_helpers import PLANNER_KWARGS, ColorTask, one_torch_thread

from hybridkernels.models import training
from hybridkernels.models.projector import LatentProjector, ProjectorConfig, pool_positions
from hybridkernels.models.training import answer_loss, read_examples, train_projector
from hybridkernels.pipeline import HybridPipeline

STEPS = 250
BATCH = 43  # 86 training examples: two steps an epoch
TRAIN_KW = dict(planner_kwargs=PLANNER_KWARGS, batch_size=BATCH, lr=3e-3, progress=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return ColorTask(tmp_path_factory.mktemp("color"))


@pytest.fixture(scope="module")
def trained(task, tmp_path_factory):
    """The color task trained once: (result, the projector before training, checkpoint dir)."""
    ckpt = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    initial = LatentProjector.for_models(task.planner, task.executor)
    projector = LatentProjector(initial.config)
    projector.load_state_dict(initial.state_dict())
    result = train_projector(
        task.planner,
        task.executor,
        task.train,
        projector=projector,
        steps=STEPS,
        checkpoint_dir=ckpt,
        checkpoint_every=100,
        **TRAIN_KW,
        **task.tokenizers(),
    )
    return result, initial, ckpt


def accuracy(task, projector, examples) -> float:
    pipe = HybridPipeline(
        task.planner,
        task.executor,
        projector,
        mode="latent",
        planner_kwargs=PLANNER_KWARGS,
        executor_kwargs={"max_new_tokens": 3},
        **task.tokenizers(),
    )
    out = pipe([e["question"] for e in examples])
    return sum(a == e["answer"] for a, e in zip(out.answers, examples, strict=True)) / len(examples)


# ----------------------------------------------------------------------------- the projector
def test_forward_is_layernorm_mlp_then_rescale():
    torch.manual_seed(0)
    proj = LatentProjector(planner_dim=24, executor_dim=40, hidden_dim=32, target_norm=2.5)
    h = torch.randn(3, 5, 24, dtype=torch.float64)
    out = proj(h)
    assert out.shape == (3, 5, 40) and out.dtype == torch.float32
    x = torch.nn.functional.layer_norm(h.float(), (24,), proj.norm.weight, proj.norm.bias)
    x = proj.mlp[2](torch.nn.functional.gelu(proj.mlp[0](x)))
    want = x / x.norm(dim=-1, keepdim=True) * 2.5
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(out.norm(dim=-1), torch.full((3, 5), 2.5))
    assert proj(h, dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("P, stride", [(7, 2), (8, 4), (5, 5), (3, 4)])
def test_pooling(P, stride):
    h = torch.randn(2, P, 6)
    mean = pool_positions(h, "mean", stride)
    windows = -(-P // stride)
    assert mean.shape == (2, windows, 6)
    for w in range(windows):
        torch.testing.assert_close(mean[:, w], h[:, w * stride : (w + 1) * stride].mean(1))
    assert torch.equal(pool_positions(h, "stride", stride), h[:, ::stride])
    proj = LatentProjector(planner_dim=6, executor_dim=8, pool="mean", pool_stride=stride)
    assert proj(h).shape == (2, windows, 8) and proj.num_prefix(P) == windows


def test_config_options():
    proj = LatentProjector(planner_dim=8, executor_dim=4, num_layers=3, activation="silu", input_norm=False)
    kinds = [type(m).__name__ for m in proj.mlp]
    assert kinds == ["Linear", "SiLU", "Linear", "SiLU", "Linear"] and proj.norm is None
    assert proj.config.hidden_dim == 8
    single = LatentProjector(planner_dim=8, executor_dim=4, num_layers=1)
    assert [type(m).__name__ for m in single.mlp] == ["Linear"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(activation="swish"), "activation must be one of"),
        (dict(pool="max"), "pool must be one of"),
        (dict(pool_stride=2), "pool_stride > 1 needs"),
        (dict(target_norm=-1.0), "target_norm must be > 0"),
        (dict(num_layers=0), "num_layers must be a positive int"),
        (dict(planner_dim=0), "planner_dim must be a positive int"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ProjectorConfig(**(dict(planner_dim=8, executor_dim=4) | kwargs))


def test_forward_errors():
    proj = LatentProjector(planner_dim=8, executor_dim=4)
    with pytest.raises(ValueError, match="planner_dim = 8"):
        proj(torch.randn(1, 3, 9))
    with pytest.raises(ValueError, match=r"\[B, P, planner_dim\]"):
        proj(torch.randn(3, 8))
    with pytest.raises(ValueError, match="empty"):
        proj(torch.randn(1, 0, 8))
    with pytest.raises(TypeError, match="float"):
        proj(torch.ones(1, 2, 8, dtype=torch.long))


def test_save_load_roundtrip(tmp_path):
    torch.manual_seed(1)
    proj = LatentProjector(planner_dim=8, executor_dim=12, pool="stride", pool_stride=2, target_norm=0.7)
    proj.save_pretrained(tmp_path / "p")
    saved = json.loads((tmp_path / "p" / "config.json").read_text())
    assert saved["model_type"] == "hybridkernels_latent_projector" and saved["pool_stride"] == 2
    loaded = LatentProjector.from_pretrained(tmp_path / "p")
    assert loaded.config == proj.config
    h = torch.randn(2, 5, 8)
    assert torch.equal(loaded(h), proj(h))
    assert LatentProjector.from_pretrained(tmp_path / "p", dtype=torch.float64).dtype == torch.float64
    with pytest.raises(ValueError, match="has no model.safetensors"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "config.json").write_text(json.dumps(saved))
        LatentProjector.from_pretrained(tmp_path / "empty")
    saved["executor_dim"] = 13  # weights no longer match the config
    (tmp_path / "p" / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="does not match its config"):
        LatentProjector.from_pretrained(tmp_path / "p")


def test_for_models_reads_widths_and_embedding_norm(task):
    proj = LatentProjector.for_models(task.planner, task.executor, pool="mean", pool_stride=2)
    emb = task.executor.model.embed_tokens.weight
    assert proj.config.planner_dim == task.planner.model.config.hidden_size
    assert proj.config.executor_dim == task.executor.model.config.hidden_size
    assert proj.config.target_norm == pytest.approx(float(emb.detach().norm(dim=-1).mean()))


# ----------------------------------------------------------------------------- training
def test_train_projector_learns(task, trained):
    """The answer is the color of a symbol only the planner can read, and the plan text is the
    same for every question: only the latents carry the answer. Training halves the loss (it
    falls far more) and answers every held-out question; the random projector answers none."""
    result, initial, _ = trained
    assert len(result.losses) == STEPS and result.step == STEPS
    latents = training.plan_latents(
        task.planner,
        [e["question"] for e in task.train],
        tokenizer=task.planner_tokenizer,
        **PLANNER_KWARGS,
    )
    tok = task.executor_tokenizer
    prompts = [tok(f"Question: {e['question']}\nAnswer:")["input_ids"] for e in task.train]
    answers = [
        tok(" " + e["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for e in task.train
    ]
    with torch.no_grad():
        before = answer_loss(initial, task.executor, latents, prompts, answers)
        after = answer_loss(result.projector, task.executor, latents, prompts, answers)
    assert after <= 0.5 * before, (float(before), float(after))
    assert accuracy(task, result.projector, task.held_out) == 1.0
    assert accuracy(task, initial, task.held_out) <= 0.2


def test_checkpoints_resume_and_reload_are_exact(task, trained, tmp_path, monkeypatch):
    """Resuming from the step-200 checkpoint reproduces the uninterrupted run bit for bit (batch
    order from (seed, step), optimizer state restored), without recomputing the latents; the
    saved projector reloads to identical answers."""
    result, _, ckpt = trained
    assert sorted(p.name for p in ckpt.glob("checkpoint-*")) == ["checkpoint-0000200", "checkpoint-0000250"]
    assert (ckpt / training.LATENTS_FILE).is_file()
    resume_dir = tmp_path / "resume"
    resume_dir.mkdir()
    (resume_dir / training.LATENTS_FILE).write_bytes((ckpt / training.LATENTS_FILE).read_bytes())
    start = ckpt / "checkpoint-0000200"
    (resume_dir / start.name).mkdir()
    for f in start.iterdir():
        (resume_dir / start.name / f.name).write_bytes(f.read_bytes())

    def no_recompute(*args, **kwargs):
        raise AssertionError("the cached planner latents should have been used")

    monkeypatch.setattr(training, "plan_latents", no_recompute)
    kw = TRAIN_KW | task.tokenizers()
    torch.manual_seed(0)
    projector = LatentProjector.for_models(task.planner, task.executor)  # overwritten by the checkpoint
    resumed = train_projector(
        task.planner,
        task.executor,
        task.train,
        projector=projector,
        steps=STEPS,
        checkpoint_dir=resume_dir,
        resume=True,
        **kw,
    )
    assert resumed.step == STEPS and resumed.losses == result.losses
    for name, value in result.projector.state_dict().items():
        assert torch.equal(resumed.projector.state_dict()[name], value), name

    reloaded = LatentProjector.from_pretrained(result.checkpoint)
    for name, value in result.projector.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value), name
    h = torch.randn(2, 4, reloaded.config.planner_dim)
    assert torch.equal(reloaded(h), result.projector(h))

    with pytest.raises(ValueError, match="batch_size = 5, the checkpoint's is 43"):
        train_projector(
            task.planner,
            task.executor,
            task.train,
            steps=STEPS,
            checkpoint_dir=resume_dir,
            resume=True,
            **(kw | {"batch_size": 5}),
        )


def test_progress_printer_without_tqdm(task, tmp_path, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_tqdm(name, *args, **kwargs):
        if name.startswith("tqdm"):
            raise ImportError("no tqdm")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    train_projector(
        task.planner,
        task.executor,
        task.train[:4],
        planner_kwargs=PLANNER_KWARGS,
        steps=4,
        batch_size=2,
        log_every=2,
        **task.tokenizers(),
    )
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split(" loss ")[0] for line in lines] == [
        "train-projector step 2/4",
        "train-projector step 4/4",
    ]


def test_train_projector_bad_input(task):
    kw = dict(planner_kwargs=PLANNER_KWARGS, progress=False, **task.tokenizers())
    with pytest.raises(ValueError, match="examples is empty"):
        train_projector(task.planner, task.executor, [], **kw)
    with pytest.raises(TypeError, match=r"examples\[1\] needs str 'question' and 'answer'"):
        train_projector(task.planner, task.executor, [task.train[0], {"question": "x"}], **kw)
    with pytest.raises(ValueError, match="planner_tokenizer and executor_tokenizer are required"):
        train_projector(
            task.planner,
            task.executor,
            task.train,
            planner_tokenizer=None,
            executor_tokenizer=task.executor_tokenizer,
        )
    wrong = LatentProjector(planner_dim=32, executor_dim=task.executor.model.config.hidden_size)
    with pytest.raises(ValueError, match="planner_dim = 32 does not match the planner's hidden_size = 64"):
        train_projector(task.planner, task.executor, task.train, projector=wrong, **kw)
    wrong = LatentProjector(planner_dim=64, executor_dim=48)
    with pytest.raises(ValueError, match="executor_dim = 48 does not match the executor's hidden_size = 64"):
        train_projector(task.planner, task.executor, task.train, projector=wrong, **kw)
    with pytest.raises(ValueError, match="resume=True needs checkpoint_dir"):
        train_projector(task.planner, task.executor, task.train, resume=True, **kw)
    with pytest.raises(ValueError, match="schedule must be one of"):
        train_projector(task.planner, task.executor, task.train, schedule="linear", **kw)


def test_train_projector_refuses_sequences_longer_than_the_models_before_planning(task, monkeypatch):
    import hybridkernels.models.training as training

    monkeypatch.setattr(training, "plan_latents", lambda *a, **k: pytest.fail("planned a too-long question"))
    kw = dict(planner_kwargs=PLANNER_KWARGS, progress=False, **task.tokenizers())
    question = task.train[0]["question"]
    long_question = " ".join([question] * 200_000)
    with pytest.raises(
        ValueError, match=r"examples\[1\]: the planner's prompt \+ gen_length is \d+ tokens, more "
    ):
        train_projector(task.planner, task.executor, [task.train[0], (long_question, "red")], **kw)
    long_answer = " ".join(
        [task.train[0]["answer"]] * (task.executor.model.config.max_position_embeddings + 1)
    )
    with pytest.raises(ValueError, match=r"examples\[0\]: the executor's prompt \+ \d+ latents \+ answer is"):
        train_projector(task.planner, task.executor, [(question, long_answer)], **kw)


def test_read_examples(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"question": "a?", "answer": "b"}\n\n{"question": "c?", "answer": "d", "id": 3}\n')
    assert read_examples(good) == [{"question": "a?", "answer": "b"}, {"question": "c?", "answer": "d"}]
    for lines, match in [
        (['{"question": "a?", "answer": "b"}', '{"question": "x"', ""], r"bad.jsonl:2: not valid JSON"),
        (['{"question": "a?", "answer": "b"}', "", '{"question": "c?"}'], r"bad.jsonl:3: .*'answer'"),
        (['["question", "answer"]'], r"bad.jsonl:1: expected a JSON object"),
        (['{"question": 1, "answer": "b"}'], r"bad.jsonl:1: .*'question'"),
    ]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text("\n".join(lines))
        with pytest.raises(ValueError, match=match):
            read_examples(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no examples"):
        read_examples(empty)


def test_latents_cache_is_written_atomically_and_recomputed_when_it_does_not_load(tmp_path, monkeypatch):
    """An interrupted write never leaves a half file under the cache's name, and a cache that does
    not load (truncated, garbage) is recomputed instead of failing the run."""
    import safetensors.torch

    path = tmp_path / training.LATENTS_FILE
    latents = torch.arange(6.0).reshape(1, 2, 3)

    def interrupted(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        training._cached_latents(path, "fp", lambda: latents)
    assert not path.exists()
    monkeypatch.undo()
    path.write_bytes(b"garbage, not safetensors")
    got = training._cached_latents(path, "fp", lambda: latents)
    assert torch.equal(got, latents)
    assert torch.equal(training._cached_latents(path, "fp", lambda: 1 / 0), latents)  # now it loads
