"""``hybridkernels bench`` (tiny preset, one small case per stage) and ``benches/compare.py``."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from hybridkernels import bench

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_bench_rows_and_outputs(tmp_path, capsys):
    rows = bench.run(
        "tiny", device="cpu", batch=[2], gen_length=[16], reps=1,
        json_path=str(tmp_path / "b.json"), markdown_path=str(tmp_path / "b.md"),
    )  # fmt: skip
    stages = {r.stage for r in rows}
    assert stages == {"planner", "executor", "pipeline"}
    for r in rows:
        assert r.baseline_value > 0 and r.ours_value > 0 and r.speedup > 0
    # fp32: the fast paths' tokens equal the naive loops' (else bench.run raised BenchFailure)
    exact = [r for r in rows if "dual cache" not in r.ours]
    assert exact and all(r.agreement.endswith("tokens equal") for r in exact)
    for r in rows:  # planner and executor rows: the step time against its floor, on the CPU too
        if r.stage in ("planner", "executor"):
            assert r.step_ms > 0 and r.floor_ms > 0
            assert r.floor_fraction == pytest.approx(r.floor_ms / r.step_ms)
    out = capsys.readouterr().out
    assert "random" in out and "speedup" in out and "floor ms" in out and "timed by cpu clock" in out
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["preset"] == "tiny" and len(data["rows"]) == len(rows)
    assert "| stage |" in (tmp_path / "b.md").read_text()


def test_bad_arguments(monkeypatch):
    with pytest.raises(SystemExit, match="--preset must be one of"):
        bench.run("huge")
    with pytest.raises(SystemExit, match="unknown"):
        bench.run("tiny", device="cpu", stages=["nope"])
    with pytest.raises(SystemExit, match="needs a GPU"):
        bench.run("llada-8b", device="cpu")
    with pytest.raises(SystemExit, match=r"has the stages \['planner'\], not \['executor'\]"):
        # checked before any model is built
        monkeypatch.setitem(
            bench.PRESETS, "planner-only", dataclasses.replace(bench.PRESETS["llada-8b"], gpu_only=False)
        )
        bench.run("planner-only", device="cpu", stages=["executor"])


def _bench_json(path, value):
    row = {
        "stage": "planner",
        "case": "c",
        "ours": "o",
        "baseline": "b",
        "ours_value": value,
        "unit": "tok/s",
    }
    path.write_text(json.dumps({"rows": [row]}))


def test_compare_flags_slowdowns(tmp_path):
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    _bench_json(old, 100.0)
    _bench_json(new, 95.0)
    script = [sys.executable, str(ROOT / "benches" / "compare.py"), str(old), str(new)]
    assert subprocess.run(script, capture_output=True).returncode == 0
    _bench_json(new, 80.0)
    proc = subprocess.run(script, capture_output=True, text=True)
    assert proc.returncode == 1 and "SLOWER" in proc.stdout
    pb = {"benchmarks": [{"fullname": "t", "stats": {"median": 2.0}}]}
    old.write_text(json.dumps(pb))
    pb["benchmarks"][0]["stats"]["median"] = 1.0
    new.write_text(json.dumps(pb))
    assert subprocess.run(script, capture_output=True).returncode == 0


def test_readme_performance_section_matches_committed_results():
    script = [sys.executable, str(ROOT / "benches" / "render_readme.py"), "--check"]
    proc = subprocess.run(script, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_toy_bench_rows_and_outputs(quick_toy, tmp_path, capsys):
    from hybridkernels import bench_toy

    rows = bench_toy.run_toy(
        checkpoints=str(quick_toy), device="cpu", problems=6, rounds=2,
        json_path=str(tmp_path / "t.json"), markdown_path=str(tmp_path / "t.md"),
    )  # fmt: skip
    methods = [r.method for r in rows]
    for want in ("naive LLaDA loop", "prefix cache, threshold 0.9", "dual cache, threshold 0.5", "(NAP) k=8",
                 "executor alone", "AR->AR", "text: planner", "latent: planner"):  # fmt: skip
        assert any(want in m for m in methods), want
    planner = [r for r in rows if r.group == "planner"]
    assert len(planner) == 1 + 3 * 4 + 3 and all(r.plan_accuracy is not None for r in planner)
    for r in rows:
        assert 0 <= r.answer_accuracy <= 1 and r.tokens_per_s > 0 and r.speedup > 0 and r.spread >= 0
    nap8 = next(r for r in planner if r.method.endswith("k=8"))
    assert nap8.tokens_per_step > 4 and nap8.forward_passes < planner[0].forward_passes
    ar = next(r for r in rows if r.method.startswith("AR->AR"))
    text = next(r for r in rows if r.method.startswith("text: planner 1"))
    assert ar.executor_tokens > text.executor_tokens - 1e-9  # AR->AR's executor also writes the plan
    out = capsys.readouterr().out
    assert "target: dual cache + threshold 0.9" in out and "spread" in out
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["preset"] == "toy" and len(data["quality_rows"]) == len(rows) and data["rounds"] == 2
    assert "| group | method | answer acc." in (tmp_path / "t.md").read_text()


def test_step_floor_and_probes():
    """The floor of a step is max(bytes / copy bandwidth, flops / matmul rate), bytes = streamed
    weights (LM head included) + K/V, flops = layer matmuls + the LM head rows; the CPU copy
    probe reads written memory (an untouched buffer would read the shared zero page)."""
    from hybridkernels import benchmarking
    from hybridkernels.models import Transformer

    model = Transformer(bench._tiny(True))
    cfg = model.config
    f = benchmarking.step_floor(model, rows=2, queries=1, keys=10, head_rows=2)
    assert (
        f["bytes"]
        == benchmarking.streamed_weight_bytes(model) + 2 * 10 * cfg.num_layers * 2 * cfg.kv_size * 4
    )
    assert f["flops"] == benchmarking.forward_flops(cfg, 2, 10) + 2 * 2 * cfg.hidden_size * cfg.vocab_size
    assert f["floor_s"] == max(f["bytes_s"], f["flops_s"]) > 0
    assert f["bound"] in ("bandwidth", "compute")
    assert 0.1 < benchmarking.copy_bandwidth_gbs("cpu") < 1000


def test_time_alternating_clocks():
    from hybridkernels import benchmarking

    timings, outputs = benchmarking.time_alternating(
        {"a": lambda: sum(range(20000)), "b": lambda: 1}, "cpu", rounds=2, clock="cpu"
    )
    assert outputs == {"a": sum(range(20000)), "b": 1} and len(timings["a"].seconds) == 2
    with pytest.raises(ValueError, match="clock must be"):
        benchmarking.time_alternating({"a": lambda: 1}, "cpu", clock="gpu")
