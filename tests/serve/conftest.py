import pytest

from tests.serve import harness


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> str:
    return str(harness.write_tiny_gguf(tmp_path_factory.mktemp("serve") / "tiny.gguf"))


@pytest.fixture(scope="session")
def served(tiny_gguf):
    """One warmed-up server on the tiny model, shared by the API tests (each leaves it healthy)."""
    server = harness.ServerThread(tiny_gguf)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def offline(tiny_gguf):
    """An engine of the same model and config, run without the server: the expected outputs."""
    return harness.offline_engine(tiny_gguf)
