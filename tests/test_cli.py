"""The generate CLI as a user runs it: one-line errors with exit code 2, JSON output, streaming."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, tiny_config
from tests.loader import tiny_files
from tests.models import numpy_llama


def _run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "jaxinfer.generate", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "tiny.gguf"
    cfg = tiny_config(vocab_size=len(tiny_files.vocab_tokens()), max_position=64)
    tiny_files.write_gguf(path, cfg, numpy_llama.random_tensors(cfg, seed=12), "Q8_0")
    return path


def _assert_clean_error(proc, fragment):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_model_name():
    _assert_clean_error(_run("--model", "no-such-model", "--prompt", "hi"), "unknown model 'no-such-model'")


def test_missing_file():
    _assert_clean_error(_run("--model", "/nonexistent/m.gguf", "--prompt", "hi"), "model path not found")


def test_corrupt_files(tmp_path, tiny_gguf):
    (tmp_path / "junk.gguf").write_bytes(b"not a model at all")
    _assert_clean_error(_run("--model", str(tmp_path / "junk.gguf"), "--prompt", "hi"), "not a GGUF file")
    data = tiny_gguf.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    _assert_clean_error(_run("--model", str(tmp_path / "cut.gguf"), "--prompt", "hi"), "cut.gguf")


def test_unsupported_architecture(tmp_path):
    cfg = tiny_config(vocab_size=len(tiny_files.vocab_tokens()))
    tiny_files.write_gguf(tmp_path / "f.gguf", cfg, numpy_llama.random_tensors(cfg), arch="falcon")
    _assert_clean_error(_run("--model", str(tmp_path / "f.gguf"), "--prompt", "hi"), "unsupported architecture")


def test_prompt_longer_than_context(tiny_gguf):
    proc = _run("--model", str(tiny_gguf), "--prompt-ids", ",".join(["5"] * 64))
    _assert_clean_error(proc, "context limit of 64 tokens")


@pytest.mark.parametrize("args, fragment", [(["--temperature", "-1"], "temperature"),
                                            (["--max-tokens", "0"], "max_tokens"),
                                            (["--prompt-ids", "1,x"], "comma-separated")])
def test_bad_parameters(tiny_gguf, args, fragment):
    base = ["--model", str(tiny_gguf)] + ([] if "--prompt-ids" in args else ["--prompt", "hi"])
    _assert_clean_error(_run(*base, *args), fragment)


def test_json_output_and_speed_report(tiny_gguf):
    proc = _run("--model", str(tiny_gguf), "--prompt", "hello the", "--max-tokens", "5", "--ignore-eos", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) >= {"prompt_ids", "output_ids", "text"} and len(out["output_ids"]) == 5
    assert "prefill:" in proc.stderr and "tok/s" in proc.stderr


def test_weight_formats_and_the_fallback_without_kernels(tiny_gguf):
    """Every --dtype runs; without the CPU kernels (JAXINFER_CPU_KERNELS=0) the default falls back to
    float32 weights on XLA, with one notice, and gives the float32 tokens."""
    args = ("--model", str(tiny_gguf), "--prompt-ids", "5,6,7", "--max-tokens", "6", "--ignore-eos", "--json")
    runs = {dtype: _run(*args, "--dtype", dtype) for dtype in ("float32", "q8_0", "q4_1", "auto")}
    for dtype, proc in runs.items():
        assert proc.returncode == 0, (dtype, proc.stderr)
        assert len(json.loads(proc.stdout)["output_ids"]) == 6
    fallback = _run(*args, env=dict(os.environ, JAXINFER_CPU_KERNELS="0"))
    assert fallback.returncode == 0, fallback.stderr
    assert json.loads(fallback.stdout)["output_ids"] == json.loads(runs["float32"].stdout)["output_ids"]


@pytest.mark.real_model
def test_real_model_chat_answer(real_model):
    # float32 weights: the default (Q4_1 blocks, int8 activations) answers with llama.cpp's near-tie
    # choice on this prompt ("The" and "L" are 0.08 logits apart)
    proc = _run("--prompt", "What is the capital of France?", "--chat", "--max-tokens", "24", "--dtype", "float32")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert "decode:" in proc.stderr
