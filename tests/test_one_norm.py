"""One global gradient norm per step: the metric, the non-finite guard and the clipping share it.

Before, optax's ``clip_by_global_norm`` computed the norm a second time and XLA kept both, so
every parameter array split over a mesh axis had its partial sum all-reduced twice. The
reference is the previous optimizer, ``optax.clip_by_global_norm`` chained with the same
AdamW, trained side by side with clipping active on every step.
"""

import jax
import numpy as np
import optax
import pytest

import jmp
from jmp.models import GPT, GPTConfig
from jmp.train import TrainConfig, lr_schedule, make_optimizer, make_step

CFG = GPTConfig.named("tiny")
# clip_norm far below the gradients' norm: every step clips
TRAIN = TrainConfig(steps=3, batch_size=8, warmup_steps=0, clip_norm=1e-2)


def _optax_reference(cfg: TrainConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(lr_schedule(cfg), b1=0.9, b2=0.95, weight_decay=cfg.weight_decay),
    )


def _batch(k):
    rng = np.random.default_rng(k)
    tokens = rng.integers(0, CFG.vocab_size, (8, CFG.seq_len + 1), dtype=np.int32)
    return tokens[:, :-1], tokens[:, 1:]


def _build(mesh, rules, optimizer):
    model = jmp.shard_init(lambda rngs: GPT(CFG, rngs=rngs), mesh, rules)
    return make_step(model, optimizer, mesh, rules)


def _all_reduces(step):
    state, batch = step.abstract_state(), step.abstract_batch(8, CFG.seq_len)
    found = jmp.inspect.collectives(step.lower(state, batch).compile(), step.mesh)
    return sum(c.count for c in found if c.kind == "all-reduce")


def _split_pairs(step):
    """(parameter array, mesh axis splitting it) pairs: one norm partial sum each."""
    pairs = 0
    for sharding in jax.tree.leaves(step.state_shardings.params):
        pairs += len({a for entry in sharding.spec if entry for a in jmp.rules.axes_tuple(entry)})
    return pairs


@pytest.mark.parametrize(
    "strategy, spec",
    [("dp_tp", "data=2,model=4"), ("fsdp_tp", "data=2,model=4"), ("tp", "model=8")],
)
def test_one_norm_equals_optax_clipping_with_one_all_reduce_fewer_per_split_array(
    make_mesh, strategy, spec
):
    mesh = make_mesh(spec)
    rules = jmp.rules.preset(strategy, mesh)
    ours, theirs = (
        _build(mesh, rules, make_optimizer(TRAIN)),
        _build(mesh, rules, _optax_reference(TRAIN)),
    )
    state_a, state_b = ours.init_state(), theirs.init_state()
    for k in range(TRAIN.steps):
        state_a, metrics_a = ours(state_a, _batch(k))
        state_b, metrics_b = theirs(state_b, _batch(k))
        assert float(metrics_a["grad_norm"]) > 10 * TRAIN.clip_norm  # clipping is active
        np.testing.assert_allclose(float(metrics_a["loss"]), float(metrics_b["loss"]), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(state_a.params), jax.tree.leaves(state_b.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    pairs = _split_pairs(ours)
    assert pairs > 0
    assert _all_reduces(theirs) - _all_reduces(ours) == pairs


def test_clip_by_global_norm_computes_its_own_norm_outside_the_step():
    grads = {"w": np.array([3.0, 4.0], np.float32), "b": np.array([12.0], np.float32)}  # norm 13
    tx = jmp.train.clip_by_global_norm(1.0)
    clipped, _ = tx.update(grads, tx.init(grads))
    np.testing.assert_allclose(clipped["w"], [3 / 13, 4 / 13], rtol=1e-6)
    np.testing.assert_allclose(clipped["b"], [12 / 13], rtol=1e-6)
    small, _ = tx.update({"w": np.array([0.3, 0.4], np.float32)}, tx.init(grads))
    np.testing.assert_array_equal(small["w"], np.array([0.3, 0.4], np.float32))  # unchanged
