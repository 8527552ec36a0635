"""tfpar._dtensor: placing, gathering, and LaidOutVariable's read-after-write."""

import numpy as np
import pytest
import tensorflow as tf

from tfpar import _dtensor, testing
from tests.conftest import make_mesh

A = np.arange(1, 9, dtype="float32").reshape(2, 4)


@pytest.fixture(scope="module")
def layouts():
    mesh = make_mesh("1x2")
    return _dtensor.replicated(mesh, 2), _dtensor.layout(mesh, ("unsharded", "model"))


def test_place_gather_round_trip_and_shard_bytes(layouts):
    _, col = layouts
    t = _dtensor.place(A, col)
    testing.assert_layout(t, ("unsharded", "model"))
    np.testing.assert_array_equal(_dtensor.gather(t).numpy(), A)
    assert _dtensor.bytes_per_device(t) == [16, 16]


def test_reads_in_a_cond_branch_see_a_write_made_before_it(layouts):
    rep, col = layouts
    m = _dtensor.make_variable(np.zeros_like(A), rep)
    w = _dtensor.make_variable(A, col)

    @tf.function
    def step(g, take_branch):
        m.assign_add(g * 0.5)
        return tf.cond(take_branch, lambda: w.assign_sub(m * 2.0), lambda: w.assign_add(m))

    step(_dtensor.place(A, col), _dtensor.place(True, _dtensor.replicated(col.mesh, 0)))
    np.testing.assert_allclose(testing.to_numpy(m), 0.5 * A)
    np.testing.assert_allclose(testing.to_numpy(w), A - A)

    # The branch takes the written value by data dependency, not a new read
    # of the variable (which DTensor may order before the write).
    producers = []

    @tf.function
    def traced(g):
        m.assign_add(g)

        def branch():
            value = m.read_value()
            producers.append(value.op.inputs[0].op.type)
            return value

        return tf.cond(tf.constant(True), branch, branch)

    traced(_dtensor.place(A, col))
    assert producers and "ReadVariableOp" not in producers, producers


def test_two_writes_in_one_function_keep_the_last(layouts):
    rep, _ = layouts
    v = _dtensor.make_variable(A, rep)

    @tf.function
    def step():
        v.assign_add(tf.ones_like(A))
        v.assign(v * 3.0)
        return v.read_value()

    got = step()
    np.testing.assert_allclose(testing.to_numpy(got), (A + 1) * 3)
    np.testing.assert_allclose(testing.to_numpy(v), (A + 1) * 3)


def test_eager_writes_and_numpy(layouts):
    _, col = layouts
    v = _dtensor.make_variable(A, col)
    v.assign_sub(np.ones_like(A))
    np.testing.assert_array_equal(v.numpy(), A - 1)
    np.testing.assert_array_equal(np.asarray(v), A - 1)
    testing.assert_layout(v, ("unsharded", "model"))
