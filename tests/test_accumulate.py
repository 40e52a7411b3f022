"""Gradient accumulation reduces the gradients over pure data axes once per step.

Left to the partitioner, every microbatch's gradients were all-reduced over 'data' inside the
accumulation loop: m times the bytes. Over a batch axis that splits no parameter (dp, dp_tp)
each device now sums its microbatches' gradients and one mean joins them. The reference is the
same step on the whole batch at once (microbatches=1): the same mean over the same rows.
"""

import jax
import numpy as np
import pytest

import jmp
from jmp.models import GPT, GPTConfig
from jmp.train import TrainConfig, make_optimizer, make_step

CFG = GPTConfig.named("tiny")
ROWS, M = 32, 4  # each microbatch splits over data=8


def _batch(k):
    tokens = np.random.default_rng(k).integers(0, 256, (ROWS, CFG.seq_len + 1), dtype=np.int32)
    return tokens[:, :-1], tokens[:, 1:]


def _step(mesh, strategy, microbatches):
    rules = jmp.rules.preset(strategy, mesh)
    model = jmp.shard_init(lambda rngs: GPT(CFG, rngs=rngs), mesh, rules)
    return make_step(
        model, make_optimizer(TrainConfig(warmup_steps=0)), mesh, rules, microbatches=microbatches
    )


def _bytes_over(step, axis):
    state, batch = step.abstract_state(), step.abstract_batch(ROWS, CFG.seq_len)
    found = jmp.inspect.collectives(step.lower(state, batch).compile(), step.mesh)
    return sum(c.total_bytes for c in found if c.axes == (axis,))


@pytest.mark.parametrize("strategy, spec", [("dp", "data=8"), ("dp_tp", "data=2,model=4")])
def test_accumulation_equals_the_whole_batch_and_reduces_once(make_mesh, strategy, spec):
    mesh = make_mesh(spec)
    whole, accumulated = _step(mesh, strategy, 1), _step(mesh, strategy, M)
    a, b = whole.init_state(), accumulated.init_state()
    for k in range(2):
        a, metrics_a = whole(a, _batch(k))
        b, metrics_b = accumulated(b, _batch(k))
        np.testing.assert_allclose(float(metrics_b["loss"]), float(metrics_a["loss"]), rtol=1e-6)
        np.testing.assert_allclose(
            float(metrics_b["grad_norm"]), float(metrics_a["grad_norm"]), rtol=1e-5
        )
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-6)
    # the same bytes over 'data' as one microbatch: the gradients are reduced once, not M times
    assert _bytes_over(accumulated, "data") == _bytes_over(whole, "data") > 0


def test_fsdp_keeps_one_reduction_per_microbatch(make_mesh):
    # 'data' also splits the parameters: they are gathered, and reduced, per microbatch
    mesh = make_mesh("data=8")
    assert (
        jmp.train.step.reduce_once_axes(
            mesh, jmp.rules.preset("fsdp", mesh), _step(mesh, "fsdp", M).state_shardings.params
        )
        == ()
    )
    assert jmp.train.step.reduce_once_axes(
        mesh, jmp.rules.preset("dp", mesh), _step(mesh, "dp", M).state_shardings.params
    ) == ("data",)


@pytest.mark.parametrize(
    "strategy, spec", [("dp_cp", "data=2,context=4"), ("dp_tp_sp", "data=2,model=4")]
)
def test_accumulation_around_a_region_of_the_model(make_mesh, strategy, spec):
    """Context parallelism's region and sequence parallelism's layers are shard_maps that jax
    cannot differentiate inside the reduce-once region: such a step reduces its gradients per
    microbatch, and still equals the whole batch."""
    mesh = make_mesh(spec)
    whole, accumulated = _step(mesh, strategy, 1), _step(mesh, strategy, 2)
    a, metrics_a = whole(whole.init_state(), _batch(0))
    b, metrics_b = accumulated(accumulated.init_state(), _batch(0))
    np.testing.assert_allclose(float(metrics_b["loss"]), float(metrics_a["loss"]), rtol=1e-6)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-6)
