"""GGUF loading: metadata -> config, llama.cpp q/k permutation undone, every dequantizable type."""

import dataclasses

import numpy as np
import pytest

from jaxinfer.layers import quant
from jaxinfer.layers.linear import QuantSpec
from jaxinfer.loader import load_model
from jaxinfer.loader.gguf_file import GGUFFile, unpermute_rows
from jaxinfer.models import model_from_tensors
from tests.conftest import tiny_config
from tests.loader import tiny_files
from tests.models import numpy_llama, paged

VOCAB = len(tiny_files.vocab_tokens())


def gguf_config(**kw):
    return tiny_config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, **kw)


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.random.default_rng(0).standard_normal((4 * 16, 5)).astype(np.float32)
    np.testing.assert_array_equal(unpermute_rows(tiny_files.llama_cpp_permute(w, 4), 4), w)


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_gguf_tensors_and_logits(tmp_path, qtype):
    cfg = gguf_config()
    tensors = numpy_llama.random_tensors(cfg, seed=5)
    stored = tiny_files.write_gguf(tmp_path / "m.gguf", cfg, tensors, qtype)
    source = GGUFFile(tmp_path / "m.gguf")
    assert source.config.rms_norm_eps == pytest.approx(cfg.rms_norm_eps)  # stored as float32
    assert dataclasses.replace(source.config, rms_norm_eps=cfg.rms_norm_eps) == cfg
    loaded = dict(source.tensors())
    assert loaded.keys() == stored.keys()
    for name, value in stored.items():
        np.testing.assert_array_equal(loaded[name], value, err_msg=name)
    if qtype == "F32":  # permutation undone exactly: the file's q/k equal the HF originals
        for name, value in tensors.items():
            np.testing.assert_array_equal(loaded[name], value, err_msg=name)
    model = load_model(str(tmp_path / "m.gguf"), "float32").model
    tokens = [3, 50, 7, 200, 9]
    expected = numpy_llama.forward(stored, cfg, tokens)
    logits, _ = paged.prefill(model, paged.new_cache(cfg), [(tokens, 0, paged.page_table(0, 4))])
    np.testing.assert_allclose(logits, expected, rtol=2e-4, atol=2e-4)
    if qtype.lower() in quant.QTYPES:  # the file's blocks kept as they are, run with float32 activations
        blocks = dict(source.tensors(keep_blocks=True))
        assert all(isinstance(value, quant.Blocks) for name, value in blocks.items() if name.endswith(".weight")
                   and "norm" not in name)
        spec = QuantSpec(linear=qtype.lower(), embed=qtype.lower(), activations="float32")
        model = model_from_tensors(source.config, source.tensors(keep_blocks=True), quant_spec=spec)
        logits, _ = paged.prefill(model, paged.new_cache(cfg), [(tokens, 0, paged.page_table(0, 4))])
        np.testing.assert_allclose(logits, expected, rtol=2e-4, atol=2e-4)
        auto = load_model(str(tmp_path / "m.gguf"), "auto").model.quant_spec
        assert (auto and auto.linear) == (qtype.lower() if quant.kernels_available() else None)


def test_untied_head_and_qwen2_bias(tmp_path):
    cfg = gguf_config(architecture="qwen2", attention_bias=True, tie_word_embeddings=False)
    tensors = numpy_llama.random_tensors(cfg, seed=6)
    stored = tiny_files.write_gguf(tmp_path / "q.gguf", cfg, tensors, "F32", arch="qwen2")
    source = GGUFFile(tmp_path / "q.gguf")
    assert source.config.architecture == "qwen2" and not source.config.tie_word_embeddings
    loaded = dict(source.tensors())
    assert any(name.endswith("q_proj.bias") for name in loaded)
    for name, value in loaded.items():  # qwen2 files are not permuted
        np.testing.assert_array_equal(value, stored[name], err_msg=name)


def test_unsupported_architecture_and_quant_type_are_clear_errors(tmp_path):
    import gguf

    cfg = gguf_config()
    tensors = numpy_llama.random_tensors(cfg, seed=7)
    tiny_files.write_gguf(tmp_path / "a.gguf", cfg, tensors, arch="falcon")
    with pytest.raises(ValueError, match="unsupported architecture 'falcon'"):
        GGUFFile(tmp_path / "a.gguf")
    bad = tensors.copy()
    raw = np.zeros((1, 40 * 2), np.uint8)  # two Q8_1 blocks of 32 values: gguf has no dequantizer
    tiny_files.write_gguf(tmp_path / "q.gguf", cfg, bad,
                          extra_tensor=("blk.0.attn_q.bias", raw, gguf.GGMLQuantizationType.Q8_1))
    with pytest.raises(ValueError, match="Q8_1 cannot be dequantized"):
        dict(GGUFFile(tmp_path / "q.gguf").tensors())


def test_truncated_file_is_a_clear_error(tmp_path):
    cfg = gguf_config()
    tiny_files.write_gguf(tmp_path / "m.gguf", cfg, numpy_llama.random_tensors(cfg))
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "t.gguf").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="t.gguf"):
        load_model(str(tmp_path / "t.gguf"))


def test_tokenizer_from_gguf_metadata(tmp_path):
    cfg = gguf_config()
    tiny_files.write_gguf(tmp_path / "m.gguf", cfg, numpy_llama.random_tensors(cfg))
    tok = GGUFFile(tmp_path / "m.gguf").tokenizer()
    reference = tiny_files.hf_tokenizer()
    text = "<|im_start|>user\nthe hello héllo, the<|im_end|>"
    ids = tok.encode(text)
    assert ids[0] == 1 and ids[-1] == 2  # specials matched whole
    tokens = tiny_files.vocab_tokens()
    assert tokens.index("Ġthe") in ids and tokens.index("Ġt") not in ids  # merges applied in rank order
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert ids == reference.encode(text).ids  # the same BPE as a tokenizer.json-built one
    digits = tok.encode("x 123")  # smollm pre-tokenizer: every digit alone, so "Ġ1" never merges
    assert tokens.index("Ġ1") not in digits and len(digits) == 5
    assert tok.eos_ids == (2,) and tok.bos_id == 1
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
