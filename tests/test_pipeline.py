"""HybridPipeline against the models called by hand (latent: executor on projector(planner hidden);
text: executor on the rendered prompt; ar: ARExecutor.plan_then_answer), the naive loops against
the fast paths, the stats and kwargs, bad input, and the ``generate`` / ``train-projector`` CLI.
Tiny random models in fp32 on the CPU; left padding on both sides (questions of several lengths)."""

import json

import pytest
import torch
from hybrid_helpers import COLORS, TEMPLATE_WORDS, ColorTask, one_torch_thread, tiny_model, word_tokenizer

from hybridkernels import cli
from hybridkernels.models import (
    ARExecutor,
    DiffusionPlanner,
    LatentProjector,
    PromptTemplates,
    save_pretrained,
)
from hybridkernels.models.block_diffusion import BlockDiffusionPlanner
from hybridkernels.pipeline import HybridPipeline

WORDS = TEMPLATE_WORDS + COLORS + "sky sea grass sun x y z".split()
QUESTIONS = ["what is the color of the sky ?", "sea ?", "what is the color of grass x y ?"]
PK = {"gen_length": 6, "steps": 6, "block_length": 3}
EK = {"max_new_tokens": 5}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Planner (varied plans, EOS possible), executor, projector and tokenizers."""
    tmp = tmp_path_factory.mktemp("parts")
    p_tok = word_tokenizer(WORDS, tmp / "planner_tok")
    e_tok = word_tokenizer(WORDS[::-1], tmp / "executor_tok")  # other ids for the same words
    planner = DiffusionPlanner(tiny_model(p_tok, causal=False, seed=11, std=0.2))
    executor = ARExecutor(tiny_model(e_tok, causal=True, seed=12, std=0.2))
    torch.manual_seed(13)
    projector = LatentProjector.for_models(planner, executor, pool="mean", pool_stride=4)
    return dict(planner=planner, executor=executor, projector=projector, p_tok=p_tok, e_tok=e_tok, dir=tmp)


def pipeline(parts, mode, **kw):
    return HybridPipeline(
        parts["planner"],
        parts["executor"],
        parts["projector"] if mode == "latent" else None,
        mode=mode,
        planner_tokenizer=parts["p_tok"],
        executor_tokenizer=parts["e_tok"],
        planner_kwargs=PK,
        executor_kwargs=EK,
        **kw,
    )


def left_padded(tok, texts):
    enc = tok(texts, padding=True, padding_side="left", return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def strip(tokens, lengths, eos):
    rows = []
    for row, n in zip(tokens.tolist(), lengths.tolist(), strict=True):
        row = row[:n]
        rows.append(row[:-1] if row and row[-1] == eos else row)
    return rows


def test_latent_mode_equals_executor_on_projected_hidden(parts):
    planner, executor, projector, p_tok, e_tok = (
        parts[k] for k in ("planner", "executor", "projector", "p_tok", "e_tok")
    )
    out = pipeline(parts, "latent")(QUESTIONS)

    ids, mask = left_padded(p_tok, QUESTIONS)
    plan = planner.generate(ids, mask, return_hidden=True, **PK)
    prefix = projector(plan.hidden, dtype=executor.model.dtype)
    assert prefix.shape == (3, 2, 64)  # 6 plan positions, mean-pooled by 4
    e_ids, e_mask = left_padded(e_tok, [f"Question: {q}\nAnswer:" for q in QUESTIONS])
    want = executor.generate(e_ids, e_mask, prefix, max_new_tokens=5, eos_token_id=e_tok.eos_token_id)
    assert out.answer_ids == strip(want.tokens, want.lengths, e_tok.eos_token_id)
    assert out.answers == [e_tok.decode(a, skip_special_tokens=True).strip() for a in out.answer_ids]
    assert out.plans == [p_tok.decode(p, skip_special_tokens=True).strip() for p in out.plan_ids]
    s = out.stats
    assert (s.mode, s.questions, s.latent_vectors, s.plan_tokens, s.plan_steps) == ("latent", 3, 2, 18, 6)
    assert s.answer_tokens == int(want.lengths.sum())
    assert s.executor_prefill_s > 0 and s.executor_decode_s > 0 and s.plan_s > 0
    assert s.total_s >= s.plan_s + s.projector_s + s.executor_s
    assert s.tokens_per_s == pytest.approx((s.plan_tokens + s.answer_tokens) / s.total_s)


def test_text_mode_equals_executor_on_rendered_prompt(parts):
    planner, executor, p_tok, e_tok = (parts[k] for k in ("planner", "executor", "p_tok", "e_tok"))
    out = pipeline(parts, "text")(QUESTIONS)

    ids, mask = left_padded(p_tok, QUESTIONS)
    gen = planner.generate(ids, mask, **PK).generated
    plans = []
    for row in gen.tolist():
        cut = row.index(planner.eos_id) if planner.eos_id in row else len(row)
        plans.append(p_tok.decode(row[:cut], skip_special_tokens=True).strip())
    assert out.plans == plans and any(plans)
    prompts = [f"Question: {q}\nPlan: {p}\nAnswer:" for q, p in zip(QUESTIONS, plans, strict=True)]
    e_ids, e_mask = left_padded(e_tok, prompts)
    want = executor.generate(e_ids, e_mask, max_new_tokens=5, eos_token_id=e_tok.eos_token_id)
    assert out.answer_ids == strip(want.tokens, want.lengths, e_tok.eos_token_id)
    assert out.stats.latent_vectors == 0 and out.stats.plan_tokens == 18


def test_ar_mode_equals_plan_then_answer(parts):
    executor, e_tok = parts["executor"], parts["e_tok"]
    out = pipeline(parts, "ar")(QUESTIONS, executor_kwargs={"plan_max_new_tokens": 4})
    ids, mask = left_padded(e_tok, [f"Question: {q}\nPlan:" for q in QUESTIONS])
    want = executor.plan_then_answer(
        ids,
        mask,
        plan_max_new_tokens=4,
        max_new_tokens=5,
        answer_prefix_ids=e_tok("\nAnswer:", add_special_tokens=False)["input_ids"],
        eos_token_id=e_tok.eos_token_id,
    )
    assert out.plan_ids == strip(want.plan.tokens, want.plan.lengths, e_tok.eos_token_id)
    assert out.answer_ids == strip(want.answer.tokens, want.answer.lengths, e_tok.eos_token_id)
    assert out.plans == [e_tok.decode(p, skip_special_tokens=True).strip() for p in out.plan_ids]
    assert out.stats.plan_tokens == int(want.plan.lengths.sum())

    sampling = {"temperature": 1.0, "top_k": 20, "seed": 5}
    out = pipeline(parts, "ar")(QUESTIONS, executor_kwargs={"plan_max_new_tokens": 4} | sampling)
    want = executor.plan_then_answer(
        ids,
        mask,
        plan_max_new_tokens=4,
        max_new_tokens=5,
        answer_prefix_ids=e_tok("\nAnswer:", add_special_tokens=False)["input_ids"],
        eos_token_id=e_tok.eos_token_id,
        **sampling,
    )
    assert out.answer_ids == strip(want.answer.tokens, want.answer.lengths, e_tok.eos_token_id)


@pytest.mark.parametrize("mode", ["latent", "text", "ar"])
def test_naive_loops_give_the_same_answers(parts, mode):
    fast = pipeline(parts, mode)(QUESTIONS)
    naive = pipeline(parts, mode, naive=True)(QUESTIONS)
    assert naive.answer_ids == fast.answer_ids and naive.plan_ids == fast.plan_ids
    assert naive.stats.naive and naive.stats.executor_prefill_s is None
    assert naive.stats.plan_steps == fast.stats.plan_steps


def fast_and_naive(parts, planner, mode, planner_kwargs):
    """The pipeline around ``planner`` on the fast paths and on the naive loops; checks that both
    give the same plans and answers and returns both outputs."""
    kw = dict(
        planner_tokenizer=parts["p_tok"],
        executor_tokenizer=parts["e_tok"],
        planner_kwargs=planner_kwargs,
        executor_kwargs=EK,
        mode=mode,
    )
    projector = parts["projector"] if mode == "latent" else None
    fast = HybridPipeline(planner, parts["executor"], projector, **kw)(QUESTIONS)
    naive = HybridPipeline(planner, parts["executor"], projector, naive=True, **kw)(QUESTIONS)
    assert naive.plan_ids == fast.plan_ids and naive.answer_ids == fast.answer_ids
    return fast, naive


@pytest.mark.parametrize("family", ["sdar", "fast_dllm_v2"])
@pytest.mark.parametrize("mode", ["latent", "text"])
def test_block_diffusion_planner_plugs_in_and_its_naive_loop_agrees(parts, family, mode):
    p_model = tiny_model(parts["p_tok"], causal=False, seed=21, std=0.2)
    planner = BlockDiffusionPlanner(
        p_model, family=family, mask_id=parts["p_tok"].mask_token_id, block_length=4
    )
    pk = {"gen_length": 8, "stop_token_ids": (parts["p_tok"].eos_token_id,)}
    fast, naive = fast_and_naive(parts, planner, mode, pk)
    assert fast.stats.plan_tokens == 8 * len(QUESTIONS) and not fast.stats.naive and naive.stats.naive
    if mode == "latent":
        assert fast.stats.latent_vectors == 2  # 8 hidden states, mean-pooled by 4


@pytest.mark.parametrize("mode", ["latent", "text"])
def test_dream_planner_naive_loop_is_dreams_sampler(parts, mode):
    model = tiny_model(parts["p_tok"], causal=False, seed=23, std=0.2)
    planner = DiffusionPlanner(model, family="dream")
    fast, naive = fast_and_naive(parts, planner, mode, {"gen_length": 8, "steps": 4, "alg": "entropy"})
    assert naive.stats.plan_steps == fast.stats.plan_steps == 4
    llada_kw = dict(
        planner_tokenizer=parts["p_tok"],
        executor_tokenizer=parts["e_tok"],
        planner_kwargs={"gen_length": 8, "steps": 4, "cfg_scale": 1.0},
        mode=mode,
    )
    with pytest.raises(
        ValueError, match=r"naive=True runs Dream's diffusion_generate, which has no \['cfg_scale'\]"
    ):
        HybridPipeline(planner, parts["executor"], parts["projector"], naive=True, **llada_kw)(QUESTIONS)


def test_kwargs_pass_through(parts):
    pipe = pipeline(parts, "latent")
    out = pipe(QUESTIONS[:2], planner_kwargs={"gen_length": 8, "steps": 4, "block_length": 8})
    assert out.stats.latent_vectors == 2 and out.stats.plan_steps == 4 and out.stats.plan_tokens == 16
    out = pipe(QUESTIONS[:2], executor_kwargs={"max_new_tokens": 2})
    assert all(len(a) <= 2 for a in out.answer_ids)
    out = pipe("sea ?")  # one string = one question
    assert len(out.answers) == 1
    sampled = pipe(QUESTIONS, executor_kwargs={"temperature": 1.0, "seed": 3, "num_samples": 2})
    again = pipe(QUESTIONS, executor_kwargs={"temperature": 1.0, "seed": 3, "num_samples": 2})
    assert len(sampled.answers) == 6 and sampled.answer_ids == again.answer_ids
    with pytest.raises(ValueError, match="no \\['cache'\\]"):
        pipeline(parts, "latent", naive=True)(QUESTIONS, planner_kwargs={"cache": "dual"})


def test_tokenizers_from_directories(parts):
    pipe = HybridPipeline(
        parts["planner"],
        parts["executor"],
        mode="text",
        planner_tokenizer=str(parts["dir"] / "planner_tok"),
        executor_tokenizer=parts["dir"] / "executor_tok",
        planner_kwargs=PK,
        executor_kwargs=EK,
    )
    assert pipe(QUESTIONS).answer_ids == pipeline(parts, "text")(QUESTIONS).answer_ids


def test_bad_input(parts):
    planner, executor, projector = parts["planner"], parts["executor"], parts["projector"]
    toks = dict(planner_tokenizer=parts["p_tok"], executor_tokenizer=parts["e_tok"])
    with pytest.raises(ValueError, match="mode must be one of"):
        HybridPipeline(planner, executor, projector, mode="latentish", **toks)
    with pytest.raises(ValueError, match="mode='latent' needs a projector"):
        HybridPipeline(planner, executor, mode="latent", **toks)
    with pytest.raises(ValueError, match="planner_dim = 32 does not match the planner's hidden_size = 64"):
        HybridPipeline(planner, executor, LatentProjector(planner_dim=32, executor_dim=64), **toks)
    with pytest.raises(ValueError, match="executor_dim = 96 does not match the executor's hidden_size = 64"):
        HybridPipeline(planner, executor, LatentProjector(planner_dim=64, executor_dim=96), **toks)
    with pytest.raises(ValueError, match="mode='text' needs planner_tokenizer and executor_tokenizer"):
        HybridPipeline(planner, executor, mode="text")
    with pytest.raises(ValueError, match="mode='text' needs planner_tokenizer"):
        HybridPipeline(planner, executor, mode="text", executor_tokenizer=parts["e_tok"])
    with pytest.raises(ValueError, match="not a directory"):
        HybridPipeline(
            planner, executor, mode="text", planner_tokenizer="/no/such/dir", executor_tokenizer="x"
        )
    with pytest.raises(TypeError, match="needs a DiffusionPlanner"):
        HybridPipeline(None, executor, mode="text", **toks)
    with pytest.raises(TypeError, match="executor must be an ARExecutor"):
        HybridPipeline(planner, executor.model, mode="text", **toks)
    pipe = HybridPipeline(planner, executor, projector, **toks)
    with pytest.raises(ValueError, match="questions is empty"):
        pipe([])
    with pytest.raises(TypeError, match=r"questions\[1\] must be a str"):
        pipe(["a", 3])
    with pytest.raises(ValueError, match="must contain \\{plan\\}"):
        PromptTemplates(text="Question: {question}\nAnswer:")
    HybridPipeline(None, executor, mode="ar", executor_tokenizer=parts["e_tok"])  # ar needs no planner


# ----------------------------------------------------------------------------- CLI
def test_cli_generate_uses_the_toy_models(quick_toy, monkeypatch, capsys):
    """Without model directories, generate answers with the toy Countdown models and checks each
    plan and answer; a question the tokenizers cannot encode is one error line and exit code 2."""
    import hybridkernels.toy

    monkeypatch.setattr(hybridkernels.toy, "toy_dir", lambda: quick_toy)
    for mode in ("latent", "text", "ar"):
        assert cli.main(["generate", "6,3,9,27", "4,5,6,26", "--mode", mode, "--device", "cpu"]) == 0
        captured = capsys.readouterr()
        assert "toy Countdown models" in captured.err
        assert captured.out.count("answer:") == 2 and f"mode {mode}:" in captured.out
        assert captured.out.count("check") == 4  # "[checks]" or "[does not check]" per plan and answer
    assert cli.main(["generate", "6,3,9,27", "--json", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["stats"]["mode"] == "latent" and out["stats"]["latent_vectors"] > 0
    assert cli.main(["generate", "what is the sky?", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "cannot encode" in err[-1] and "Traceback" not in "\n".join(err)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """The color task saved as checkpoint directories (tokenizer beside the weights) + a JSONL."""
    root = tmp_path_factory.mktemp("dirs")
    task = ColorTask(root)
    save_pretrained(task.planner.model, root / "planner", names="llada")
    save_pretrained(task.executor.model, root / "executor")
    task.planner_tokenizer.save_pretrained(root / "planner")
    task.executor_tokenizer.save_pretrained(root / "executor")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in task.train))
    return root, task


def test_cli_train_projector_then_generate(model_dirs, capsys):
    root, task = model_dirs
    models = ["--planner", str(root / "planner"), "--executor", str(root / "executor")]
    common = models + ["--gen-length", "4", "--planner-steps", "4", "--device", "cpu"]
    args = ["train-projector", "--data", str(root / "train.jsonl"), "--output", str(root / "proj")]
    args += common + ["--steps", "250", "--batch-size", "43", "--lr", "3e-3", "--no-progress"]
    assert cli.main(args + ["--checkpoint-dir", str(root / "ckpt"), "--checkpoint-every", "125"]) == 0
    assert "trained 250 steps on 86 examples" in capsys.readouterr().out
    assert (root / "proj" / "model.safetensors").is_file() and (root / "ckpt" / "checkpoint-0000250").is_dir()

    questions = [e["question"] for e in task.held_out]
    gen = ["generate", *questions, "--projector", str(root / "proj"), "--max-new-tokens", "3", "--json"]
    assert cli.main(gen + common) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["answers"] == [e["answer"] for e in task.held_out]
    assert cli.main(["generate", *questions[:2], "--mode", "ar", "--max-new-tokens", "2"] + common) == 0
    assert capsys.readouterr().out.count("answer:") == 2


def test_cli_errors(model_dirs, tmp_path, capsys, monkeypatch):
    root, _ = model_dirs
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "answer": "b"}\n{"question": "a", "answer": "b"}\n{"question": oops}\n')
    args = ["train-projector", "--data", str(bad), "--output", str(tmp_path / "p")]
    args += ["--planner", str(root / "planner"), "--executor", str(root / "executor")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:3: not valid JSON" in err and "train-projector: error" in err
    # An unwritable --output is reported before any model loads or trains, not after all steps.
    import hybridkernels.models.training as training

    monkeypatch.setattr(training, "train_projector", lambda *a, **k: pytest.fail("trained before checking"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    good = tmp_path / "good.jsonl"
    good.write_text('{"question": "a", "answer": "b"}\n')
    args = ["train-projector", "--data", str(good), "--output", str(blocker / "proj")]
    assert cli.main(args + ["--planner", str(root / "planner"), "--executor", str(root / "executor")]) == 2
    assert "--output" in capsys.readouterr().err
    assert cli.main(["generate", "q", "--executor", str(root / "executor")]) == 2
    assert "--mode latent needs --planner DIR" in capsys.readouterr().err
    gen = ["generate", "q", "--planner", str(root / "planner"), "--executor", str(root / "executor")]
    assert cli.main(gen) == 2
    assert "needs a projector" in capsys.readouterr().err
