"""jmp.rules: strict resolution of logical axis names into PartitionSpecs, and the presets."""

import dataclasses

import pytest
from jax.sharding import PartitionSpec as P

import jmp
from jmp.rules import preset, resolve

# --- resolution ------------------------------------------------------------------------------


def test_dp_tp_param_spec(make_mesh):
    mesh = make_mesh("data=2,model=4")
    rules = preset("dp_tp", mesh)
    assert rules.param_spec(("embed", "mlp"), shape=(64, 256), mesh=mesh) == P(None, "model")
    assert rules.param_spec(("mlp", "embed"), shape=(256, 64), mesh=mesh) == P("model")
    assert rules.param_spec(("embed",), shape=(64,), mesh=mesh) == P()
    assert rules.param_spec(("vocab", "embed"), shape=(512, 64), mesh=mesh) == P("model")
    assert rules.activation_spec(("batch", "seq", "mlp"), shape=(8, 16, 256), mesh=mesh) == P(
        "data", None, "model"
    )
    assert rules.activation_spec(("batch", "seq", "embed"), shape=(8, 16, 64), mesh=mesh) == P(
        "data"
    )


def test_fsdp_param_spec(make_mesh):
    mesh = make_mesh("data=8")
    rules = preset("fsdp", mesh)
    assert rules.param_spec(("embed", "mlp"), shape=(64, 256), mesh=mesh) == P("data")
    assert rules.param_spec(("mlp", "embed"), shape=(256, 64), mesh=mesh) == P(None, "data")


def test_fsdp_param_and_activation_tables_differ(make_mesh):
    rules = preset("fsdp", make_mesh("data=8"))
    assert rules.params_dict["embed"] == "data"
    assert rules.params_dict["batch"] is None
    assert rules.activations_dict["batch"] == "data"
    assert rules.activations_dict["embed"] is None
    assert rules.params != rules.activations
    # The same names resolve differently for a parameter and an activation.
    assert rules.param_spec(("batch", "embed")) == P(None, "data")
    assert rules.activation_spec(("batch", "embed")) == P("data")


def test_fsdp_tp_tables(make_mesh):
    rules = preset("fsdp_tp", make_mesh("data=2,model=4"))
    assert rules.param_spec(("embed", "mlp")) == P("data", "model")
    assert rules.activation_spec(("batch", "seq", "mlp")) == P("data", None, "model")
    assert rules.activation_spec(("batch", "seq", "embed")) == P("data")


def test_none_name_is_replicated_without_rule():
    rules = jmp.Rules({"mlp": "model"})
    assert rules.param_spec((None, "mlp")) == P(None, "model")
    assert rules.param_spec(("mlp", None)) == P("model")
    assert rules.param_spec((None, None)) == P()


def test_tuple_of_mesh_axes(make_mesh):
    mesh = make_mesh("data=2,model=4")
    rules = jmp.Rules({"batch": ("data", "model"), "embed": None})
    assert rules.param_spec(("batch", "embed"), shape=(16, 3), mesh=mesh) == P(("data", "model"))
    # A list is accepted and frozen to a tuple.
    rules = jmp.Rules({"batch": ["data", "model"]})
    assert rules.params_dict["batch"] == ("data", "model")
    assert rules.param_spec(("batch",), shape=(8,), mesh=mesh) == P(("data", "model"))


def test_tuple_of_mesh_axes_divisibility_uses_product(make_mesh):
    mesh = make_mesh("data=2,model=4")
    rules = jmp.Rules({"batch": ("data", "model")})
    with pytest.raises(jmp.ShardingError) as err:
        rules.param_spec(("batch",), shape=(4,), mesh=mesh, path="x")
    assert "size 8" in str(err.value)


def test_resolve_returns_spec_and_problems(make_mesh):
    mesh = make_mesh("data=2,model=4")
    spec, problems = resolve(
        ("embed", "mlp"), {"embed": None, "mlp": "model"}, shape=(4, 8), mesh=mesh
    )
    assert spec == P(None, "model")
    assert problems == []
    spec, problems = resolve(("embed", "mlp"), {"mlp": "model"}, shape=(4, 8), mesh=mesh)
    assert spec == P(None, "model")
    assert len(problems) == 1
    assert "'embed'" in problems[0]


def test_resolve_without_mesh_or_shape():
    spec, problems = resolve(("batch", "mlp"), {"batch": "data", "mlp": "model"})
    assert spec == P("data", "model")
    assert problems == []


# --- Rules object ----------------------------------------------------------------------------


def test_rules_is_hashable_and_frozen():
    a = jmp.Rules({"embed": None, "mlp": "model"}, {"batch": "data", "mlp": "model"})
    b = jmp.Rules({"embed": None, "mlp": "model"}, {"batch": "data", "mlp": "model"})
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b}) == 1
    assert {a: 1}[b] == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.params = ()  # type: ignore[misc]
    c = jmp.Rules({"embed": None, "mlp": "data"})
    assert a != c


def test_rules_accepts_pairs_and_defaults_activations_to_params():
    rules = jmp.Rules([("embed", None), ("mlp", "model")])
    assert rules.params_dict == {"embed": None, "mlp": "model"}
    assert rules.activations_dict == {"embed": None, "mlp": "model"}


def test_rules_rejects_bad_rule_value():
    with pytest.raises(jmp.ShardingError) as err:
        jmp.Rules({"mlp": 4})
    assert "'mlp'" in str(err.value)
    with pytest.raises(jmp.ShardingError):
        jmp.Rules({"mlp": ("model", 2)})


def test_replace_overrides_some_entries():
    rules = jmp.Rules(
        {"embed": None, "mlp": "model"}, {"batch": "data", "embed": None, "mlp": "model"}
    )
    new = rules.replace(params={"embed": "data"}, activations={"mlp": None})
    assert new.params_dict == {"embed": "data", "mlp": "model"}
    assert new.activations_dict == {"batch": "data", "embed": None, "mlp": None}
    # The original is unchanged.
    assert rules.params_dict == {"embed": None, "mlp": "model"}
    assert rules.activations_dict == {"batch": "data", "embed": None, "mlp": "model"}
    assert rules.replace() == rules


# --- strictness ------------------------------------------------------------------------------


def test_sharding_error_is_value_error():
    assert issubclass(jmp.ShardingError, ValueError)
    assert issubclass(jmp.ShardingError, jmp.JmpError)


def test_unknown_logical_name(make_mesh):
    mesh = make_mesh("data=2,model=4")
    rules = preset("dp_tp", mesh)
    with pytest.raises(jmp.ShardingError) as err:
        rules.param_spec(("embed", "hidden"), shape=(64, 256), mesh=mesh, path="mlp.w1")
    msg = str(err.value)
    assert "'hidden'" in msg
    assert "mlp.w1" in msg


def test_unknown_logical_name_without_mesh():
    with pytest.raises(jmp.ShardingError, match="'hidden'"):
        jmp.Rules({"mlp": "model"}).activation_spec(("hidden",))


def test_mesh_axis_used_twice():
    rules = jmp.Rules({"embed": "model", "mlp": "model"})
    with pytest.raises(jmp.ShardingError) as err:
        rules.param_spec(("embed", "mlp"), path="w")
    msg = str(err.value)
    assert "'model'" in msg
    assert "'embed'" in msg and "'mlp'" in msg
    assert "twice" in msg


def test_mesh_axis_used_twice_through_tuple(make_mesh):
    mesh = make_mesh("data=2,model=4")
    rules = jmp.Rules({"batch": ("data", "model"), "mlp": "model"})
    with pytest.raises(jmp.ShardingError) as err:
        rules.activation_spec(("batch", "mlp"), shape=(8, 8), mesh=mesh)
    assert "'model'" in str(err.value)


def test_rule_to_axis_the_mesh_lacks(make_mesh):
    mesh = make_mesh("data=8")
    rules = jmp.Rules({"embed": None, "mlp": "model"})
    with pytest.raises(jmp.ShardingError) as err:
        rules.param_spec(("embed", "mlp"), shape=(64, 256), mesh=mesh, path="ffn.kernel")
    msg = str(err.value)
    assert "'model'" in msg
    assert "'mlp'" in msg
    assert "ffn.kernel" in msg


def test_indivisible_dimension(make_mesh):
    mesh = make_mesh("data=2,model=4")
    rules = preset("dp_tp", mesh)
    with pytest.raises(jmp.ShardingError) as err:
        rules.param_spec(("embed", "mlp"), shape=(64, 6), mesh=mesh, path="layer0.mlp.kernel")
    msg = str(err.value)
    assert "layer0.mlp.kernel" in msg  # path
    assert "(64, 6)" in msg  # shape
    assert "'model'" in msg  # mesh axis
    assert "size 4" in msg  # its size
    assert "size 6" in msg  # the dimension's size


def test_wrong_number_of_names():
    with pytest.raises(jmp.ShardingError) as err:
        jmp.Rules({"mlp": "model"}).param_spec(("mlp",), shape=(4, 4), path="w")
    msg = str(err.value)
    assert "1 logical names" in msg and "2 dimensions" in msg


def test_all_problems_listed_at_once(make_mesh):
    mesh = make_mesh("data=2,model=4")
    rules = jmp.Rules({"batch": "data", "mlp": "model"})
    with pytest.raises(jmp.ShardingError) as err:
        rules.activation_spec(("batch", "mlp"), shape=(3, 6), mesh=mesh, path="h")
    msg = str(err.value)
    assert msg.startswith("2 ")
    assert "dimension 0" in msg and "size 3" in msg and "'data'" in msg
    assert "dimension 1" in msg and "size 6" in msg and "'model'" in msg


def test_different_kinds_of_problems_listed_together(make_mesh):
    mesh = make_mesh("data=8")
    rules = jmp.Rules({"embed": "data", "mlp": "model", "heads": "data"})
    with pytest.raises(jmp.ShardingError) as err:
        rules.param_spec(("embed", "mlp", "kv", "heads"), shape=(8, 8, 8, 8), mesh=mesh)
    msg = str(err.value)
    assert msg.startswith("3 ")
    assert "'model'" in msg  # axis the mesh lacks
    assert "'kv'" in msg  # unknown name
    assert "twice" in msg  # 'data' used by 'embed' and 'heads'


# --- presets ---------------------------------------------------------------------------------


def test_unknown_strategy(make_mesh):
    with pytest.raises(jmp.ConfigError) as err:
        preset("zero3", make_mesh("data=8"))
    msg = str(err.value)
    assert "'zero3'" in msg
    assert "fsdp" in msg  # lists the known strategies


def test_tp_on_mesh_without_model(make_mesh):
    with pytest.raises(jmp.ShardingError) as err:
        preset("tp", make_mesh("data=8"))
    assert "'model'" in str(err.value)


def test_dp_tp_on_mesh_without_model(make_mesh):
    with pytest.raises(jmp.ShardingError) as err:
        preset("dp_tp", make_mesh("data=8"))
    assert "'model'" in str(err.value)


def test_dp_on_mesh_with_idle_model_axis(make_mesh):
    with pytest.raises(jmp.ShardingError) as err:
        preset("dp", make_mesh("data=2,model=4"))
    msg = str(err.value)
    assert "'dp'" in msg
    assert "'model'" in msg


def test_fsdp_on_mesh_with_idle_model_axis(make_mesh):
    with pytest.raises(jmp.ShardingError, match="'model'"):
        preset("fsdp", make_mesh("data=4,model=2"))


def test_size_one_axis_is_not_idle(make_mesh):
    rules = preset("dp", make_mesh("data=8,model=1"))
    assert rules.activations_dict["batch"] == "data"


@pytest.mark.parametrize(
    "strategy, spec",
    [
        ("dp", "data=8"),
        ("fsdp", "data=8"),
        ("tp", "model=8"),
        ("dp_tp", "data=2,model=4"),
        ("fsdp_tp", "data=2,model=4"),
        ("dp_tp", "data=4,model=2"),
        ("fsdp_tp", "data=4,model=2"),
    ],
)
def test_every_preset_fits_its_mesh(strategy, spec, make_mesh):
    mesh = make_mesh(spec)
    rules = preset(strategy, mesh)
    assert isinstance(rules, jmp.Rules)
    # A typical MLP kernel and activation resolve cleanly on that mesh.
    rules.param_spec(("embed", "mlp"), shape=(64, 256), mesh=mesh, path="w")
    rules.activation_spec(("batch", "seq", "mlp"), shape=(8, 16, 256), mesh=mesh, path="h")


@pytest.mark.parametrize(
    "strategy, expected_w, expected_h",
    [
        ("dp", P(), P("data")),
        ("fsdp", P("data"), P("data")),
        ("tp", P(None, "model"), P(None, None, "model")),
        ("dp_tp", P(None, "model"), P("data", None, "model")),
        ("fsdp_tp", P("data", "model"), P("data", None, "model")),
    ],
)
def test_preset_resolutions(strategy, expected_w, expected_h, make_mesh):
    spec = {"dp": "data=8", "fsdp": "data=8", "tp": "model=8"}.get(strategy, "data=2,model=4")
    mesh = make_mesh(spec)
    rules = preset(strategy, mesh)
    assert rules.param_spec(("embed", "mlp"), shape=(64, 256), mesh=mesh) == expected_w
    assert (
        rules.activation_spec(("batch", "seq", "mlp"), shape=(8, 16, 256), mesh=mesh) == expected_h
    )
