from tests.serve.conftest import tiny_gguf  # noqa: F401 - the tiny GGUF model the serve tests use
