"""The toy: Countdown checkers and generator, tokenizers, shipped checkpoints, trainer smoke run."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import torch

from hybridkernels.models import ARExecutor, DiffusionPlanner, LatentProjector, Transformer
from hybridkernels.models.loading import detect_scheme, to_internal_name
from hybridkernels.toy import check_checkpoint_dir, heldout_problems, load_toy, toy_dir
from hybridkernels.toy.config import ANSWER_MAX_NEW_TOKENS, PLAN_MAX_NEW_TOKENS, TEMPLATES, planner_kwargs
from hybridkernels.toy.countdown import (
    Problem,
    check_answer,
    check_plan,
    evaluate_expression,
    generate_problems,
    parse_question,
    plan_to_answer,
    split_problems,
)
from hybridkernels.toy.evaluate import evaluate
from hybridkernels.toy.tokenization import (
    build_executor_tokenizer,
    build_planner_tokenizer,
    check_encodable,
    load_tokenizer_dir,
    save_tokenizer,
)

Q = "6,3,9,27"


# --------------------------------------------------------------------------- checkers
def test_check_plan_accepts_true_plans():
    assert check_plan(Q, "6-3=3,9*3=27")
    assert check_plan(Q, " 6 - 3 = 3 , 9 * 3 = 27 ")
    assert check_plan(Q, "3*9=27,27*1=27") is False  # 1 is not an input, 6 unused
    assert check_plan("2,3,4,20", "2+3=5,5*4=20")
    assert check_plan("2,3,4,20", "4*5=20,2+3=5") is False  # 5 used before it is produced
    assert check_plan("4,6,6,60", "6+4=10,10*6=60")  # duplicate inputs, each used once
    assert check_plan("10,2,1,5", "10/2=5,5*1=5")
    assert check_plan("1,2,3,4,24", "1*2=2,2*3=6,6*4=24")
    assert check_plan("3,6,2,5", "3-6=-3,2--3=5")  # a negative intermediate is fine when true
    assert check_plan("6,4,2,3", "6/4=3,3*2=6") is False  # 6/4 is not 3


@pytest.mark.parametrize(
    "plan, why",
    [
        ("6-3=4,9*4=36", "wrong arithmetic"),
        ("6-3=3,9*3=28", "wrong arithmetic in the last equation"),
        ("6-3=3,3*3=9", "reuses 3 (only one 3 left) and misses 9"),
        ("6-3=3,6*3=18", "reuses 6"),
        ("9*3=27", "missing number 6 (too few equations)"),
        ("6-3=3,9+3=12", "last result != target"),
        ("6-3=3,9*3=27,27-0=27", "extra equation with a number not in the question"),
        ("9/2=4,4*6=24", "inexact division"),
        ("6/0=0,9*3=27", "division by zero"),
        ("hello", "garbage"),
        ("6-3=3;9*3=27", "wrong separator"),
        ("6-3=3,9*3=27=27", "malformed equation"),
        ("", "empty"),
        ("   ", "blank"),
    ],
)
def test_check_plan_rejects(plan, why):
    assert not check_plan(Q, plan), why


def test_check_answer():
    assert check_answer(Q, "9*(6-3)")
    assert check_answer(Q, " (6 - 3) * 9 ")
    assert check_answer("6,4,2,3", "6/4*2")  # exact fractions: 6/4 = 3/2
    for bad in ["9*6-3", "9*(6-3)+0", "27", "9*(6-3", "9*3", "-(3-6)*9", "9**(6-3)", "", "  ", "9*(6-3)x",
                "__import__('os')", "9.0*(6-3)", "09*(6-3)", "9*(6-3)/(3-3)"]:  # fmt: skip
        assert not check_answer(Q, bad), bad
    assert evaluate_expression("1/0") is None


def test_bad_questions():
    for bad in ["", "   ", "6,3,x,27", "6;3;9;27", "27"]:
        with pytest.raises(ValueError, match="question"):
            check_plan(bad, "6-3=3,9*3=27")
    with pytest.raises(ValueError, match="empty question"):
        check_answer("", "1")
    assert parse_question(" 6, 3,9 ,27 ") == ([6, 3, 9], 27)


def test_plan_to_answer():
    assert plan_to_answer("6-3=3,9*3=27") == "9*(6-3)"
    assert plan_to_answer("9-5=4,10-4=6,6+1=7") == "10-(9-5)+1"
    assert plan_to_answer("12*6=72,72/12=6") == "12*6/12"
    assert plan_to_answer("8/4=2,6/2=3") == "6/(8/4)"
    with pytest.raises(ValueError):
        plan_to_answer("nonsense")


# --------------------------------------------------------------------------- generator
@pytest.mark.parametrize("n", [3, 4, 5])
def test_generator_deterministic_and_valid(n):
    a = generate_problems(n, 200, seed=7)
    assert a == generate_problems(n, 200, seed=7)
    assert a != generate_problems(n, 200, seed=8)
    assert len({p.question for p in a}) == 200
    for p in a:
        assert p.n == n and check_plan(p.question, p.plan) and check_answer(p.question, p.answer)
        assert p.answer == plan_to_answer(p.plan)
        assert len(p.plan.split(",")) == n - 1


def test_train_and_heldout_disjoint():
    train, held = split_problems(3, 3000, 300, train_seed=1, heldout_seed=1000)
    held_keys = {p.key for p in held}
    assert len(held_keys) == 300  # no two held-out problems are permutations of each other
    assert not held_keys & {p.key for p in train}  # nor of any training problem
    assert not {p.question for p in held} & {p.question for p in train}
    with pytest.raises(ValueError, match="differ"):
        split_problems(3, 10, 10, train_seed=1, heldout_seed=1)
    with pytest.raises(ValueError, match="ask for fewer"):
        generate_problems(3, 1000, 0, high=4)


# --------------------------------------------------------------------------- tokenizers
def test_tokenizers_round_trip_and_differ(tmp_path):
    p_tok, e_tok = build_planner_tokenizer(), build_executor_tokenizer()
    for text in [Q, "6-3=3,9*3=27", "9*(6-3)"]:
        for tok in (p_tok, e_tok):
            assert tok.decode(tok(text)["input_ids"]) == text
    assert set(p_tok.get_vocab()) != set(e_tok.get_vocab())
    assert p_tok("6-3=3")["input_ids"] != e_tok("6-3=3")["input_ids"]
    assert p_tok.mask_token == "<|mdm_mask|>" and e_tok.mask_token is None
    for tok, path in ((p_tok, tmp_path / "p"), (e_tok, tmp_path / "e")):
        save_tokenizer(tok, path)
        loaded = load_tokenizer_dir(path)
        assert loaded.get_vocab() == tok.get_vocab()
        assert (loaded.pad_token_id, loaded.eos_token_id, loaded.mask_token_id) == (
            tok.pad_token_id,
            tok.eos_token_id,
            tok.mask_token_id,
        )
        assert loaded.decode(
            loaded("Question: 6,3,9,27")["input_ids"] + [tok.eos_token_id], skip_special_tokens=True
        )


def test_shipped_tokenizers_load_with_autotokenizer():
    from transformers import AutoTokenizer

    p_tok = AutoTokenizer.from_pretrained(str(toy_dir() / "planner"), local_files_only=True)
    e_tok = AutoTokenizer.from_pretrained(str(toy_dir() / "executor"), local_files_only=True)
    assert p_tok.convert_ids_to_tokens(p_tok.mask_token_id) == "<|mdm_mask|>"
    assert p_tok.eos_token_id is not None and p_tok.pad_token_id is not None
    assert e_tok.eos_token_id is not None and e_tok.pad_token_id is not None
    assert p_tok.get_vocab() == build_planner_tokenizer().get_vocab()
    assert e_tok.get_vocab() == build_executor_tokenizer().get_vocab()


def test_unencodable_question_errors():
    p_tok, e_tok = build_planner_tokenizer(), build_executor_tokenizer()
    with pytest.raises(ValueError, match=r"'6,3,x,27'.*\['x'\]"):
        check_encodable(p_tok, "6,3,x,27", where="t")
    with pytest.raises(ValueError, match="'6,3,1000,27'"):
        check_encodable(e_tok, "6,3,1000,27", where="t")
    with pytest.raises(ValueError, match="empty question"):
        check_encodable(p_tok, "", where="t")
    assert check_encodable(p_tok, Q, where="t") == p_tok(Q)["input_ids"]


# --------------------------------------------------------------------------- shipped checkpoints
@pytest.fixture(scope="module")
def toy():
    return load_toy(backend="reference")


def test_shipped_files_and_size():
    root = check_checkpoint_dir(toy_dir())
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    assert size <= 20 * 2**20
    assert (root / "accuracy.json").is_file()


# Keys of LLaDA-8B's config.json (GSAI-ML/LLaDA-8B-Base / -Instruct).
LLADA_CONFIG_KEYS = {
    "activation_type", "alibi", "alibi_bias_max", "architectures", "attention_dropout",
    "attention_layer_norm", "attention_layer_norm_with_affine", "auto_map", "bias_for_layer_norm",
    "block_group_size", "block_type", "d_model", "embedding_dropout", "embedding_size", "eos_token_id",
    "flash_attention", "include_bias", "include_qkv_bias", "init_cutoff_factor", "init_device", "init_fn",
    "init_std", "input_emb_norm", "layer_norm_type", "layer_norm_with_affine", "mask_token_id",
    "max_sequence_length", "mlp_hidden_size", "mlp_ratio", "model_type", "multi_query_attention", "n_heads",
    "n_kv_heads", "n_layers", "pad_token_id", "precision", "residual_dropout", "rms_norm_eps", "rope",
    "rope_full_precision", "rope_theta", "scale_logits", "transformers_version", "use_cache", "vocab_size",
    "weight_tying",
}  # fmt: skip
LLADA_CORE_KEYS = {
    "d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_hidden_size", "vocab_size", "embedding_size",
    "rope_theta", "weight_tying", "block_type", "mask_token_id", "eos_token_id",
}  # fmt: skip
LLADA_TENSOR_RE = re.compile(
    r"model\.transformer\.(wte|ln_f|ff_out)\.weight"
    r"|model\.transformer\.blocks\.\d+\.(attn_norm|ff_norm|q_proj|k_proj|v_proj|attn_out|ff_proj|up_proj|ff_out)\.weight"
)


def test_planner_checkpoint_is_llada_format():
    from safetensors import safe_open

    path = toy_dir() / "planner"
    config = json.loads((path / "config.json").read_text())
    assert LLADA_CORE_KEYS <= set(config) <= LLADA_CONFIG_KEYS
    assert config["model_type"] == "llada" and config["architectures"] == ["LLaDAModelLM"]
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
    assert detect_scheme(names) == "llada"
    assert all(LLADA_TENSOR_RE.fullmatch(n) and to_internal_name(n, "llada") for n in names), names
    assert len(names) == 3 + 9 * config["n_layers"]
    model = Transformer.from_pretrained(path)
    assert not model.causal and model.config.family == "llada"
    assert model.config.mask_token_id == load_tokenizer_dir(path).mask_token_id
    planner = DiffusionPlanner(model)
    assert planner.mask_id == config["mask_token_id"] and planner.eos_id == config["eos_token_id"]


def test_executor_checkpoint_loads_in_transformers():
    from transformers import AutoModelForCausalLM

    path = toy_dir() / "executor"
    hf = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    ours = ARExecutor.from_pretrained(path, attention_backend="reference")
    ids = torch.tensor([load_tokenizer_dir(path)(TEMPLATES.latent.format(question=Q))["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(
            ours.model(ids, backend="reference").logits, hf(ids).logits, atol=1e-4, rtol=1e-4
        )
    LatentProjector.from_pretrained(toy_dir() / "projector")


def test_shipped_accuracy_reproduces(toy):
    """The first 64 held-out CD3 problems: every recorded accuracy within binomial noise."""
    planner, executor, projector, p_tok, e_tok, templates = toy
    recorded = json.loads((toy_dir() / "accuracy.json").read_text())["results"]["cd3"]
    problems = heldout_problems(3, 64)
    assert [p.question for p in problems] == [p.question for p in heldout_problems(3)[:64]]
    result = evaluate(
        problems,
        planner=planner,
        executor=executor,
        projector=projector,
        planner_tokenizer=p_tok,
        executor_tokenizer=e_tok,
        templates=templates,
        modes=("plan", "gold_plan", "text", "latent", "no_plan", "ar"),
        batch_size=64,
        plan_max_new_tokens=PLAN_MAX_NEW_TOKENS[3],
        max_new_tokens=ANSWER_MAX_NEW_TOKENS[3],
        backend="reference",
    )
    assert result["planner_options"] == planner_kwargs(3)
    for mode, acc in result["accuracy"].items():
        p = recorded["accuracy"][mode]
        tol = 4 * math.sqrt(max(p * (1 - p), 1 / 64) / 64) + 1 / 64
        assert abs(acc - p) <= tol, (mode, acc, p, tol)


def test_missing_tokenizer_is_named(tmp_path):
    shutil.copytree(toy_dir(), tmp_path / "ckpt")
    (tmp_path / "ckpt" / "executor" / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=r"executor/tokenizer\.json is missing"):
        load_toy(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer_dir(tmp_path / "ckpt" / "executor")
    with pytest.raises(ValueError, match="not a directory"):
        load_toy(tmp_path / "nowhere")


def test_evaluate_rejects_bad_input(toy):
    planner, executor, projector, p_tok, e_tok, _ = toy
    with pytest.raises(ValueError, match="no problems"):
        evaluate([], planner=planner, planner_tokenizer=p_tok, modes=("plan",))
    with pytest.raises(ValueError, match="need executor"):
        evaluate(heldout_problems(3, 2), modes=("gold_plan",))
    mixed = heldout_problems(3, 1) + generate_problems(4, 1, 0)
    with pytest.raises(ValueError, match="mix"):
        evaluate(mixed, planner=planner, planner_tokenizer=p_tok, modes=("plan",))
    assert isinstance(heldout_problems(3, 1)[0], Problem)


# --------------------------------------------------------------------------- trainer
def test_run_stage_resume_is_identical(tmp_path):
    from hybridkernels.toy.config import ModelShape, StageBudget
    from hybridkernels.toy.objectives import executor_loss, executor_rows
    from hybridkernels.toy.train import Interrupted, _init_model, executor_config, run_stage

    e_tok = build_executor_tokenizer()
    rows = [r for p in generate_problems(3, 16, 0) for r in executor_rows(e_tok, p, TEMPLATES)]
    shape = ModelShape(hidden_size=32, num_layers=1, num_heads=1, num_kv_heads=1, intermediate_size=64)
    budget = StageBudget(steps=4, batch_size=8, lr=1e-3, warmup=1)

    def train(work, stop_at=None):
        model = _init_model(executor_config(shape, e_tok), 0)

        def step_loss(step):
            if step == stop_at:
                raise KeyboardInterrupt
            return executor_loss(model, rows[step * 8 : step * 8 + 8], e_tok.pad_token_id)

        run_stage("executor", model, budget, step_loss, work, every=100, progress=False)
        return model

    straight = train(tmp_path / "a")
    with pytest.raises(Interrupted, match="step 2/4"):
        train(tmp_path / "b", stop_at=2)
    resumed = train(tmp_path / "b")
    for (n, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)


def test_train_toy_quick_cli(tmp_path, capsys):
    from hybridkernels.cli import main

    out = tmp_path / "run"
    assert main(["train-toy", str(out), "--quick", "--no-progress"]) == 0
    report = json.loads((out / "accuracy.json").read_text())
    assert set(report["results"]) == {"cd3", "cd4"}
    toy = load_toy(out, backend="reference")
    assert toy.planner.mask_id == toy.planner_tokenizer.mask_token_id
    assert not (out / "_work").exists()
    capsys.readouterr()
    assert main(["train-toy", str(out), "--quick", "--no-progress"]) == 2
    assert "not empty" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    assert main(["train-toy", str(tmp_path / "other"), "--quick", "--overwrite", "--no-progress"]) == 2
    assert "notes.txt" in capsys.readouterr().err and (tmp_path / "other" / "notes.txt").exists()
