"""Models that draw random numbers (dropout) train, resume and plan like any other.

A functional step cannot advance a model's ``nnx.Rngs``; jmp folds the step index into the
model's keys instead (:func:`jmp.train.step.fold_keys`). So the draws change from step to
step, are the same on every mesh, a resumed run draws what the uninterrupted one drew, and
evaluation runs in eval mode (no dropout). Before, such a model failed inside the step
(flax's TraceContextError: RngCount mutated from another trace).
"""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import jmp
from jmp.train.step import fold_keys

ROWS, FEATURES = 16, 16


class DropoutMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        init = nnx.initializers.lecun_normal()
        self.up = nnx.Linear(
            FEATURES,
            64,
            kernel_init=nnx.with_partitioning(init, ("embed", "mlp")),
            use_bias=False,
            rngs=rngs,
        )
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.down = nnx.Linear(
            64,
            FEATURES,
            kernel_init=nnx.with_partitioning(init, ("mlp", "embed")),
            use_bias=False,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(self.drop(jax.nn.gelu(self.up(x))))


def loss_fn(model, batch):
    return ((model(batch["x"]) - batch["y"]) ** 2).mean()


X = np.random.default_rng(0).normal(size=(ROWS, FEATURES)).astype(np.float32)
BATCH = {"x": X, "y": np.flip(X, axis=1).copy()}


def _fit(mesh, strategy, steps, **kwargs):
    return jmp.fit(
        DropoutMLP,
        loss_fn,
        lambda k: BATCH,
        mesh=mesh,
        strategy=strategy,
        optimizer=kwargs.pop("optimizer", optax.adam(1e-2)),
        steps=steps,
        progress=False,
        **kwargs,
    )


def _losses(result):
    return [row["loss"] for row in result.history]


@pytest.fixture(scope="module")
def one_device():
    return _fit(jmp.make_mesh("data=1", devices=jax.devices()[:1]), "dp", 4)


def test_draws_change_every_step_and_equal_one_device(make_mesh, one_device):
    # with a learning rate of 0 the parameters never move: only the dropout masks change
    frozen = _fit(make_mesh("data=2,model=4"), "dp_tp", 3, optimizer=optax.sgd(0.0))
    losses = _losses(frozen)
    assert len(set(losses)) == 3, losses
    for strategy, spec in (("dp_tp", "data=2,model=4"), ("fsdp", "data=8")):
        sharded = _fit(make_mesh(spec), strategy, 4)
        np.testing.assert_allclose(_losses(sharded), _losses(one_device), rtol=1e-5)


def test_resumed_run_draws_what_the_uninterrupted_one_drew(make_mesh, tmp_path, one_device):
    mesh = make_mesh("data=8")
    out = str(tmp_path / "run")
    _fit(mesh, "dp", 2, out_dir=out, checkpoint_every=2)
    resumed = _fit(mesh, "dp", 4, out_dir=out, resume=True)
    assert resumed.resumed_from == 2
    # the history holds the first run's rows (read back) and the resumed steps 3 and 4
    np.testing.assert_allclose(_losses(resumed), _losses(one_device), rtol=1e-5)


def test_evaluation_runs_without_dropout(make_mesh, one_device):
    result = _fit(make_mesh("data=2,model=4"), "dp_tp", 4, eval_batches=[BATCH], eval_every=4)
    trained = result.model
    # the reference: the trained values, gathered to the host, run unsharded in eval mode
    reference = nnx.merge(nnx.graphdef(trained), jax.device_get(nnx.state(trained)))
    reference.eval()
    expected = float(loss_fn(reference, BATCH))
    assert result.history[-1]["val_loss"] == pytest.approx(expected, rel=1e-5)


def test_fold_keys_folds_the_keys_and_keeps_the_counts():
    state = nnx.state(nnx.Dropout(0.5, rngs=nnx.Rngs(3)), nnx.RngState)
    kinds = set()
    for before, after in zip(
        jax.tree.leaves(state), jax.tree.leaves(fold_keys(state, 5)), strict=True
    ):
        if jax.dtypes.issubdtype(before.dtype, jax.dtypes.prng_key):
            kinds.add("key")
            expected = jax.random.key_data(jax.random.fold_in(before, 5))
            np.testing.assert_array_equal(jax.random.key_data(after), expected)
        else:
            kinds.add("count")
            np.testing.assert_array_equal(after, before)
    assert kinds == {"key", "count"}


def test_compare_plans_a_model_with_dropout():
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), BATCH)
    ranked = jmp.plan.compare(
        DropoutMLP, loss_fn, abstract, candidates=[("dp", "data=8"), ("tp", "model=8")]
    )
    assert [c.rejected for c in ranked] == [False, False], [c.reason for c in ranked]
    assert {c.strategy for c in ranked} == {"dp", "tp"}
