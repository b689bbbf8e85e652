"""Speculative decoding settings from the serve CLI/TOML, and how a draft head is found or refused."""

import json

import pytest

from jaxinfer.config import SpeculativeConfig
from jaxinfer.serve.config import parse_args
from jaxinfer.spec.draft_head import CALIBRATION, prepare_speculative, save_draft_head
from tests.spec.test_eagle import _head


def test_cli_and_toml_set_the_speculative_config(tmp_path):
    _, engine = parse_args([])
    assert engine.speculative.method == "off"
    _, engine = parse_args(["--speculative", "ngram", "--spec-nodes", "8", "--spec-depth", "3", "--spec-top-k", "2",
                            "--spec-max-batch", "2"])
    spec = engine.speculative
    assert (spec.method, spec.num_nodes, spec.depth, spec.top_k, spec.max_batch) == ("ngram", 8, 3, 2, 2)
    config = tmp_path / "serve.toml"
    config.write_text('[engine]\nspeculative = "eagle"\ndraft = "/heads/x"\nspec_nodes = 12\n')
    _, engine = parse_args(["--config", str(config)])
    assert (engine.speculative.method, engine.speculative.draft, engine.speculative.num_nodes) == (
        "eagle", "/heads/x", 12)
    with pytest.raises(SystemExit):
        parse_args(["--speculative", "medusa"])
    with pytest.raises(ValueError, match="num_nodes"):
        parse_args(["--speculative", "ngram", "--spec-nodes", "1"])


def test_draft_heads_are_found_or_refused_with_a_clear_error(tmp_path):
    assert prepare_speculative(SpeculativeConfig(method="ngram"), "any") == (
        SpeculativeConfig(method="ngram", depth=4, num_nodes=16), None)  # no tuned policy: the defaults
    with pytest.raises(ValueError, match="no draft head is shipped for model 'my-model'"):
        prepare_speculative(SpeculativeConfig(method="eagle"), "my-model")
    save_draft_head(tmp_path / "head", _head())
    config, head = prepare_speculative(SpeculativeConfig(method="eagle", draft=str(tmp_path / "head")), "m")
    assert head is not None and head.config == _head().config
    heterospec = SpeculativeConfig(method="heterospec", draft=str(tmp_path / "head"), depth=3, top_k=3)
    with pytest.raises(ValueError, match="calibrate_spec"):
        prepare_speculative(heterospec, "m")
    (tmp_path / "head" / CALIBRATION).write_text(json.dumps({"thresholds": [0.5, 1.0, 2.0],
                                                             "policy": {"depth": 3, "top_k": 3}}))
    config, _ = prepare_speculative(heterospec, "m")
    assert config.thresholds == (0.5, 1.0, 2.0)
    with pytest.raises(ValueError, match="fitted for depth 3"):
        prepare_speculative(SpeculativeConfig(method="heterospec", draft=str(tmp_path / "head"), depth=5), "m")
    # the policy calibrate_spec.py --tune chose fills what the user left unset (and only that)
    (tmp_path / "head" / CALIBRATION).write_text(json.dumps({"thresholds": [0.5, 1.0, 2.0],
                                                             "policy": {"depth": 3, "top_k": 4, "nodes": 6}}))
    config, _ = prepare_speculative(SpeculativeConfig(method="heterospec", draft=str(tmp_path / "head")), "m")
    assert (config.depth, config.num_nodes, config.thresholds) == (3, 6, (0.5, 1.0, 2.0))
    config, _ = prepare_speculative(SpeculativeConfig(method="eagle", draft=str(tmp_path / "head"), num_nodes=10), "m")
    assert (config.depth, config.num_nodes) == (3, 10)
    config, _ = prepare_speculative(SpeculativeConfig(method="eagle", draft=str(tmp_path / "head"), top_k=2), "m")
    assert (config.depth, config.num_nodes) == (4, 16)  # tuned for another top-k: the defaults
    with pytest.raises(ValueError, match="not a valid draft head"):
        prepare_speculative(SpeculativeConfig(method="eagle", draft=str(tmp_path)), "m")
