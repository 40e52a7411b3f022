"""Training: every strategy equals the one-device run; accumulation; Megatron collective count."""

import math

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import jmp
from jmp.inspect import collectives, summary
from jmp.models import GPT, GPTConfig
from jmp.train import TrainConfig, lr_schedule, make_optimizer, make_step
from jmp.train.data import TextData

CFG = GPTConfig.named("tiny", n_layers=2)
TRAIN = TrainConfig(steps=5, batch_size=8, lr=1e-3, warmup_steps=1)
STEPS = 5
DATA = TextData.from_tokens(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8))

CASES = [  # (strategy, mesh)
    ("dp", "data=8"),
    ("fsdp", "data=8"),
    ("tp", "model=8"),
    ("dp_tp", "data=2,model=4"),
    ("dp_tp", "data=4,model=2"),
    ("dp_tp", "data=1,model=8"),
    ("fsdp_tp", "data=2,model=4"),
    ("fsdp_tp", "data=4,model=2"),
]


def train(mesh, rules, cfg=CFG, train_cfg=TRAIN, steps=STEPS, microbatches=1):
    """Losses of ``steps`` steps, the final state, and the step function."""
    model = jmp.shard_init(lambda rngs: GPT(cfg, rngs=rngs), mesh, rules, seed=0)
    step = make_step(
        model,
        make_optimizer(train_cfg),
        mesh,
        rules,
        microbatches=microbatches,
        schedule=lr_schedule(train_cfg),
    )
    state, losses = step.init_state(), []
    for k in range(steps):
        batch = DATA.batch(
            k, batch_size=train_cfg.batch_size, seq_len=cfg.seq_len, mesh=mesh, rules=rules
        )
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return np.array(losses), state, step


@pytest.fixture(scope="module")
def single_device_run():
    """The reference: the same model and batches on one device."""
    mesh = jmp.make_mesh("data=1,model=1", devices=jax.devices()[:1])
    losses, state, _ = train(mesh, jmp.rules.preset("dp_tp", mesh))
    return losses, jax.tree.map(np.asarray, state.params)


@pytest.mark.parametrize("strategy,spec", CASES)
def test_strategy_matches_single_device(make_mesh, single_device_run, strategy, spec):
    mesh = make_mesh(spec)
    rules = jmp.rules.preset(strategy, mesh)
    losses, state, step = train(mesh, rules)
    ref_losses, ref_params = single_device_run
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
    assert losses[-1] < losses[0]
    flat = jax.tree_util.tree_leaves_with_path(state.params)
    ref = dict(jax.tree_util.tree_leaves_with_path(ref_params))
    for path, value in flat:
        np.testing.assert_allclose(
            np.asarray(value), ref[path], rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path)
        )
    assert step.jitted._cache_size() == 1, "the step recompiled after its first call"
    _check_replicas_identical(state.params)
    _check_bytes_per_device(state, mesh)


def _check_replicas_identical(params):
    """Every copy of a shard is bitwise identical across the devices holding it."""
    for path, value in jax.tree_util.tree_leaves_with_path(params):
        copies = {}
        for shard in value.addressable_shards:
            key = tuple((s.start, s.stop) for s in shard.index)
            data = np.asarray(shard.data)
            if key in copies:
                np.testing.assert_array_equal(data, copies[key], err_msg=jax.tree_util.keystr(path))
            copies[key] = data


def _check_bytes_per_device(state, mesh):
    """Per-device bytes of parameters and Adam moments equal total / shard factor."""
    moments = [
        s
        for s in jax.tree.leaves(
            state.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState)
        )
        if isinstance(s, optax.ScaleByAdamState)
    ]
    assert moments, "no Adam state found"
    for tree in (state.params, moments[0].mu, moments[0].nu):
        for leaf in jax.tree.leaves(tree):
            spec = leaf.sharding.spec
            factor = math.prod(
                mesh.shape[a]
                for entry in spec
                if entry is not None
                for a in ((entry,) if isinstance(entry, str) else entry)
            )
            local = leaf.addressable_shards[0].data.nbytes
            assert local * factor == leaf.nbytes, (spec, local, leaf.nbytes)
    # moments are sharded exactly like the parameters
    for p, m in zip(jax.tree.leaves(state.params), jax.tree.leaves(moments[0].mu), strict=True):
        assert p.sharding.is_equivalent_to(m.sharding, p.ndim)


def test_fsdp_shards_parameters_and_optimizer_over_data(make_mesh):
    mesh = make_mesh("data=8")
    _, state, _ = train(mesh, jmp.rules.preset("fsdp", mesh), steps=1)
    kernel = state.params["blocks"][0]["mlp"]["up"]["kernel"][...]
    assert kernel.addressable_shards[0].data.shape == (CFG.d_model // 8, CFG.hidden)
    total = sum(x.size for x in jax.tree.leaves(nnx.state(GPT(CFG, rngs=nnx.Rngs(0)), nnx.Param)))
    local = sum(x.addressable_shards[0].data.size for x in jax.tree.leaves(state.params))
    # everything with an 'embed' dim is split 8 ways; only the (None, 'embed') position table,
    # the ('embed',)-less biases and nothing else stay whole
    assert local < total / 4, (local, total)


@pytest.mark.parametrize(
    "spec,strategy,micro", [("data=2,model=4", "dp_tp", 4), ("data=4,model=2", "fsdp_tp", 2)]
)
def test_gradient_accumulation_equals_one_big_batch(make_mesh, spec, strategy, micro):
    mesh = make_mesh(spec)
    rules = jmp.rules.preset(strategy, mesh)
    jmp.train.check_batch(TRAIN.batch_size, micro, mesh, rules)  # microbatches split evenly
    whole, state_whole, _ = train(mesh, rules, steps=2)
    accumulated, state_acc, _ = train(mesh, rules, steps=2, microbatches=micro)
    np.testing.assert_allclose(accumulated, whole, rtol=1e-5)
    for a, b in zip(
        jax.tree.leaves(state_acc.params), jax.tree.leaves(state_whole.params), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def _megatron_all_reduces(n_layers, mode, mesh, rules, batch_size=8):
    cfg = GPTConfig.named("tiny", n_layers=n_layers, mode=mode)
    model = jmp.shard_init(lambda rngs: GPT(cfg, rngs=rngs), mesh, rules)
    step = make_step(model, make_optimizer(TRAIN), mesh, rules)
    batch = DATA.batch(0, batch_size=batch_size, seq_len=cfg.seq_len, mesh=mesh, rules=rules)
    found = collectives(step.lower(step.init_state(), batch).compile(), mesh)
    local_rows = batch_size // mesh.shape.get("data", 1)
    activation_bytes = local_rows * cfg.seq_len * cfg.d_model * 4  # b·s·h per device, f32
    big = [
        c
        for c in found
        if c.kind == "all-reduce" and c.axes == ("model",) and c.bytes == activation_bytes
    ]
    return sum(c.count for c in big), found


@pytest.mark.parametrize("spec,strategy", [("model=8", "tp"), ("data=2,model=4", "dp_tp")])
@pytest.mark.parametrize("mode", ["auto", "manual"])
def test_tensor_parallel_step_has_the_megatron_all_reduce_count(make_mesh, spec, strategy, mode):
    """Per block: 2 all-reduces of b·s·h over 'model' forward, 2 backward.

    Besides the blocks, the embedding's lookup adds one of b·s·h forward and the output head
    one backward (its input's gradient): 2 + 4 * n_layers in all.
    """
    mesh = make_mesh(spec)
    rules = jmp.rules.preset(strategy, mesh)
    one, found_one = _megatron_all_reduces(1, mode, mesh, rules)
    two, found_two = _megatron_all_reduces(2, mode, mesh, rules)
    assert two - one == 4, (summary(found_one), summary(found_two))
    assert one == 2 + 4 * 1, summary(found_one)
    assert count_kinds(found_two) == {"all-reduce"}, summary(found_two)


def count_kinds(found):
    return {c.kind for c in found}


def test_loss_falls_on_real_text(make_mesh):
    mesh = make_mesh("data=2,model=4")
    rules = jmp.rules.preset("dp_tp", mesh)
    text = TextData.from_paths(None, max_bytes=400_000)
    cfg = GPTConfig.named("tiny")
    train_cfg = TrainConfig(steps=60, batch_size=16, lr=3e-3, warmup_steps=5)
    model = jmp.shard_init(lambda rngs: GPT(cfg, rngs=rngs), mesh, rules)
    step = make_step(model, make_optimizer(train_cfg), mesh, rules)
    state = step.init_state()
    losses = []
    for k in range(train_cfg.steps):
        batch = text.batch(k, batch_size=16, seq_len=cfg.seq_len, mesh=mesh, rules=rules)
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert abs(losses[0] - math.log(256)) < 0.3  # starts near uniform over bytes
    assert np.mean(losses[-10:]) < 3.3, losses[-10:]


def test_nonfinite_update_is_not_applied(make_mesh):
    mesh = make_mesh("data=2,model=4")
    rules = jmp.rules.preset("dp_tp", mesh)
    model = jmp.shard_init(lambda rngs: GPT(CFG, rngs=rngs), mesh, rules)

    def nan_loss(model, batch):
        return jmp.train.next_token_loss(model, batch) * np.float32("nan")

    step = make_step(model, make_optimizer(TRAIN), mesh, rules, loss_fn=nan_loss)
    state = step.init_state()
    before = jax.tree.map(np.asarray, state.params)
    batch = DATA.batch(0, batch_size=8, seq_len=CFG.seq_len, mesh=mesh, rules=rules)
    state, metrics = step(state, batch)
    assert not np.isfinite(float(metrics["loss"]))
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_indivisible_batch_is_a_clear_error(make_mesh):
    mesh = make_mesh("data=4,model=2")
    with pytest.raises(jmp.ConfigError, match="multiple of 4"):
        jmp.train.check_batch(6, 1, mesh, jmp.rules.preset("dp_tp", mesh))


@pytest.mark.parametrize(
    "kwargs,culprit",
    [
        ({"steps": 0}, "steps=0"),
        ({"lr": -1.0}, "lr=-1.0"),
        ({"batch_size": 8, "microbatches": 3}, "microbatches=3"),
    ],
)
def test_bad_train_config(kwargs, culprit):
    with pytest.raises(jmp.ConfigError, match=culprit):
        TrainConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs,culprit",
    [
        ({"d_model": 30, "n_heads": 4}, "n_heads=4 must divide d_model=30"),
        ({"dtype": "float8"}, "dtype='float8'"),
        ({"n_layers": 0}, "n_layers=0"),
    ],
)
def test_bad_model_config(kwargs, culprit):
    with pytest.raises(jmp.ConfigError, match=culprit):
        GPTConfig(**kwargs)


def test_remat_gives_the_same_losses(make_mesh):
    mesh = make_mesh("data=2,model=4")
    rules = jmp.rules.preset("dp_tp", mesh)
    plain, _, _ = train(mesh, rules, steps=2)
    remat, _, _ = train(mesh, rules, cfg=GPTConfig.named("tiny", n_layers=2, remat=True), steps=2)
    np.testing.assert_allclose(remat, plain, rtol=1e-5)


def test_bfloat16_compute_keeps_float32_parameters(make_mesh):
    mesh = make_mesh("data=2,model=4")
    rules = jmp.rules.preset("dp_tp", mesh)
    cfg = GPTConfig.named("tiny", n_layers=2, dtype="bfloat16")
    losses, state, _ = train(mesh, rules, cfg=cfg, steps=3)
    ref, _, _ = train(mesh, rules, steps=3)
    assert {str(x.dtype) for x in jax.tree.leaves(state.params)} == {"float32"}
    np.testing.assert_allclose(losses, ref, rtol=3e-2)  # bf16 matmuls: ~3 significant digits
