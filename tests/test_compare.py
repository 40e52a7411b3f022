"""jmp.plan.compare on a plain-NNX model (tests/plain_model.py): figures read off the compiled step.

Its bytes per mesh axis and FLOPs equal those of the same step built independently on real
arrays (jmp.shard_init + jmp.train.make_step); it allocates nothing; invalid candidates come back
rejected with jmp's message; the ranking is by step time among those that fit.
"""

import functools
import gc
from collections import defaultdict

import jax
import numpy as np
import optax
from flax import nnx

import jmp
from tests import plain_model
from tests.plain_model import PatchClassifier, loss_fn

OPTIMIZER = optax.adam(1e-2)
BATCH = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), plain_model.batch(0))
VALID = [("dp", "data=8"), ("fsdp", "data=8"), ("tp", "model=8"), ("fsdp_tp", "data=4,model=2")]
INVALID = [("dp_fsdp", "data=8"), ("tp", "data=8"), ("fsdp", "data=16")]


@functools.cache
def compared():
    """(ranked results, live arrays before, after) of one compare over every candidate."""
    gc.collect()  # arrays other tests of this process left to the collector are not ours
    before = len(jax.live_arrays())
    ranked = jmp.plan.compare(
        PatchClassifier,
        loss_fn,
        BATCH,
        candidates=VALID + INVALID,
        optimizer=OPTIMIZER,
        device="h100",
    )
    gc.collect()
    return tuple(ranked), before, len(jax.live_arrays())


def by_key(strategy, mesh):
    [found] = [c for c in compared()[0] if (c.strategy, c.mesh) == (strategy, mesh)]
    return found


@functools.cache
def reference(strategy, spec):
    """The same step built on real arrays, compiled: (compiled, mesh)."""
    mesh = jmp.make_mesh(spec)
    rules = jmp.rules.preset(strategy, mesh)
    model = jmp.shard_init(PatchClassifier, mesh, rules, seed=0)
    step = jmp.train.make_step(model, OPTIMIZER, mesh, rules, loss_fn=loss_fn)
    batch = jax.device_put(plain_model.batch(0), step.batch_sharding)
    return step.lower(step.init_state(), batch).compile(), mesh


def test_valid_strategies_are_compiled_and_ranked():
    ranked = compared()[0]
    ok = [c for c in ranked if not c.rejected]
    assert {(c.strategy, c.mesh) for c in ok} == set(VALID)
    for c in ok:
        assert c.fits and c.flops > 0 and c.memory_bytes > 0 and c.step_time > 0
        assert c.step_time == c.compute_time + c.comm_time
        assert 0 < c.mfu <= 1
    assert not by_key("dp", "data=8").comm_bytes.keys() - {"data"}
    assert set(by_key("tp", "model=8").comm_bytes) == {"model"}
    assert set(by_key("fsdp_tp", "data=4,model=2").comm_bytes) == {"data", "model"}


def test_bytes_and_flops_equal_the_step_built_on_real_arrays():
    for strategy, spec in (("fsdp", "data=8"), ("tp", "model=8")):
        compiled, mesh = reference(strategy, spec)
        per_axis = defaultdict(int)
        for c in jmp.inspect.collectives(compiled, mesh):
            if c.axes:
                per_axis[",".join(c.axes)] += c.total_bytes
        got = by_key(strategy, spec)
        assert got.comm_bytes == dict(per_axis), strategy
        assert all(isinstance(b, int) and b > 0 for b in got.comm_bytes.values())
        assert got.flops == jmp.inspect.flops(compiled), strategy
        mem = jmp.inspect.memory(compiled)
        assert got.memory == mem
        assert got.memory_bytes == mem.arguments + mem.temporaries + mem.outputs - mem.aliased


def test_roofline_follows_the_estimate_convention():
    c = by_key("fsdp_tp", "data=4,model=2")
    dev = jmp.plan.get_device("h100")
    assert c.device == dev
    assert c.compute_time == c.flops / (dev.peak_flops * dev.matmul_efficiency)
    sizes = {"data": 4, "model": 2}
    ring = {"all-reduce": lambda n: 2 * (n - 1) / n, "collective-permute": lambda n: 1.0}
    sent = sum(
        x.total_bytes
        * ring.get(x.kind, lambda n: (n - 1) / n)(int(np.prod([sizes[a] for a in x.axes])))
        for x in c.collectives
    )
    assert np.isclose(c.comm_time, sent / (dev.link_bandwidth * dev.link_efficiency))
    assert np.isclose(c.mfu, c.flops / (c.step_time * dev.peak_flops))


def test_nothing_is_allocated():
    # shard_init of PatchClassifier alone leaves 28 live arrays; compare leaves none
    _, before, after = compared()
    assert abs(after - before) <= 2
    calls = {"traced": 0, "concrete": 0}

    def counting(key, shape, dtype=jax.numpy.float32):
        calls["traced" if isinstance(key, jax.core.Tracer) else "concrete"] += 1
        return jax.random.normal(key, shape, dtype)

    def make(rngs):
        init = nnx.with_partitioning(counting, ("embed", "mlp"))
        return nnx.Linear(16, 12, kernel_init=init, use_bias=False, rngs=rngs)

    before = len(jax.live_arrays())
    ranked = jmp.plan.compare(
        make,
        lambda model, batch: model(batch).mean(),
        jax.ShapeDtypeStruct((8, 16), np.float32),
        candidates=[("dp", "data=8"), ("tp", "model=8")],
        optimizer=optax.sgd(0.1),
    )
    assert abs(len(jax.live_arrays()) - before) <= 2
    assert calls["concrete"] == 0 and calls["traced"] > 0  # only ever traced, never run
    # 12 (the 'mlp' dim) is not divisible by model=8: rejected before anything is compiled
    assert [(c.strategy, c.rejected) for c in ranked] == [("dp", False), ("tp", True)]
    assert "not divisible by mesh axis 'model' of size 8" in ranked[1].reason
    assert "kernel" in ranked[1].reason


def test_invalid_candidates_are_rejected_with_the_message():
    ranked = compared()[0]
    rejected = [c for c in ranked if c.rejected]
    assert [(c.strategy, c.mesh) for c in rejected] == INVALID  # last, in the order given
    assert ranked[-len(INVALID) :] == tuple(rejected)
    for c in rejected:
        assert not c.fits and c.reason and "\n" not in c.reason
        assert c.comm_bytes == {} and c.flops == 0 and c.memory is None
    assert rejected[0].reason.startswith("Unknown strategy 'dp_fsdp'")
    assert rejected[1].reason.startswith("Strategy 'tp' does not fit mesh data=8")
    assert "needs 16 devices" in rejected[2].reason


def test_batch_that_does_not_split_is_rejected():
    odd = jax.tree.map(lambda a: jax.ShapeDtypeStruct((12, *a.shape[1:]), a.dtype), BATCH)
    [c] = jmp.plan.compare(PatchClassifier, loss_fn, odd, candidates=[("dp", "data=8")])
    assert c.rejected and "do not divide" in c.reason and "multiple of 8" in c.reason


def test_ranking_fitting_by_step_time_then_unfit_then_rejected():
    ranked = compared()[0]
    times = [c.step_time for c in ranked if c.fits]
    assert times == sorted(times) and len(times) == len(VALID)
    # a device whose memory holds the smallest candidates but not the largest
    sizes = sorted(c.memory_bytes for c in ranked if not c.rejected)
    small = jmp.plan.Device("small", 1e12, (sizes[0] + sizes[-1]) // 2, 1e10, memory_fraction=1)
    again = jmp.plan.compare(
        PatchClassifier,
        loss_fn,
        BATCH,
        candidates=[("dp", "data=8"), ("fsdp", "data=8"), ("tp", "data=8")],
        optimizer=OPTIMIZER,
        device=small,
    )
    fits = [c.fits for c in again]
    assert fits.count(True) >= 1 and not fits[-1] and again[-1].rejected
    unfit = [c for c in again if not c.fits and not c.rejected]
    assert unfit and all(c.memory_bytes > small.usable_bytes for c in unfit)
    assert fits == sorted(fits, reverse=True)  # every fitting one before every other


def test_format_comparison_has_one_row_per_candidate():
    from rich.console import Console

    ranked = compared()[0]
    table = jmp.plan.format_comparison(ranked, title="PatchClassifier on 8 devices")
    assert table.row_count == len(ranked)
    console = Console(width=200, record=True)
    console.print(table)
    text = console.export_text()
    for col in ("strategy", "mesh", "bytes/axis", "memory/device", "GFLOP/device", "MFU"):
        assert col in text
    assert "rejected: Unknown strategy 'dp_fsdp'" in text
