"""CostModel: bucketing, extrapolation, derived costs and JSON validation, against hand arithmetic."""

import json

import numpy as np
import pytest

from jaxinfer.router.cost_model import CostModel

A, B, C = 0.01, 0.001, 1e-6  # decode: a + b*batch + c*batch*kv
PA, PB, PC = 0.02, 1e-4, 1e-8  # prefill: a + b*tokens + c*tokens*kv


def _dict(**overrides):
    batch, kv, tokens = [1, 2, 4], [256, 512], [64, 128]
    d = {"hardware": "test", "model": "m", "dtype": "bfloat16", "date": "2025-01-01", "page_size": 16,
         "kv_bytes_per_token": 1000, "kv_capacity_tokens": 8192, "max_num_seqs": 4, "max_num_batched_tokens": 128,
         "decode": {"batch": batch, "kv_len": kv, "seconds": [[A + B * b + C * b * s for s in kv] for b in batch]},
         "prefill": {"tokens": tokens, "kv_len": kv,
                     "seconds": [[PA + PB * t + PC * t * s for s in kv] for t in tokens]},
         "copy_bytes_per_second": 1e6}
    d.update(overrides)
    return d


def _decode(b, s):
    return A + B * b + C * b * s


def _prefill(t, s):
    return PA + PB * t + PC * t * s


def test_lookup_rounds_rows_up_and_interpolates_the_context():
    cm = CostModel.from_dict(_dict())
    assert cm.decode_seconds(3, 300) == pytest.approx(_decode(4, 300))  # batch 3 -> 4, kv between 256 and 512
    # below the first KV bucket: from the fit's zero-context time (exact on a linear grid)
    assert cm.decode_seconds(1, 1) == pytest.approx(_decode(1, 1))
    assert cm.decode_seconds(2, 256) == pytest.approx(_decode(2, 256))
    d = _dict()  # a grid that is not linear in the context: the interpolation is between its points
    d["decode"]["seconds"] = [[0.010, 0.030] for _ in d["decode"]["batch"]]
    assert CostModel.from_dict(d).decode_seconds(1, 448) == pytest.approx(0.025)
    assert cm.prefill_seconds(65, 200) == pytest.approx(_prefill(128, 256))  # tokens 65 -> 128, kv 200 -> 256
    assert cm.decode_seconds(0, 1000) == 0.0 and cm.prefill_seconds(0, 10) == 0.0


def test_extrapolates_past_the_grid_from_the_corner():
    cm = CostModel.from_dict(_dict())
    assert cm.decode_fit() == pytest.approx((A, B, C), rel=1e-6)
    # past the kv grid: the kv value is exact, the batch still rounds up (3 -> 4)
    assert cm.decode_seconds(3, 1000) == pytest.approx(_decode(4, 512) + C * (4 * 1000 - 4 * 512))
    assert cm.decode_seconds(3, 1000) == pytest.approx(_decode(4, 1000))
    assert cm.decode_seconds(3, 1000) == pytest.approx(_decode(4, 1000))
    assert cm.decode_seconds(8, 2048) == pytest.approx(_decode(8, 2048))  # both past the grid
    assert cm.decode_seconds(16, 100_000) > cm.decode_seconds(8, 100_000) > cm.decode_seconds(8, 2048)
    assert cm.prefill_seconds(1000, 5000) == pytest.approx(_prefill(1000, 5000))


def test_noisy_grid_fit_drops_a_negative_slope():
    d = _dict()
    kv = d["decode"]["kv_len"]
    # time falls slightly with batch at short kv: least squares would give b < 0
    d["decode"]["seconds"] = [[0.010 + 1e-6 * b * s - 0.0004 * b for s in kv] for b in d["decode"]["batch"]]
    a, b, c = CostModel.from_dict(d).decode_fit()
    assert b == 0.0 and c > 0


def test_step_transfer_recompute():
    cm = CostModel.from_dict(_dict())
    assert cm.step_seconds(0, 0, 0, 0) == 0.0
    assert cm.step_seconds(2, 300, 64, 100) == pytest.approx(_decode(2, 300) + _prefill(64, 256))
    assert cm.transfer_seconds(500) == pytest.approx(500 * 1000 / 1e6)
    # 300 tokens in chunks of 128: (128, kv 128 -> 256), (128, 256), (44 -> 64, kv 300 -> 512)
    expected = _prefill(128, 256) + _prefill(128, 256) + _prefill(64, 512)
    assert cm.recompute_seconds(300) == pytest.approx(expected)


def test_round_trip_and_capacity(tmp_path):
    cm = CostModel.from_dict(_dict(notes="kept"))
    path = tmp_path / "cm.json"
    cm.save(path)
    again = CostModel.load(path)
    assert again == cm and again.extra == {"notes": "kept"}
    assert json.loads(path.read_text())["decode"]["batch"] == [1, 2, 4]
    big = cm.with_capacity(1 << 20)
    assert big.kv_capacity_tokens == 1 << 20 and big.decode_seconds(3, 300) == cm.decode_seconds(3, 300)
    assert big.kv_capacity_pages == (1 << 20) // 16


def test_synthetic_recovers_its_coefficients():
    cm = CostModel.synthetic(decode=(0.005, 1e-5, 2e-8), prefill=(0.004, 3e-5, 1e-12), max_len=8192)
    assert cm.decode_fit() == pytest.approx((0.005, 1e-5, 2e-8), rel=1e-6)
    assert cm.decode_kv[-1] >= 8192 and cm.decode_batch[-1] >= cm.max_num_seqs
    assert cm.decode_seconds(100, 100_000) == pytest.approx(0.005 + 1e-5 * 128 + 2e-8 * 128 * 100_000)  # 100 -> 128


def test_a_mixed_batch_costs_its_effective_length():
    # without decode_mix_padding every row costs the longest (the mean is ignored)
    cm = CostModel.from_dict(_dict())
    assert cm.decode_seconds(4, 500, 300) == pytest.approx(_decode(4, 500))
    cm = CostModel.from_dict(_dict(decode_mix_padding=0.25))
    assert cm.decode_seconds(4, 500, 300) == pytest.approx(_decode(4, 300 + 0.25 * 200))
    assert cm.decode_seconds(4, 500, 500) == pytest.approx(_decode(4, 500))  # homogeneous: the table
    assert cm.step_parts(4, 500, 0, 0, 300)[0] == cm.decode_seconds(4, 500, 300)
    assert cm.decode_seconds_array([4, 2], [500, 500], [300, 500]) == pytest.approx(
        [cm.decode_seconds(4, 500, 300), cm.decode_seconds(2, 500, 500)])
    synthetic = CostModel.synthetic()
    assert synthetic.mix_padding == 0.1
    # the synthetic GPU profile's assumption: attention of one 8K row among 31 x 512 is ~2x a
    # homogeneous batch of the same summed context (the paper's upper end)
    c = synthetic.decode_fit()[2]
    mixed = synthetic.decode_seconds(32, 8192, (8192 + 31 * 512) / 32) - synthetic.decode_seconds(32, 0)
    assert mixed / (c * 32 * (8192 + 31 * 512) / 32) == pytest.approx(1.99, abs=0.01)


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(decode_mix_padding=1.5), "decode_mix_padding must be a number in"),
    (lambda d: d.pop("page_size"), "missing keys: page_size"),
    (lambda d: d["decode"].pop("kv_len"), "decode is missing keys: kv_len"),
    (lambda d: d["decode"].update(batch=[1, 4, 2]), "decode.batch must be strictly increasing"),
    (lambda d: d["prefill"].update(kv_len=[256, 256]), "prefill.kv_len must be strictly increasing"),
    (lambda d: d["decode"]["seconds"][1].__setitem__(0, 0.0), "decode.seconds must be positive"),
    (lambda d: d["prefill"]["seconds"].pop(), "prefill.seconds must be 2 rows of 2"),
    (lambda d: d.update(kv_capacity_tokens=-5), "kv_capacity_tokens must be a positive integer"),
    (lambda d: d.update(copy_bytes_per_second=0), "copy_bytes_per_second must be a positive number"),
    (lambda d: d["decode"].update(batch=[1, 2.5, 4]), "decode.batch must be a list of integers"),
])
def test_validation_names_the_problem(change, message):
    d = _dict()
    change(d)
    with pytest.raises(ValueError, match=message):
        CostModel.from_dict(d)


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        CostModel.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        CostModel.load(bad)
    with pytest.raises(ValueError, match="must be a JSON object"):
        CostModel.from_dict([1, 2])


def test_array_lookup_matches_scalar():
    cm = CostModel.from_dict(_dict())
    rng = np.random.default_rng(0)
    batch, ctx = rng.integers(0, 12, 200), rng.integers(1, 3000, 200)
    expected = [cm.decode_seconds(int(b), int(s)) for b, s in zip(batch, ctx, strict=True)]
    assert cm.decode_seconds_array(batch, ctx) == pytest.approx(expected)
