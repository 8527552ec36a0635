"""Plan resolution without devices or Keras."""

import pytest

from tfpar import ColumnParallel, Plan, Replicated, RowParallel
from tfpar.styles import LayerSpec


def dense(path, i, o):
    return LayerSpec(path, "Dense", i, o)


MLP = [dense("mlp/up", 8, 16), dense("mlp/down", 16, 8), dense("mlp/head", 8, 10)]


def styles(assignments):
    return {p: a.style for p, a in assignments.items()}


def test_auto_pairs_column_then_row_and_replicates_indivisible():
    got = Plan("auto", "model", 4).resolve(MLP)
    assert styles(got) == {
        "mlp/up": ColumnParallel(),
        "mlp/down": RowParallel(),
        "mlp/head": Replicated(),
    }
    assert "units=10 not divisible by model=4" in got["mlp/head"].reason


def test_auto_trailing_column_gathers_its_output():
    got = Plan("auto", "model", 2).resolve(MLP)
    assert got["mlp/head"].style == ColumnParallel(gather_output=True)
    # Incremental resolution (during variable creation) leaves it open.
    partial = Plan("auto", "model", 2).resolve(MLP, complete=False)
    assert partial["mlp/head"].style == ColumnParallel()


def test_auto_skips_non_dense_layers():
    layers = [dense("a", 4, 8), LayerSpec("norm", "LayerNormalization", 8, 8), dense("b", 8, 4)]
    got = styles(Plan("auto", "model", 2).resolve(layers))
    assert got == {"a": ColumnParallel(), "norm": Replicated(), "b": RowParallel()}


def test_dict_plan_fullmatch_and_unmatched_replicated():
    plan = Plan({r"mlp/up": ColumnParallel(), r"mlp/d.*": RowParallel()}, "model", 2)
    got = styles(plan.resolve(MLP))
    assert got == {"mlp/up": ColumnParallel(), "mlp/down": RowParallel(), "mlp/head": Replicated()}


def test_dict_plan_uses_fullmatch_not_search():
    plan = Plan({r"up": ColumnParallel()}, "model", 2)
    with pytest.raises(ValueError, match=r"Plan keys match no layer: \['up'\].*'mlp/up'"):
        plan.resolve(MLP)


def test_key_matching_nothing_lists_candidates():
    plan = Plan({r"mlp/up": ColumnParallel(), r"decoder/.*": RowParallel()}, "model", 2)
    with pytest.raises(ValueError, match=r"Plan keys match no layer: \['decoder/\.\*'\].*\['mlp/up', 'mlp/down', 'mlp/head'\]"):
        plan.resolve(MLP)


def test_incomplete_resolution_does_not_report_unused_keys():
    plan = Plan({r"mlp/up": ColumnParallel(), r"mlp/down": RowParallel()}, "model", 2)
    assert styles(plan.resolve(MLP[:1], complete=False)) == {"mlp/up": ColumnParallel()}


def test_layer_matched_by_two_keys():
    plan = Plan({r"mlp/.*": ColumnParallel(), r".*/up": RowParallel()}, "model", 2)
    with pytest.raises(ValueError, match=r"Layer 'mlp/up' matches several plan keys: \['mlp/\.\*', '\.\*/up'\]"):
        plan.resolve(MLP)


def test_plan_divisibility_error():
    plan = Plan({r"mlp/head": ColumnParallel()}, "model", 4)
    with pytest.raises(ValueError, match=r"Dense 'mlp/head' has units=10.*size 4"):
        plan.resolve(MLP)


def test_bad_plans():
    with pytest.raises(ValueError, match="plan must be 'auto' or a dict"):
        Plan("megatron", "model", 2)
    with pytest.raises(ValueError, match="not a style"):
        Plan({"mlp/up": "column"}, "model", 2)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        Plan({"mlp/(": ColumnParallel()}, "model", 2)


def test_repr():
    assert repr(Plan("auto", "model", 2)) == "Plan('auto', model=2)"
    assert "ColumnParallel" in repr(Plan({"a": ColumnParallel()}, "model", 2))
