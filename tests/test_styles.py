"""Styles are pure data: layer description in, sharding specs out."""

import pytest

from tfpar.styles import UNSHARDED, ColumnParallel, LayerSpec, Replicated, RowParallel

DENSE = LayerSpec("mlp/up", "Dense", in_features=8, out_features=16)


def test_column_parallel_specs():
    style = ColumnParallel()
    assert style.variable_spec(DENSE, "kernel", 2, "model") == (UNSHARDED, "model")
    assert style.variable_spec(DENSE, "bias", 1, "model") == ("model",)
    assert not style.output_gathered()
    assert ColumnParallel(gather_output=True).output_gathered()


def test_row_parallel_specs():
    style = RowParallel()
    assert style.variable_spec(DENSE, "kernel", 2, "model") == ("model", UNSHARDED)
    assert style.variable_spec(DENSE, "bias", 1, "model") == (UNSHARDED,)


def test_replicated_specs():
    assert Replicated().variable_spec(DENSE, "kernel", 2, "model") == (UNSHARDED, UNSHARDED)
    Replicated().check(LayerSpec("norm", "LayerNormalization"), "model", 4)


def test_reprs_and_equality():
    assert repr(ColumnParallel(gather_output=True)) == "ColumnParallel(gather_output=True)"
    assert repr(RowParallel()) == "RowParallel()"
    assert ColumnParallel() == ColumnParallel()
    assert ColumnParallel() != ColumnParallel(gather_output=True)
    assert RowParallel() != Replicated()


def test_gather_output_is_keyword_only():
    with pytest.raises(TypeError):
        ColumnParallel(True)


def test_column_units_not_divisible_names_layer_units_axis_and_fix():
    with pytest.raises(ValueError, match=r"Dense 'mlp/up' has units=16, which the 'model' axis of size 3 does not divide; use a multiple of 3 or replicate"):
        ColumnParallel().check(DENSE, "model", 3)


def test_row_input_not_divisible():
    with pytest.raises(ValueError, match=r"input features=8, which the 'model' axis of size 3"):
        RowParallel().check(DENSE, "model", 3)


@pytest.mark.parametrize("style", [ColumnParallel(), RowParallel()])
def test_style_on_layer_it_cannot_shard_is_type_error(style):
    norm = LayerSpec("mlp/norm", "LayerNormalization", 16, 16)
    with pytest.raises(TypeError, match=r"cannot shard layer 'mlp/norm' of type LayerNormalization"):
        style.check(norm, "model", 2)
