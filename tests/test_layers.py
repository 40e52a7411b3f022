"""Parallel layers equal their dense formulas (outputs and gradients), on several meshes.

Each layer is created sharded with ``jmp.shard_init``, run under ``jmp.activate``, and compared
with the same parameters used in a plain jnp formula on one device. The collectives of the
compiled programs are counted per mesh axis.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jmp
from jmp.inspect import collectives, count, summary
from tests.helpers import MESHES, batch_sharded, forward_and_grads, rules_for, value

B, S, D, H = 8, 4, 16, 32  # divisible by every mesh axis size used here
RTOL, ATOL = 1e-5, 1e-5


def _random(seed, shape):
    return np.asarray(jax.random.normal(jax.random.key(seed), shape), np.float32)


def _check_grads(dense, params, x, probe, state_grads_by_name, x_grad):
    """Compare sharded gradients with jax.grad of the dense formula on one device."""
    names = list(params)
    ref = jax.grad(lambda p, x: (dense(p, x) * probe).sum(), argnums=(0, 1))(params, x)
    for name in names:
        np.testing.assert_allclose(
            value(state_grads_by_name[name]),
            ref[0][name],
            rtol=RTOL,
            atol=ATOL,
            err_msg=f"grad of {name}",
        )
    np.testing.assert_allclose(value(x_grad), ref[1], rtol=RTOL, atol=ATOL, err_msg="grad of x")


@pytest.mark.parametrize("spec", MESHES)
@pytest.mark.parametrize("mode", ["auto", "manual"])
def test_row_parallel_linear_is_sum_of_block_products_plus_bias_once(make_mesh, spec, mode):
    mesh = make_mesh(spec)
    rules = rules_for(mesh)
    layer = jmp.shard_init(
        lambda rngs: jmp.layers.RowParallelLinear(H, D, mode=mode, rngs=rngs), mesh, rules
    )
    layer.bias[...] = jnp.asarray(_random(7, (D,)))  # a zero bias would hide the bias-per-shard bug
    x = batch_sharded(mesh, _random(1, (B, S, H)))
    probe = _random(2, (B, S, D))
    y, grads, x_grad, fwd, _ = forward_and_grads(layer, mesh, rules, x, probe)

    w, b, xs = value(layer.kernel), value(layer.bias), np.asarray(x)
    n = mesh.shape["model"]
    blocks = sum(
        xs[..., i * H // n : (i + 1) * H // n] @ w[i * H // n : (i + 1) * H // n] for i in range(n)
    )
    np.testing.assert_allclose(np.asarray(y), blocks + b, rtol=RTOL, atol=ATOL)
    _check_grads(
        lambda p, x: x @ p["kernel"] + p["bias"],
        {"kernel": w, "bias": b},
        xs,
        probe,
        {"kernel": grads["kernel"], "bias": grads["bias"]},
        x_grad,
    )

    found = collectives(fwd, mesh)
    if n > 1:
        assert count(found, "all-reduce", ("model",)) == 1, summary(found)
        per_device_out = B // mesh.shape.get("data", 1) * S * D * 4
        assert [c.bytes for c in found if c.kind == "all-reduce"] == [per_device_out]
    assert count(found) == (1 if n > 1 else 0), summary(found)


@pytest.mark.parametrize("spec", MESHES)
@pytest.mark.parametrize("mode", ["auto", "manual"])
def test_column_parallel_linear_matches_dense_without_communication(make_mesh, spec, mode):
    mesh = make_mesh(spec)
    rules = rules_for(mesh)
    layer = jmp.shard_init(
        lambda rngs: jmp.layers.ColumnParallelLinear(D, H, mode=mode, rngs=rngs), mesh, rules
    )
    layer.bias[...] = jnp.asarray(_random(7, (H,)))
    x = batch_sharded(mesh, _random(1, (B, S, D)))
    probe = _random(2, (B, S, H))
    y, grads, x_grad, fwd, _ = forward_and_grads(layer, mesh, rules, x, probe)

    w, b, xs = value(layer.kernel), value(layer.bias), np.asarray(x)
    np.testing.assert_allclose(np.asarray(y), xs @ w + b, rtol=RTOL, atol=ATOL)
    spec = tuple(y.sharding.spec) + (None,) * (3 - len(y.sharding.spec))
    assert spec[2] == ("model" if mesh.shape["model"] > 1 else None)
    _check_grads(
        lambda p, x: x @ p["kernel"] + p["bias"],
        {"kernel": w, "bias": b},
        xs,
        probe,
        {"kernel": grads["kernel"], "bias": grads["bias"]},
        x_grad,
    )
    assert count(collectives(fwd, mesh)) == 0


@pytest.mark.parametrize("spec", MESHES)
@pytest.mark.parametrize("mode", ["auto", "manual"])
def test_parallel_mlp_one_all_reduce_forward_one_backward(make_mesh, spec, mode):
    mesh = make_mesh(spec)
    rules = rules_for(mesh)
    mlp = jmp.shard_init(
        lambda rngs: jmp.layers.ParallelMLP(D, H, mode=mode, rngs=rngs), mesh, rules
    )
    mlp.up.bias[...] = jnp.asarray(_random(5, (H,)))
    mlp.down.bias[...] = jnp.asarray(_random(6, (D,)))
    x = batch_sharded(mesh, _random(1, (B, S, D)))
    probe = _random(2, (B, S, D))
    y, grads, x_grad, fwd, grad = forward_and_grads(mlp, mesh, rules, x, probe)

    params = {
        "w1": value(mlp.up.kernel),
        "b1": value(mlp.up.bias),
        "w2": value(mlp.down.kernel),
        "b2": value(mlp.down.bias),
    }

    def dense(p, x):
        return jax.nn.gelu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    np.testing.assert_allclose(np.asarray(y), dense(params, np.asarray(x)), rtol=RTOL, atol=ATOL)
    _check_grads(
        dense,
        params,
        np.asarray(x),
        probe,
        {
            "w1": grads["up"]["kernel"],
            "b1": grads["up"]["bias"],
            "w2": grads["down"]["kernel"],
            "b2": grads["down"]["bias"],
        },
        x_grad,
    )
    if mesh.shape["model"] > 1:
        assert count(collectives(fwd, mesh), "all-reduce", ("model",)) == 1
        # the forward's + the column layer's input gradient in the backward pass
        assert count(collectives(grad, mesh), "all-reduce", ("model",)) == 2
    else:
        assert count(collectives(fwd, mesh)) == 0
    if mesh.shape.get("data", 1) > 1:  # replicated-over-data weights: their gradients summed
        assert count(collectives(grad, mesh), "all-reduce", ("data",)) >= 1


@pytest.mark.parametrize("spec", ["model=8", "data=2,model=4"])
@pytest.mark.parametrize("mode", ["auto", "manual"])
def test_parallel_embed_matches_table_lookup(make_mesh, spec, mode):
    mesh = make_mesh(spec)
    rules = rules_for(mesh)
    vocab = 64
    embed = jmp.shard_init(
        lambda rngs: jmp.layers.ParallelEmbed(vocab, D, mode=mode, rngs=rngs), mesh, rules
    )
    ids = batch_sharded(mesh, np.asarray(jax.random.randint(jax.random.key(3), (B, S), 0, vocab)))
    probe = _random(2, (B, S, D))
    graphdef, state = nnx.split(embed)
    from tests.helpers import compile_sharded

    fwd = compile_sharded(lambda st, i: nnx.merge(graphdef, st)(i), mesh, rules, state, ids)
    grad = compile_sharded(
        jax.grad(lambda st, i: (nnx.merge(graphdef, st)(i) * probe).sum()), mesh, rules, state, ids
    )
    table, idx = value(embed.embedding), np.asarray(ids)
    np.testing.assert_allclose(np.asarray(fwd(state, ids)), table[idx], rtol=RTOL, atol=ATOL)
    ref = np.zeros_like(table)
    np.add.at(ref, idx, probe)
    np.testing.assert_allclose(value(grad(state, ids)["embedding"]), ref, rtol=RTOL, atol=ATOL)
    found = collectives(fwd, mesh)
    assert count(found, "all-gather") == 0, f"the table must not be gathered: {summary(found)}"
    assert count(found, "all-reduce", ("model",)) == 1, summary(found)


def _dense_attention(p, x, heads):
    q, k, v = (jnp.einsum("bsd,dhk->bshk", x, p["qkv"][:, i]) for i in range(3))
    scores = jnp.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1])
    mask = np.tril(np.ones((x.shape[1], x.shape[1]), bool))
    probs = jax.nn.softmax(jnp.where(mask, scores, -1e30), axis=-1)
    o = jnp.einsum("bhqs,bshk->bqhk", probs, v)
    return jnp.einsum("bqhk,hkd->bqd", o, p["wo"]) + p["bo"]


@pytest.mark.parametrize("spec", ["model=8", "data=2,model=4", "data=4,model=2"])
@pytest.mark.parametrize("mode", ["auto", "manual"])
def test_parallel_attention_matches_dense_causal_attention(make_mesh, spec, mode):
    mesh = make_mesh(spec)
    rules = rules_for(mesh)
    heads = 8
    attn = jmp.shard_init(
        lambda rngs: jmp.layers.ParallelAttention(
            D, num_heads=heads, head_dim=4, mode=mode, rngs=rngs
        ),
        mesh,
        rules,
    )
    attn.out_bias[...] = jnp.asarray(_random(9, (D,)))
    x = batch_sharded(mesh, _random(1, (B, S, D)))
    probe = _random(2, (B, S, D))
    y, grads, x_grad, fwd, grad = forward_and_grads(attn, mesh, rules, x, probe)
    params = {"qkv": value(attn.qkv), "wo": value(attn.out), "bo": value(attn.out_bias)}
    dense = lambda p, x: _dense_attention(p, x, heads)  # noqa: E731
    np.testing.assert_allclose(np.asarray(y), dense(params, np.asarray(x)), rtol=1e-4, atol=1e-5)
    ref = jax.grad(lambda p, x: (dense(p, x) * probe).sum(), argnums=(0, 1))(params, np.asarray(x))
    for ours, name in ((grads["qkv"], "qkv"), (grads["out"], "wo"), (grads["out_bias"], "bo")):
        np.testing.assert_allclose(value(ours), ref[0][name], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(value(x_grad), ref[1], rtol=1e-4, atol=1e-5)
    assert count(collectives(fwd, mesh), "all-reduce", ("model",)) == 1
    # backward: one more, the input's gradient through the fused qkv projection
    assert count(collectives(grad, mesh), "all-reduce", ("model",)) == 2


def test_row_parallel_f64_is_near_exact(make_mesh):
    mesh = make_mesh("data=2,model=4")
    rules = rules_for(mesh)
    with jax.enable_x64(True):
        layer = jmp.shard_init(
            lambda rngs: jmp.layers.RowParallelLinear(
                H, D, mode="manual", param_dtype=jnp.float64, rngs=rngs
            ),
            mesh,
            rules,
        )
        layer.bias[...] = jnp.asarray(_random(7, (D,)), jnp.float64)
        x = batch_sharded(mesh, _random(1, (B, S, H)).astype(np.float64))
        probe = _random(2, (B, S, D)).astype(np.float64)
        y, grads, x_grad, _, _ = forward_and_grads(layer, mesh, rules, x, probe)
        w, b = value(layer.kernel), value(layer.bias)
        np.testing.assert_allclose(np.asarray(y), np.asarray(x) @ w + b, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(value(grads["bias"]), probe.sum((0, 1)), rtol=1e-12)


def test_manual_and_auto_give_the_same_collectives_for_the_mlp(make_mesh):
    mesh = make_mesh("data=2,model=4")
    rules = rules_for(mesh)
    x = batch_sharded(mesh, _random(1, (B, S, D)))
    probe = _random(2, (B, S, D))
    found = {}
    for mode in ("auto", "manual"):
        mlp = jmp.shard_init(
            lambda rngs, m=mode: jmp.layers.ParallelMLP(D, H, mode=m, rngs=rngs), mesh, rules
        )
        *_, fwd, grad = forward_and_grads(mlp, mesh, rules, x, probe)
        found[mode] = (summary(collectives(fwd, mesh)), summary(collectives(grad, mesh)))
    assert found["auto"] == found["manual"]


def test_bad_mode_is_rejected():
    with pytest.raises(jmp.ConfigError, match="mode"):
        jmp.layers.RowParallelLinear(4, 4, mode="magic", rngs=nnx.Rngs(0))
