"""DeviceMesh and configure_virtual_devices."""

import pytest
import tensorflow as tf

import tfpar
from tests.conftest import DEVICES


def test_mesh_attributes_and_repr():
    mesh = tfpar.DeviceMesh((2, 2), devices=DEVICES[:4])
    assert mesh.shape == (2, 2)
    assert mesh.axis_names == ("batch", "model")
    assert mesh.size == 4
    assert mesh.devices == DEVICES[:4]
    assert isinstance(mesh.dtensor_mesh, tf.experimental.dtensor.Mesh)
    assert repr(mesh) == "<DeviceMesh batch=2 model=2 on 4 CPU>"
    assert mesh.axis_size("model") == 2


def test_default_devices_are_all_cpus():
    mesh = tfpar.DeviceMesh((2, 4))
    assert mesh.devices == DEVICES


@pytest.mark.parametrize(
    "text, shape, names",
    [("2x2", (2, 2), ("batch", "model")), ("4", (1, 4), ("batch", "model")),
     ("batch=1,model=2", (1, 2), ("batch", "model")), ("data=2, tp=1", (2, 1), ("data", "tp"))],
)
def test_parse(text, shape, names):
    mesh = tfpar.DeviceMesh.parse(text, devices=DEVICES[: shape[0] * shape[1]])
    assert mesh.shape == shape and mesh.axis_names == names


def test_parse_rejects_garbage():
    with pytest.raises(ValueError, match=r"Cannot read mesh '2by2'"):
        tfpar.DeviceMesh.parse("2by2")


def test_size_differs_from_device_count():
    with pytest.raises(ValueError, match=r"shape=\(2, 2\) \(product 4\); 3 devices"):
        tfpar.DeviceMesh((2, 2), devices=DEVICES[:3])
    with pytest.raises(ValueError, match=r"product 16.*8 devices"):
        tfpar.DeviceMesh((4, 4))


def test_repeated_axis_names():
    with pytest.raises(ValueError, match=r"axis names must be unique. Received: axis_names=\('model', 'model'\)"):
        tfpar.DeviceMesh((2, 2), ("model", "model"), devices=DEVICES[:4])


def test_unknown_axis_names_in_tensor_parallel():
    mesh = tfpar.DeviceMesh((2, 2), devices=DEVICES[:4])
    with pytest.raises(ValueError, match=r"Unknown mesh axis 'tensor' for model_axis. The mesh has axes \('batch', 'model'\)"):
        tfpar.TensorParallel(mesh, model_axis="tensor")
    with pytest.raises(ValueError, match=r"Unknown mesh axis 'data' for data_axis"):
        tfpar.TensorParallel(mesh, data_axis="data")


def test_configure_virtual_devices_same_n_is_noop():
    assert tfpar.configure_virtual_devices(8) == DEVICES


def test_configure_virtual_devices_after_init_says_how_to_fix():
    with pytest.raises(RuntimeError, match=r"came after TensorFlow initialised its devices \(8 logical CPU"):
        tfpar.configure_virtual_devices(4)


def test_configure_virtual_devices_bad_n():
    with pytest.raises(ValueError, match="positive device count"):
        tfpar.configure_virtual_devices(0)
