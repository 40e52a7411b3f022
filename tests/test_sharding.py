"""Sharded init, specs of a model's state, the parameter table, and Flax linen support."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jmp
from jmp.sharding import init_bytes_per_device

D, H = 16, 64


def make_mlp(rngs):
    return jmp.layers.ParallelMLP(D, H, rngs=rngs)


@pytest.mark.parametrize(
    "spec,strategy,kernel_shard",
    [
        ("model=8", "tp", (D, H // 8)),
        ("data=2,model=4", "dp_tp", (D, H // 4)),
        ("data=2,model=4", "fsdp_tp", (D // 2, H // 4)),
        ("data=8", "fsdp", (D // 8, H)),
        ("data=8", "dp", (D, H)),
    ],
)
def test_shard_init_gives_expected_shard_shapes(make_mesh, spec, strategy, kernel_shard):
    mesh = make_mesh(spec)
    model = jmp.shard_init(make_mlp, mesh, jmp.rules.preset(strategy, mesh), seed=0)
    kernel = model.up.kernel[...]
    assert kernel.addressable_shards[0].data.shape == kernel_shard
    assert {s.data.shape for s in kernel.addressable_shards} == {kernel_shard}
    # same seed, same values, whatever the mesh
    reference = make_mlp(nnx.Rngs(0))
    np.testing.assert_array_equal(np.asarray(kernel), np.asarray(reference.up.kernel[...]))


def test_replicated_parameters_are_identical_on_every_device(make_mesh):
    mesh = make_mesh("data=2,model=4")
    model = jmp.shard_init(make_mlp, mesh, jmp.rules.preset("dp_tp", mesh))
    bias = model.down.bias[...]  # ('embed',) -> replicated under dp_tp
    assert bias.sharding.is_fully_replicated
    shards = [np.asarray(s.data) for s in bias.addressable_shards]
    assert len(shards) == 8
    for s in shards[1:]:
        np.testing.assert_array_equal(s, shards[0])


def test_sharded_init_holds_about_total_over_n_per_device(make_mesh):
    mesh = make_mesh("data=2,model=4")
    rules = jmp.rules.preset("fsdp_tp", mesh)
    big = lambda rngs: jmp.layers.ParallelMLP(256, 1024, use_bias=False, rngs=rngs)  # noqa: E731
    total = 2 * 256 * 1024 * 4
    per_device = init_bytes_per_device(big, mesh, rules)
    # XLA counts the output tuple's index table too (one 8-byte pointer per output array)
    assert total // 8 <= per_device <= total // 8 + 8 * 2, (per_device, total)


def test_partition_specs_and_named_shardings_follow_the_rules(make_mesh):
    mesh = make_mesh("data=2,model=4")
    rules = jmp.rules.preset("fsdp_tp", mesh)
    model = make_mlp(nnx.Rngs(0))
    specs = jmp.partition_specs(model, rules, mesh)
    assert specs["up"]["kernel"].get_value() == P("data", "model")
    assert specs["down"]["kernel"].get_value() == P("model", "data")
    assert specs["up"]["bias"].get_value() == P("model")
    shardings = jmp.named_shardings(model, rules, mesh)
    assert shardings["down"]["bias"].get_value() == NamedSharding(mesh, P("data"))


def test_every_sharding_problem_is_listed_at_once(make_mesh):
    mesh = make_mesh("model=8")
    rules = jmp.Rules({"embed": None, "mlp": "model"})  # no rule for 'vocab'

    class Bad(nnx.Module):
        def __init__(self, rngs):
            self.w = nnx.Param(jnp.zeros((4, 12)), out_sharding=("embed", "mlp"))  # 12 % 8
            self.v = nnx.Param(jnp.zeros((8, 4)), out_sharding=("vocab", "embed"))
            self.u = nnx.Param(jnp.zeros((8,)))  # no names at all

    with pytest.raises(jmp.ShardingError) as err, nnx.use_eager_sharding(False):
        jmp.shard_init(Bad, mesh, rules)
    msg = str(err.value)
    assert "3 parameter sharding problem" in msg
    assert "w shape=(4, 12)" in msg and "'mlp'" in msg and "size 8" in msg
    assert "'vocab' has no rule" in msg
    assert "u shape=(8,)" in msg and "no logical axis names" in msg


def test_param_table_reports_bytes_per_device(make_mesh):
    mesh = make_mesh("data=2,model=4")
    model = jmp.shard_init(make_mlp, mesh, jmp.rules.preset("fsdp_tp", mesh))
    rows = jmp.param_table(model)
    by_path = {r.path: r for r in rows}
    kernel = by_path["up/kernel"]
    assert kernel.shape == (D, H) and kernel.names == ("embed", "mlp")
    assert kernel.bytes_total == D * H * 4 and kernel.bytes_per_device == D * H * 4 // 8
    assert by_path["down/bias"].bytes_per_device == D * 4 // 2  # ('embed',) over data=2
    assert rows.bytes_total == (2 * D * H + H + D) * 4
    from rich.console import Console

    console = Console(record=True, width=200)
    rows.print(console)
    assert "up/kernel" in console.export_text()


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        def dense(n, names, name):
            return nn.Dense(  # noqa: E731
                n,
                name=name,
                kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[1:]),
            )

        h = nn.relu(dense(H, ("embed", "mlp"), "up")(x))
        return dense(D, ("mlp", "embed"), "down")(h)


def test_linen_variables_are_sharded_by_the_same_rules(make_mesh):
    mesh = make_mesh("data=2,model=4")
    rules = jmp.rules.preset("dp_tp", mesh)
    x = np.asarray(jax.random.normal(jax.random.key(1), (8, D)))
    module = LinenMLP()
    variables = jmp.shard_init(module, mesh, rules, seed=0, example_inputs=(x,))
    kernel = variables["params"]["up"]["kernel"]
    assert kernel.names == ("embed", "mlp")
    assert kernel.value.sharding.spec == P(None, "model")
    sharded = jax.jit(module.apply)(variables, jax.device_put(x, NamedSharding(mesh, P("data"))))
    plain = module.init(jax.random.key(0), x)  # the unsharded reference, same seed
    np.testing.assert_allclose(np.asarray(sharded), module.apply(plain, x), rtol=1e-5, atol=1e-6)


def test_linen_without_example_inputs_is_a_clear_error(make_mesh):
    mesh = make_mesh("model=8")
    with pytest.raises(jmp.ShardingError, match="example_inputs"):
        jmp.shard_init(LinenMLP(), mesh, jmp.rules.preset("tp", mesh))
