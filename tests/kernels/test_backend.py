import pytest

from pallas_kernels import resolve_impl, resolve_interpret


def test_cpu_resolves_to_reference_and_interpret(monkeypatch):
    monkeypatch.delenv("JAXINFER_PALLAS_INTERPRET", raising=False)
    assert resolve_impl("auto") == "reference"
    assert resolve_impl("pallas") == "pallas"
    assert resolve_interpret(None) is True
    assert resolve_interpret(False) is False


def test_environment_override_and_bad_values(monkeypatch):
    monkeypatch.setenv("JAXINFER_PALLAS_INTERPRET", "0")
    assert resolve_interpret(None) is False
    monkeypatch.setenv("JAXINFER_PALLAS_INTERPRET", "yes")
    with pytest.raises(ValueError, match="JAXINFER_PALLAS_INTERPRET"):
        resolve_interpret(None)
    with pytest.raises(ValueError, match="unknown attention impl 'fast'"):
        resolve_impl("fast")
