"""Benchmark data with and without the shared data folder."""

import gzip
import json

import pytest

from jaxinfer import datasets


@pytest.fixture
def no_shared(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXINFER_SHARED", str(tmp_path / "absent"))


def test_builtin_prompt_sets_stand_in_without_the_shared_folder(no_shared, capsys):
    for name, least in (("mt_bench", 20), ("gsm8k", 12), ("humaneval", 6)):
        prompts = datasets.prompt_set(name, start=660, count=100)  # start only applies to the real files
        assert prompts.builtin and least <= len(prompts.prompts) <= 100
        assert all(isinstance(p, str) and len(p) > 20 for p in prompts.prompts)
        assert len(set(prompts.prompts)) == len(prompts.prompts)
    assert "builtin humaneval stand-ins" in capsys.readouterr().err
    assert all(p.startswith("def ") for p in datasets.prompt_set("humaneval").prompts)
    with pytest.raises(ValueError, match="unknown prompt set 'sharegpt'"):
        datasets.prompt_set("sharegpt")


def test_shared_prompt_files_are_read_with_their_own_fields(monkeypatch, tmp_path):
    prompts = tmp_path / "data" / "prompts"
    prompts.mkdir(parents=True)
    (prompts / "mt_bench_question.jsonl").write_text(
        "\n".join(json.dumps({"turns": [f"q{i}", "follow-up"]}) for i in range(5)) + "\n")
    with gzip.open(prompts / "HumanEval.jsonl.gz", "wt") as f:
        f.write(json.dumps({"prompt": "def f():\n", "task_id": "x"}) + "\n")
    monkeypatch.setenv("JAXINFER_SHARED", str(tmp_path))
    got = datasets.prompt_set("mt_bench", start=1, count=2)
    assert got.prompts == ["q1", "q2"] and got.source.endswith("mt_bench_question.jsonl") and not got.builtin
    assert datasets.prompt_set("humaneval").prompts == ["def f():\n"]
    assert datasets.prompt_set("gsm8k").builtin  # this file is missing: the stand-ins


def test_long_texts_fall_back_to_the_package_sources(no_shared):
    texts, source = datasets.long_texts()
    assert source == "jaxinfer sources" and sum(len(t) for t in texts) > 200_000


def test_long_texts_of_the_shared_folder_drop_gutenberg_markers(monkeypatch, tmp_path):
    essays = tmp_path / "data" / "longtext" / "PaulGrahamEssays"
    essays.mkdir(parents=True)
    (essays / "b.txt").write_text("second essay")
    (essays / "a.txt").write_text("first essay")
    (essays / "rss.txt").write_text("stub")
    for name in datasets.BOOKS:
        (essays.parent / name).write_text(f"*** START ***\n{name} body\n*** END ***\n")
    monkeypatch.setenv("JAXINFER_SHARED", str(tmp_path))
    texts, _ = datasets.long_texts()
    assert texts == ["first essay", "second essay", *(f"{name} body" for name in datasets.BOOKS)]


def test_missing_trace_names_itself(no_shared):
    with pytest.raises(FileNotFoundError, match="mooncake_synthetic_trace.jsonl not found .* JAXINFER_SHARED"):
        datasets.trace_file("mooncake_synthetic")
    with pytest.raises(ValueError, match="unknown trace"):
        datasets.trace_file("nope")
