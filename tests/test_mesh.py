"""jmp.mesh: parsing mesh specs, filling -1, building meshes, and loud errors for bad input."""

import jax
import pytest
from jax.sharding import AxisType, Mesh

import jmp
from jmp.mesh import fitting_shapes, parse_mesh_spec, resolve_mesh_shape

# --- building meshes -------------------------------------------------------------------------


def test_string_spec_gives_named_shape_and_auto_axes():
    mesh = jmp.make_mesh("data=2,model=4")
    assert isinstance(mesh, Mesh)
    assert dict(mesh.shape) == {"data": 2, "model": 4}
    assert tuple(mesh.axis_names) == ("data", "model")
    assert tuple(mesh.axis_types) == (AxisType.Auto, AxisType.Auto)
    assert mesh.devices.shape == (2, 4)
    assert mesh.devices.size == 8


def test_dict_spec_keeps_order():
    mesh = jmp.make_mesh({"model": 4, "data": 2})
    assert tuple(mesh.axis_names) == ("model", "data")
    assert dict(mesh.shape) == {"model": 4, "data": 2}
    assert mesh.devices.shape == (4, 2)


def test_minus_one_fills_remaining_devices():
    mesh = jmp.make_mesh("data=-1,model=2")
    assert dict(mesh.shape) == {"data": 4, "model": 2}


def test_minus_one_alone_takes_all_devices():
    assert dict(jmp.make_mesh("data=-1").shape) == {"data": 8}


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("data=8", {"data": 8}),
        ("data=2,model=4", {"data": 2, "model": 4}),
        ("data=4,model=2", {"data": 4, "model": 2}),
        ("data=1,model=8", {"data": 1, "model": 8}),
        ("data=8,model=1", {"data": 8, "model": 1}),
    ],
)
def test_mesh_shapes(spec, expected):
    mesh = jmp.make_mesh(spec)
    assert dict(mesh.shape) == expected
    assert mesh.devices.shape == tuple(expected.values())
    # Every device appears exactly once.
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_whitespace_in_spec_is_tolerated():
    assert dict(jmp.make_mesh(" data = 2 , model = 4 ").shape) == {"data": 2, "model": 4}


def test_devices_subset():
    devices = jax.devices()[:4]
    mesh = jmp.make_mesh("model=4", devices=devices)
    assert dict(mesh.shape) == {"model": 4}
    assert sorted(d.id for d in mesh.devices.flat) == [0, 1, 2, 3]


def test_devices_subset_size_is_checked():
    with pytest.raises(jmp.MeshError) as err:
        jmp.make_mesh("model=8", devices=jax.devices()[:4])
    msg = str(err.value)
    assert "8" in msg and "4" in msg


def test_explicit_axis_types():
    mesh = jmp.make_mesh("data=2,model=4", axis_types=AxisType.Explicit)
    assert tuple(mesh.axis_types) == (AxisType.Explicit, AxisType.Explicit)


# --- parse / resolve / fitting_shapes --------------------------------------------------------


def test_parse_mesh_spec_keeps_minus_one():
    assert parse_mesh_spec("data=-1,model=2") == {"data": -1, "model": 2}
    assert list(parse_mesh_spec("b=1,a=2")) == ["b", "a"]


def test_resolve_mesh_shape():
    assert resolve_mesh_shape("data=-1,model=2", 8) == {"data": 4, "model": 2}
    assert resolve_mesh_shape("data=2,model=-1", 8) == {"data": 2, "model": 4}
    assert resolve_mesh_shape({"data": 2, "model": 2}, 4) == {"data": 2, "model": 2}
    assert resolve_mesh_shape("data=-1,model=8", 8) == {"data": 1, "model": 8}


def test_fitting_shapes():
    assert fitting_shapes(["data", "model"], 8) == [
        {"data": 1, "model": 8},
        {"data": 2, "model": 4},
        {"data": 4, "model": 2},
        {"data": 8, "model": 1},
    ]
    assert fitting_shapes(["data"], 6) == [{"data": 6}]
    assert len(fitting_shapes(["a", "b", "c"], 8)) == 10


# --- errors ----------------------------------------------------------------------------------


def test_mesh_error_is_value_error():
    assert issubclass(jmp.MeshError, ValueError)
    assert issubclass(jmp.MeshError, jmp.JmpError)


def test_product_mismatch_names_both_counts_and_suggests_shapes():
    with pytest.raises(jmp.MeshError) as err:
        jmp.make_mesh("data=2,model=2")
    msg = str(err.value)
    assert "4" in msg  # what the spec needs
    assert "8" in msg  # what is available
    assert "data=2,model=4" in msg
    assert "data=4,model=2" in msg
    assert "data=1,model=8" in msg
    assert "data=8,model=1" in msg
    # Shapes that do not fit are not suggested.
    assert "data=2,model=2" not in msg.split("fit")[-1]


def test_product_too_large():
    with pytest.raises(jmp.MeshError) as err:
        jmp.make_mesh("data=4,model=4")
    msg = str(err.value)
    assert "16" in msg and "8" in msg
    assert "data=2,model=4" in msg


def test_resolve_mismatch_raises_value_error():
    with pytest.raises(ValueError, match="data=3"):
        resolve_mesh_shape("data=3", 8)


@pytest.mark.parametrize(
    "spec, culprit",
    [
        ("data2", "data2"),
        ("data=2,model4", "model4"),
        ("data=x", "'x'"),
        ("data=2,model=four", "'four'"),
        ("data=2.0", "'2.0'"),
    ],
)
def test_malformed_text(spec, culprit):
    with pytest.raises(jmp.MeshError) as err:
        jmp.make_mesh(spec)
    assert culprit in str(err.value)


@pytest.mark.parametrize("spec", ["", " , "])
def test_empty_spec(spec):
    with pytest.raises(jmp.MeshError):
        parse_mesh_spec(spec)


def test_empty_dict_spec():
    with pytest.raises(jmp.MeshError):
        parse_mesh_spec({})


def test_non_identifier_axis_name():
    with pytest.raises(jmp.MeshError) as err:
        parse_mesh_spec("my-axis=8")
    assert "my-axis" in str(err.value)


@pytest.mark.parametrize(
    "spec, axis, size",
    [
        ("data=0,model=8", "data", "0"),
        ("data=2,model=0", "model", "0"),
        ("data=-2,model=4", "data", "-2"),
        ({"data": 0}, "data", "0"),
        ({"data": -4, "model": 2}, "data", "-4"),
    ],
)
def test_zero_and_negative_sizes(spec, axis, size):
    with pytest.raises(jmp.MeshError) as err:
        jmp.make_mesh(spec)
    msg = str(err.value)
    assert repr(axis) in msg
    assert size in msg


@pytest.mark.parametrize("size", [2.0, "2", True, None])
def test_dict_non_int_size(size):
    with pytest.raises(jmp.MeshError) as err:
        parse_mesh_spec({"data": size})
    assert "'data'" in str(err.value)


def test_duplicate_axis_name():
    with pytest.raises(jmp.MeshError) as err:
        jmp.make_mesh("data=2,data=4")
    msg = str(err.value)
    assert "'data'" in msg
    assert "twice" in msg


def test_more_than_one_minus_one():
    with pytest.raises(jmp.MeshError) as err:
        jmp.make_mesh("data=-1,model=-1")
    assert "-1" in str(err.value)


def test_minus_one_that_cannot_fill():
    with pytest.raises(jmp.MeshError) as err:
        jmp.make_mesh("data=-1,model=3")
    msg = str(err.value)
    assert "-1" in msg
    assert "3" in msg and "8" in msg
    assert "data=2,model=4" in msg


def test_minus_one_that_cannot_fill_larger_than_devices():
    with pytest.raises(jmp.MeshError):
        resolve_mesh_shape("data=-1,model=16", 8)


def test_spec_of_wrong_type():
    with pytest.raises(jmp.MeshError) as err:
        parse_mesh_spec(8)
    assert "int" in str(err.value)
