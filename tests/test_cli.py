"""The ``hybridkernels`` console script."""

import json
import shutil
import subprocess

import pytest

from hybridkernels import cli


def test_info_text(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for words in ("hybridkernels", "torch", "triton", "_C extension", "bidirectional_attention", "kv_append"):
        assert words in out


def test_info_json(capsys):
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["extension"]["importable"] is True
    assert set(info["op_backends"]) == {
        "bidirectional_attention",
        "unmask_step",
        "decode_attention",
        "kv_append",
    }
    assert info["op_backends"]["kv_append"]["cpu"] == "cuda"  # _C's C++ path


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "info" in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("hybridkernels") is None, reason="console script not on PATH")
def test_console_script_help():
    out = subprocess.run(["hybridkernels", "--help"], capture_output=True, text=True, check=True).stdout
    assert "info" in out
