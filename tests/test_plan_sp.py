"""jmp.plan for sequence parallelism (``sp``), against what XLA compiles.

For tp_sp, dp_tp_sp and fsdp_tp_sp (both modes that write reduce-scatters and all-gathers, and
``mode='collective'``'s ring steps; remat, microbatches, bfloat16) the planner's bytes per mesh
axis must equal, byte for byte, those of the collectives ``jmp.inspect`` finds in the compiled
train step on simulated CPU devices, and its count of each kind of collective over 'model' the
compiled one; parameter + optimizer memory must be within 10% of the compiled arguments.
Then what sp changes in the estimate: activations, the same ring bytes as tp, the search.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest

import jmp
from jmp import plan
from jmp.models.gpt import GPTConfig
from tests.test_plan_cp import BATCH, case_params, check_prediction

# (strategy, mesh, GPTConfig overrides, microbatches)
CASES = [
    ("tp_sp", "model=4", {}, 1),
    ("dp_tp_sp", "data=2,model=4", {"mode": "collective", "remat": True}, 2),
    ("fsdp_tp_sp", "data=2,model=4", {}, 1),
    ("fsdp_tp_sp", "data=4,model=2", {"remat": True, "dtype": "bfloat16"}, 2),
]


@pytest.mark.parametrize(("strategy", "spec", "options", "microbatches"), case_params(CASES))
def test_sp_prediction_equals_compiled_step(strategy, spec, options, microbatches):
    cfg, mesh, est, found, memory = check_prediction(strategy, spec, options, microbatches)
    kinds = Counter()
    for c in found:
        if c.axes == ("model",):
            kinds[c.kind] += c.count
    predicted = Counter()
    for c in est.comm:
        if c.axis == "model":
            predicted[c.kind] += c.count
    assert predicted == kinds, (predicted, kinds)
    # no activation all-reduce over 'model' is left: only the loss's and the small gradients'
    rows = BATCH // mesh.shape.get("data", 1) // microbatches
    chunk = rows * cfg.seq_len * cfg.d_model * 4 // mesh.shape["model"]  # float32 on CPU
    sums = [c.bytes for c in found if c.axes == ("model",) and c.kind == "all-reduce"]
    assert max(sums) < chunk
    # activations: an estimate (see test_plan); with remat XLA:CPU's temporaries do not shrink
    working = est.grads_bytes + est.activations_bytes + est.gathered_bytes
    if not cfg.remat:
        assert 0.45 <= working / memory.temporaries <= 1.5, (working, memory.temporaries)


def test_sp_splits_the_residual_stream_and_moves_tps_ring_bytes():
    cfg = GPTConfig.named("7b", dtype="bfloat16", seq_len=8192)
    kw = dict(batch_size=1, device="h100")
    tp = plan.estimate(cfg, {"model": 8}, "tp", **kw)
    sp = plan.estimate(cfg, {"model": 8}, "tp_sp", **kw)
    ring = plan.estimate(dataclasses.replace(cfg, mode="collective"), {"model": 8}, "tp_sp", **kw)
    assert sp.activations_bytes < tp.activations_bytes
    assert sp.params_bytes == tp.params_bytes and sp.flops == tp.flops
    # a reduce-scatter and an all-gather move what one all-reduce moves on a ring: the same
    # time but for the small terms (norm gradients, the position table's 3 gathers)
    assert sp.comm_time == pytest.approx(tp.comm_time, rel=0.03)
    assert ring.comm_time == pytest.approx(sp.comm_time)
    assert {c.kind for c in ring.comm if c.axis == "model"} >= {"collective-permute"}
    assert "all-gather" not in {c.kind for c in ring.comm if "forward" in c.what}
    assert "sequence parallel over model=8" in sp.reason
    # with remat only the block inputs are kept: split t ways
    remat = dataclasses.replace(cfg, remat=True)
    tp_r = plan.estimate(remat, {"model": 8}, "tp", **kw)
    sp_r = plan.estimate(remat, {"model": 8}, "tp_sp", **kw)
    kept = cfg.n_layers * cfg.seq_len * cfg.d_model * 2
    assert tp_r.activations_bytes - sp_r.activations_bytes >= kept * 7 / 8


def test_search_ranks_sp_candidates():
    cfg = GPTConfig.named("7b", dtype="bfloat16", seq_len=8192, remat=True)
    ranked = plan.search(cfg, 8, "h100", batch_size=8, include_unfit=True)
    sp = [e for e in ranked if "sp" in e.strategy.split("_")]
    assert {e.strategy for e in sp} == {"tp_sp", "dp_tp_sp", "fsdp_tp_sp"}
    assert all("sequence parallel over model=" in e.reason for e in sp)


def test_sp_bad_sequence_is_refused():
    with pytest.raises(jmp.ConfigError, match="seq_len=60 does not split over model=8"):
        plan.estimate(GPTConfig.named("tiny", seq_len=60), {"model": 8}, "tp_sp", batch_size=8)
    with pytest.raises(jmp.ConfigError, match="mixture of experts"):
        plan.estimate(
            GPTConfig.named("tiny", n_experts=4, top_k=2), {"model": 4}, "tp_sp", batch_size=8
        )
