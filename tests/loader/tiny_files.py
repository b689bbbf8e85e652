"""Writers of tiny model files for loader tests: a GGUF (as llama.cpp lays it out) and an HF directory."""

import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "l l", "Ġ 1"]
CHAT_TEMPLATE = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}"
                 "{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}")


def vocab_tokens():
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    return SPECIALS + alphabet + ["".join(m.split(" ")) for m in MERGES]


def llama_cpp_permute(w, n_head):
    """llama.cpp's conversion of HF q/k rows to interleaved rotary pairs (written for the test)."""
    out = np.empty_like(w)
    d = w.shape[0] // n_head
    for h in range(n_head):
        block = w[h * d:(h + 1) * d]
        out[h * d:(h + 1) * d][0::2] = block[: d // 2]
        out[h * d:(h + 1) * d][1::2] = block[d // 2:]
    return out


GGUF_NAMES = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
              "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
              "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
              "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
              "mlp.down_proj.weight": "ffn_down.weight"}


def gguf_name(hf):
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf.split(".", 3)
    if rest.endswith(".bias"):
        return f"blk.{layer}.{GGUF_NAMES[rest[:-5] + '.weight'][:-7]}.bias"
    return f"blk.{layer}.{GGUF_NAMES[rest]}"


def write_gguf(path, cfg, tensors, qtype_name="F32", arch="llama", extra_tensor=None, sampling=None):
    """Write ``tensors`` (HF names, HF layout) as a GGUF file; matrices in ``qtype_name``; ``sampling``:
    general.sampling.* keys (float values, except top_k).

    Returns the tensors as the file holds them after quantization (HF layout), for comparison.
    """
    import gguf
    from gguf import GGMLQuantizationType as Q

    qtype = Q[qtype_name]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_layers)
    writer.add_context_length(cfg.max_position)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    tokens = vocab_tokens()
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    for key, value in (sampling or {}).items():
        (writer.add_int32 if key.endswith("top_k") else writer.add_float32)(f"general.sampling.{key}", value)
    stored = {}
    for name, value in tensors.items():
        value = np.asarray(value, np.float32)
        heads = {"q_proj": cfg.num_heads, "k_proj": cfg.num_kv_heads}.get(name.split(".")[-2])
        on_disk = value if heads is None or arch != "llama" else llama_cpp_permute(value, heads)
        kind = qtype if value.ndim == 2 else Q.F32
        if kind == Q.F32:
            data = on_disk
        elif kind == Q.F16:
            data = on_disk.astype(np.float16)
        else:
            data = gguf.quants.quantize(on_disk, kind)
        writer.add_tensor(gguf_name(name), data, raw_dtype=None if kind in (Q.F32, Q.F16) else kind)
        back = np.asarray(data, np.float32) if kind in (Q.F32, Q.F16) else gguf.quants.dequantize(data, kind)
        stored[name] = back if heads is None or arch != "llama" else _unpermute(back, heads)
    if extra_tensor is not None:
        writer.add_tensor(*extra_tensor[:2], raw_dtype=extra_tensor[2])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def _unpermute(w, n_head):
    out = np.empty_like(w)
    d = w.shape[0] // n_head
    for h in range(n_head):
        block = w[h * d:(h + 1) * d]
        out[h * d:(h + 1) * d][: d // 2] = block[0::2]
        out[h * d:(h + 1) * d][d // 2:] = block[1::2]
    return out


def hf_tokenizer():
    tokens = vocab_tokens()
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                               merges=[tuple(m.split(" ")) for m in MERGES]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return tok


def write_hf_dir(directory, cfg, tensors, dtype="float32"):
    """config.json + model.safetensors (float32 or bfloat16) + tokenizer files."""
    import jax.numpy as jnp
    from safetensors.flax import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[cfg.architecture]
    config = {"architectures": [arch], "model_type": cfg.architecture, "vocab_size": cfg.vocab_size,
              "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
              "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
              "num_key_value_heads": cfg.num_kv_heads, "rope_theta": cfg.rope_theta,
              "rms_norm_eps": cfg.rms_norm_eps, "max_position_embeddings": cfg.max_position,
              "tie_word_embeddings": cfg.tie_word_embeddings, "eos_token_id": 2, "bos_token_id": 1}
    (directory / "config.json").write_text(json.dumps(config))
    save_file({k: jnp.asarray(v, dtype) for k, v in tensors.items()}, str(directory / "model.safetensors"))
    hf_tokenizer().save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHAT_TEMPLATE, "eos_token": "<|im_end|>", "bos_token": "<|im_start|>"}))
