"""jmp.plan for context parallelism, against what XLA compiles.

For cp strategies (ring and all-gather attention, balanced and contiguous layouts, with data,
FSDP and tensor axes, remat, microbatches, bfloat16) the planner's bytes per mesh axis must
equal, byte for byte, those of the collectives ``jmp.inspect`` finds in the compiled train step
on simulated CPU devices; parameter + optimizer memory must be within 10% of the compiled
arguments, and the activation estimate within the order of magnitude of XLA's temporaries.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
import pytest
from flax import nnx

import jmp
from jmp import plan
from jmp.models.gpt import GPT, GPTConfig
from jmp.train import TrainConfig, make_optimizer, make_step
from tests.test_plan import assert_bytes_per_axis_equal

BATCH = 16
TINY = GPTConfig.named("tiny")  # d=64, 2 layers, 8 heads, vocab 256, seq 64

# (strategy, mesh, GPTConfig overrides, microbatches)
CASES = [
    ("cp", "context=8", {}, 1),
    ("cp", "context=4", {"cp_impl": "allgather", "remat": True, "cp_load_balance": False}, 1),
    ("dp_cp", "data=2,context=4", {"cp_impl": "allgather"}, 1),
    ("fsdp_cp", "data=2,context=4", {"remat": True}, 2),
    ("tp_cp", "model=2,context=4", {"dtype": "bfloat16"}, 1),
    ("dp_tp_cp", "data=2,model=2,context=2", {"cp_impl": "allgather"}, 1),
]


def compiled_step(cfg: GPTConfig, strategy: str, spec: str, microbatches: int):
    """The train step for ``cfg``, compiled from abstract shapes on the first devices it needs."""
    n = math.prod(int(part.split("=")[1]) for part in spec.split(","))
    mesh = jmp.make_mesh(spec, devices=jax.devices()[:n])
    rules = jmp.rules.preset(strategy, mesh)
    with nnx.use_eager_sharding(False):  # shapes only: nothing is allocated
        model = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))
    step = make_step(
        model,
        make_optimizer(TrainConfig(batch_size=BATCH)),
        mesh,
        rules,
        microbatches=microbatches,
    )
    batch = step.abstract_batch(BATCH, cfg.seq_len)
    compiled = step.lower(step.abstract_state(), batch).compile()
    batch_bytes = sum(np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in batch)
    return mesh, compiled, int(batch_bytes)


def case_params(cases):
    """(strategy, mesh, GPTConfig overrides, microbatches) cases as named pytest params."""
    return [
        pytest.param(*c, id=f"{c[0]}-{c[1]}-{'-'.join(map(str, c[2].values()))}-mb{c[3]}")
        for c in cases
    ]


def check_prediction(strategy, spec, options, microbatches):
    """Compile a case's train step and estimate it: bytes per axis equal, parameter +
    optimizer state within 10%. Returns (config, mesh, estimate, collectives, memory)."""
    cfg = GPTConfig(**{**TINY.to_dict(), **options})
    mesh, compiled, batch_bytes = compiled_step(cfg, strategy, spec, microbatches)
    est = plan.estimate(
        cfg, dict(mesh.shape), strategy, batch_size=BATCH, microbatches=microbatches, device="cpu"
    )
    found = jmp.inspect.collectives(compiled, mesh)
    assert_bytes_per_axis_equal(est, found, f"{strategy} {spec} {options} mb={microbatches}")
    memory = jmp.inspect.memory(compiled)
    state = memory.arguments - batch_bytes
    assert abs(est.state_bytes - state) <= 0.10 * state, (est.state_bytes, state)
    return cfg, mesh, est, found, memory


@pytest.mark.parametrize(("strategy", "spec", "options", "microbatches"), case_params(CASES))
def test_cp_prediction_equals_compiled_step(strategy, spec, options, microbatches):
    cfg, _, est, found, memory = check_prediction(strategy, spec, options, microbatches)
    kinds = {c.kind for c in found if c.axes == ("context",)}
    if cfg.cp_impl == "ring":
        assert "collective-permute" in kinds and "all-gather" not in kinds
    else:
        assert {"all-gather", "reduce-scatter"} <= kinds
    # activations: an estimate (see test_plan); the order of magnitude of XLA's temporaries
    working = est.grads_bytes + est.activations_bytes + est.gathered_bytes
    assert 0.3 <= working / memory.temporaries <= 2.0, (working, memory.temporaries)


def test_cp_splits_activations_and_reports_its_impl():
    cfg = GPTConfig.named("7b", dtype="bfloat16", remat=True, seq_len=32768)
    kw = dict(batch_size=1, device="h100")
    tp = plan.estimate(cfg, {"model": 8}, "tp", **kw)
    ring = plan.estimate(cfg, {"model": 8, "context": 4}, "tp_cp", **kw)
    allgather = dataclasses.replace(cfg, cp_impl="allgather")
    ag = plan.estimate(allgather, {"model": 8, "context": 4}, "tp_cp", **kw)
    # a quarter of the tokens per device; the ring keeps float32 score blocks (no fused
    # attention inside a block), all-gather attention is cuDNN's on GPUs in bfloat16
    assert ag.activations_bytes < tp.activations_bytes / 3
    assert ag.activations_bytes < ring.activations_bytes < tp.activations_bytes
    assert ring.flops == pytest.approx(tp.flops / 4)  # model FLOPs per device
    assert ring.params_bytes == tp.params_bytes  # parameters are not split over 'context'
    assert any("ring" in c.what for c in ring.comm)
    assert any(c.kind == "all-gather" and c.axis == "context" for c in ag.comm)
    assert "cp_impl=ring over context=4" in ring.reason
    assert "cp_impl=allgather over context=4" in ag.reason
    assert "limited by" in ring.reason


def test_cp_bad_layout_is_refused():
    with pytest.raises(jmp.ConfigError, match="does not split into 16 chunks over context=8"):
        plan.estimate(GPTConfig.named("tiny", seq_len=72), {"context": 8}, "cp", batch_size=8)
    # contiguous blocks need only a multiple of the context size
    plan.estimate(
        GPTConfig.named("tiny", seq_len=72, cp_load_balance=False),
        {"context": 8},
        "cp",
        batch_size=8,
    )
