"""The serve CLI flags and TOML keys come from the config dataclasses: every field is reachable both
ways, nested fields by their path, and a flag beats the file, which beats the default."""

import dataclasses

import pytest

from jaxinfer import config_tree
from jaxinfer.serve.config import build_parser, parse_args, serve_settings


def _actions():
    return {action.dest: action for action in build_parser()._actions}


def test_every_field_of_the_tree_has_a_flag_and_a_config_key():
    tree = serve_settings()
    actions = _actions()
    assert len(tree) > 50
    for setting in tree:
        assert setting.name in actions, f"no flag for {setting.name}"
        default = setting.field.default
        table, key = setting.path[:-1], setting.path[-1]
        document = {key: list(default) if isinstance(default, tuple) else default}
        for name in reversed(table):
            document = {name: document}
        assert config_tree.values_from_toml(document, tree, "t.toml") == {setting.path: default}, setting.name


def test_nested_fields_by_their_path_from_flags_and_file(tmp_path):
    serve, engine = parse_args(["--sparse-prefill.unisparse.c-k", "4", "--speculative.gamma", "0.2,0.5,1.0",
                                "--decode-buckets", "1,4,16", "--no-speculative.adaptive", "--router", "round-robin",
                                "--max-num-seqs", "16"])
    assert engine.sparse_prefill.unisparse.c_k == 4 and engine.speculative.gamma == (0.2, 0.5, 1.0)
    assert engine.scheduler.decode_buckets == (1, 4, 16) and engine.speculative.adaptive is False
    assert serve.cluster.router == "round-robin" and engine.scheduler.max_num_seqs == 16
    config = tmp_path / "serve.toml"
    config.write_text('max_logprobs = 3\n[scheduler]\nmax_num_seqs = 8\ndecode_buckets = [1, 8]\n'
                      '[sparse_prefill.unisparse]\nc_k = 2\ntau = 0.9\n[speculative]\nmethod = "ngram"\n')
    serve, engine = parse_args(["--config", str(config), "--max-num-seqs", "4"])
    assert engine.max_logprobs == 3 and engine.scheduler.decode_buckets == (1, 8)
    assert engine.scheduler.max_num_seqs == 4  # the flag beats the file
    assert (engine.sparse_prefill.unisparse.c_k, engine.sparse_prefill.unisparse.tau) == (2, 0.9)
    assert engine.speculative.method == "ngram"
    assert dataclasses.replace(engine.sparse_prefill.unisparse, c_k=8, tau=0.96) == \
        type(engine.sparse_prefill.unisparse)()  # nothing else moved


@pytest.mark.parametrize("text, message", [
    ("[speculative]\nmethd = 'ngram'\n", "unknown key 'methd' in \\[speculative\\]"),
    ("[sparse_prefill.unisparce]\ntau = 0.9\n", "unknown table \\[sparse_prefill.unisparce\\]"),
    ("nonsense = 1\n", "unknown key 'nonsense' in the top level"),
])
def test_unknown_config_keys_are_named(tmp_path, text, message):
    config = tmp_path / "serve.toml"
    config.write_text(text)
    with pytest.raises(ValueError, match=message):
        parse_args(["--config", str(config)])


def test_bad_list_values_get_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--decode-buckets", "1,x"])
    assert "comma-separated list of int" in capsys.readouterr().err


def test_the_dtype_choices_are_what_the_loader_loads():
    from jaxinfer.config import WEIGHT_DTYPES
    from jaxinfer.layers.quant import QTYPES
    from jaxinfer.loader import FLOAT_DTYPES

    assert set(WEIGHT_DTYPES) == {*FLOAT_DTYPES, *QTYPES, "auto"}
