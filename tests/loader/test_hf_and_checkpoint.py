"""Hugging Face directories and jaxinfer (orbax) checkpoints: load, convert, reload."""

import json
import subprocess
import sys

import numpy as np
import pytest

from jaxinfer.loader import load_model
from jaxinfer.loader.checkpoint import save_checkpoint
from tests.conftest import REPO, tiny_config
from tests.loader import tiny_files
from tests.models import numpy_llama, paged

VOCAB = len(tiny_files.vocab_tokens())
TOKENS = [3, 50, 7, 200, 9, 11]


def _logits(model, cfg):
    logits, _ = paged.prefill(model, paged.new_cache(cfg, dtype=model.dtype), [(TOKENS, 0, paged.page_table(0, 4))])
    return logits


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_directory_matches_numpy_reference(tmp_path, dtype):
    cfg = tiny_config(vocab_size=VOCAB, tie_word_embeddings=False)
    tensors = numpy_llama.random_tensors(cfg, seed=8)
    tiny_files.write_hf_dir(tmp_path, cfg, tensors, dtype=dtype)
    loaded = load_model(str(tmp_path), "float32")
    assert loaded.config == cfg
    on_disk = {k: v.astype(np.float32) if dtype == "float32" else _bf16_round(v) for k, v in tensors.items()}
    np.testing.assert_allclose(_logits(loaded.model, cfg), numpy_llama.forward(on_disk, cfg, TOKENS),
                               rtol=2e-4, atol=2e-4)
    assert loaded.tokenizer.eos_ids == (2,)
    assert loaded.tokenizer.encode("hello the") == tiny_files.hf_tokenizer().encode("hello the").ids


def _bf16_round(x):
    import ml_dtypes

    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def test_hf_directory_errors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("dtype", ["float32", "q8_0"])
def test_checkpoint_roundtrip_is_exact(tmp_path, dtype):
    cfg = tiny_config(vocab_size=VOCAB)
    tiny_files.write_gguf(tmp_path / "m.gguf", cfg, numpy_llama.random_tensors(cfg, seed=9), "Q8_0")
    original = load_model(str(tmp_path / "m.gguf"), dtype)
    save_checkpoint(tmp_path / "ckpt", original.model, original.tokenizer, source="test")
    reloaded = load_model(str(tmp_path / "ckpt"))  # auto: the format it was saved in
    assert reloaded.config == original.config and reloaded.model.quant_spec == original.model.quant_spec
    np.testing.assert_array_equal(_logits(reloaded.model, cfg), _logits(original.model, cfg))
    text = "<|im_start|>user\nthe hello<|im_end|>"
    assert reloaded.tokenizer.encode(text) == original.tokenizer.encode(text)
    assert reloaded.tokenizer.eos_ids == original.tokenizer.eos_ids
    messages = [{"role": "user", "content": "hi"}]
    assert reloaded.tokenizer.apply_chat_template(messages) == original.tokenizer.apply_chat_template(messages)
    if dtype == "float32":
        as_bf16 = load_model(str(tmp_path / "ckpt"), "bfloat16")
        assert str(as_bf16.model.embed_tokens[...].dtype) == "bfloat16"
    else:
        with pytest.raises(ValueError, match="holds q8_0 blocks"):
            load_model(str(tmp_path / "ckpt"), "bfloat16")


def test_convert_cli_then_generate_from_checkpoint(tmp_path):
    cfg = tiny_config(vocab_size=VOCAB)
    tiny_files.write_gguf(tmp_path / "m.gguf", cfg, numpy_llama.random_tensors(cfg, seed=10), "Q4_1")
    run = [sys.executable, "-m", "jaxinfer.convert", "--model", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "c")]
    assert subprocess.run(run, cwd=REPO, capture_output=True, text=True).returncode == 0
    outputs = []
    for model in (tmp_path / "m.gguf", tmp_path / "c"):
        proc = subprocess.run([sys.executable, "-m", "jaxinfer.generate", "--model", str(model), "--prompt-ids",
                               "5,6,7", "--max-tokens", "6", "--ignore-eos", "--json"],
                              cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        outputs.append(json.loads(proc.stdout))
    assert outputs[0] == outputs[1]
    assert len(outputs[0]["output_ids"]) == 6
    # a non-checkpoint directory is never overwritten
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "file.txt").write_text("x")
    proc = subprocess.run(run[:-1] + [str(tmp_path / "keep")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "refusing to overwrite" in proc.stderr
    assert (tmp_path / "keep" / "file.txt").exists()


def test_sampling_defaults_from_gguf_survive_conversion(tmp_path):
    cfg = tiny_config(vocab_size=VOCAB)
    tiny_files.write_gguf(tmp_path / "m.gguf", cfg, numpy_llama.random_tensors(cfg, seed=11),
                          sampling={"temp": 0.7, "top_k": 40, "top_p": 0.8, "penalty_repeat": 1.1})
    loaded = load_model(str(tmp_path / "m.gguf"), "float32")
    assert loaded.sampling_defaults == pytest.approx({"temperature": 0.7, "top_k": 40, "top_p": 0.8,
                                                      "repetition_penalty": 1.1})
    save_checkpoint(tmp_path / "ckpt", loaded.model, loaded.tokenizer, source="t", sampling=loaded.sampling_defaults)
    assert load_model(str(tmp_path / "ckpt")).sampling_defaults == loaded.sampling_defaults
    tiny_files.write_gguf(tmp_path / "plain.gguf", cfg, numpy_llama.random_tensors(cfg, seed=11))
    assert load_model(str(tmp_path / "plain.gguf"), "float32").sampling_defaults == {}


@pytest.mark.parametrize("generation_config, expected", [
    ({"do_sample": True, "temperature": 0.6, "top_p": 0.9, "eos_token_id": 2}, {"temperature": 0.6, "top_p": 0.9}),
    ({"temperature": 0.6, "top_k": 20, "bos_token_id": 1}, {"temperature": 0.6, "top_k": 20}),
    ({"do_sample": False, "temperature": 0.6, "repetition_penalty": 1.2}, {"temperature": 0.0,
                                                                           "repetition_penalty": 1.2}),
    ({"bos_token_id": 1, "eos_token_id": 2}, {}),
    (None, {}),
])
def test_sampling_defaults_from_hf_generation_config(tmp_path, generation_config, expected):
    cfg = tiny_config(vocab_size=VOCAB)
    tiny_files.write_hf_dir(tmp_path, cfg, numpy_llama.random_tensors(cfg, seed=12))
    if generation_config is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation_config))
    assert load_model(str(tmp_path), "float32").sampling_defaults == expected


def test_bad_sampling_defaults_name_the_file(tmp_path):
    cfg = tiny_config(vocab_size=VOCAB)
    tiny_files.write_hf_dir(tmp_path, cfg, numpy_llama.random_tensors(cfg, seed=12))
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": -1.0}))
    with pytest.raises(ValueError, match=r"generation_config.json: bad sampling default: temperature must be"):
        load_model(str(tmp_path), "float32")
    (tmp_path / "generation_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="is not a JSON object"):
        load_model(str(tmp_path), "float32")


def test_embedded_models_ship_valid_sampling_defaults():
    from jaxinfer.loader.embedded import EMBEDDED_MODELS
    from jaxinfer.loader.sampling_defaults import checked

    for name, model in EMBEDDED_MODELS.items():
        assert checked(dict(model.sampling), name) == dict(model.sampling)
