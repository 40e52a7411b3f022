"""The pipeline of a user-defined block (tests/plain_model.py) against the unpipelined stack.

The stacked model called directly (``jmp.pipeline.run_stack``, one program, one device) is the
reference: the pipelined loss and gradients equal it to 1e-5 in float32 under both schedules
and several meshes, the stages talk only to their neighbours, and what cannot be pipelined is
refused with one message naming the fix.
"""

import functools

import jax
import numpy as np
import pytest
from flax import nnx

import jmp
from jmp.inspect import collectives
from jmp.pipeline import make_loss_fn, pipeline_loss_and_grads, stack_blocks
from tests import plain_model
from tests.plain_model import LAYERS, Block, PatchClassifier, leaves_by_path, loss_fn

BATCH = plain_model.batch(0, rows=16)


def _model(stages):
    """(graphdef, state) of the model on one device (stacked over ``stages``, or a list)."""
    spec, strategy = ("stage=1,data=1", "pp_dp") if stages else ("data=1", "dp")
    mesh = jmp.make_mesh(spec, devices=jax.devices()[:1])
    model = jmp.shard_init(
        lambda r: PatchClassifier(r, num_stages=stages), mesh, jmp.rules.preset(strategy, mesh)
    )
    return nnx.split(model)


def _on(mesh, rules, stages):
    return jmp.shard_init(lambda r: PatchClassifier(r, num_stages=stages), mesh, rules)


@functools.cache
def reference(stages):
    """(loss, grads by path) of the stacked model run in order on one device."""
    graphdef, state = _model(stages)
    loss, grads = jax.jit(jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p), BATCH)))(
        state
    )
    return float(loss), leaves_by_path(grads)


@functools.cache
def pipelined(spec, strategy, schedule, microbatches):
    stages = int(spec.split("stage=")[1].split(",")[0])
    mesh = jmp.make_mesh(spec)
    rules = jmp.rules.preset(strategy, mesh)
    model = jmp.shard_init(lambda r: PatchClassifier(r, num_stages=stages), mesh, rules)
    run = jax.jit(
        functools.partial(
            pipeline_loss_and_grads, mesh=mesh, num_microbatches=microbatches, schedule=schedule
        )
    )
    with jmp.activate(mesh, rules):
        loss, grads = run(model, BATCH)
        compiled = run.lower(model, BATCH).compile()
    return float(loss), leaves_by_path(nnx.state(grads)), compiled, mesh


CASES = [
    ("stage=2,data=4", "pp_dp", "1f1b", 2),
    ("stage=2,data=4", "pp_dp", "gpipe", 4),
    ("stage=4,data=2", "pp_dp", "1f1b", 4),
    ("stage=2,data=2,model=2", "pp_dp_tp", "1f1b", 4),
]


@pytest.mark.parametrize("spec,strategy,schedule,microbatches", CASES)
def test_pipeline_of_a_user_block_equals_the_stack(spec, strategy, schedule, microbatches):
    stages = int(spec.split("stage=")[1].split(",")[0])
    want_loss, want_grads = reference(stages)
    loss, grads, compiled, mesh = pipelined(spec, strategy, schedule, microbatches)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    assert grads.keys() == want_grads.keys()
    for path, want in want_grads.items():
        np.testing.assert_allclose(grads[path], want, rtol=1e-5, atol=1e-7, err_msg=path)
    # activations travel stage to stage: collective-permutes over 'stage' and nothing else
    permutes = [c for c in collectives(compiled, mesh) if c.kind == "collective-permute"]
    assert permutes and all(c.axes == ("stage",) for c in permutes)


def test_the_stacked_model_equals_the_plain_list_of_blocks():
    """Same seed, same values: stacking changes the layout, not the model."""
    _, plain = _model(None)
    _, stacked = _model(2)
    want = leaves_by_path(plain)
    got = leaves_by_path(plain_model.unstack(stacked))
    assert got.keys() == want.keys()
    for path in want:
        np.testing.assert_array_equal(got[path], want[path], err_msg=path)


def test_what_cannot_be_pipelined_is_refused(make_mesh):
    mesh = make_mesh("stage=4,data=2")
    rules = jmp.rules.preset("pp_dp", mesh)
    with pytest.raises(jmp.ConfigError, match=r"n_layers=5 is not divisible by the 2 stages"):
        stack_blocks(Block, num_layers=5, num_stages=2, rngs=nnx.Rngs(0))
    with pytest.raises(jmp.ConfigError, match=r"lockstep") as err:
        stack_blocks(Block, num_layers=6, num_stages=4, rngs=nnx.Rngs(0))
    assert "[1, 2, 3, 6]" in str(err.value)
    with pytest.raises(jmp.ConfigError, match=f"8 stages exceed n_layers={LAYERS}"):
        stack_blocks(Block, num_layers=LAYERS, num_stages=8, rngs=nnx.Rngs(0))
    # a model without stacked blocks, or with another stage count than the mesh
    plain = _on(mesh, rules, None)
    loss = make_loss_fn(mesh=mesh, num_microbatches=4)
    with jmp.activate(mesh, rules), pytest.raises(jmp.ConfigError, match="needs stacked"):
        jax.eval_shape(loss, plain, BATCH)
    with pytest.raises(jmp.ShardingError, match="not divisible by mesh axis 'stage' of size 4"):
        _on(mesh, rules, 2)  # 2 stages of blocks on a 4-stage mesh: refused at init
    four = _on(mesh, rules, 4)
    with jmp.activate(mesh, rules), pytest.raises(jmp.ConfigError, match="multiple of 8"):
        jmp.pipeline.check_pipeline(four, mesh, num_microbatches=4, batch_size=12)
