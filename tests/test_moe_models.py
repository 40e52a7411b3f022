"""Mixture-of-experts GPT and Llama trained with jmp.fit under the registry's ep strategies.

The reference is the same model trained on one device (the unsharded program); every
expert-parallel mesh must give the same losses and parameters after 5 AdamW steps, and its
compiled forward must hold exactly one dispatch and one combine all-to-all per MoE layer over
'expert'. The layer itself is checked against a numpy loop in tests/test_moe.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jmp
from jmp.layers import MoE
from jmp.models import GPT, GPTConfig, Llama, LlamaConfig
from jmp.train.step import make_eval_step, make_step, next_token_loss

STEPS, BATCH, SEQ, VOCAB = 5, 8, 16, 64
# 2 blocks, the second a MoE of 8 experts (divisible by every expert axis tried: 2, 4, 8)
GPT_MOE = GPTConfig(
    vocab_size=VOCAB, seq_len=SEQ, d_model=32, n_layers=2, n_heads=4,
    n_experts=8, top_k=2, n_shared_experts=1, moe_every=2, aux_loss_weight=0.05,
)  # fmt: skip
LLAMA_MOE = LlamaConfig(
    vocab_size=VOCAB, seq_len=SEQ, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
    n_experts=8, top_k=2,
)  # fmt: skip
MODELS = {"gpt": (GPT, GPT_MOE), "llama": (Llama, LLAMA_MOE)}


def _batch(k):
    """Batch k (the same few repeat, so 5 steps visibly lower the loss)."""
    k = k % 2
    tokens = np.random.default_rng(k).integers(0, VOCAB, (BATCH, SEQ + 1), dtype=np.int32)
    return tokens[:, :-1], tokens[:, 1:]


def _fit(name, mesh, strategy):
    cls, cfg = MODELS[name]
    return jmp.fit(
        lambda rngs: cls(cfg, rngs=rngs),
        next_token_loss,
        _batch,
        mesh=mesh,
        strategy=strategy,
        optimizer=optax.adamw(3e-3),
        steps=STEPS,
        progress=False,
    )


@pytest.fixture(scope="module")
def one_device():
    mesh = jmp.make_mesh("data=1", devices=jax.devices()[:1])
    return {name: _fit(name, mesh, "dp") for name in MODELS}


def _params(result):
    state = nnx.state(result.model, nnx.Param)
    return {
        jax.tree_util.keystr(p): np.asarray(a)
        for p, a in jax.tree_util.tree_leaves_with_path(state)
    }


# (model, strategy, mesh): expert = 2, 4, 8, with data, fsdp and tensor axes beside it
CASES = [
    ("gpt", "ep", "expert=8"),
    ("gpt", "dp_ep", "data=2,expert=4"),
    ("gpt", "fsdp_ep_tp", "data=2,expert=2,model=2"),
    ("llama", "dp_ep", "data=4,expert=2"),
    ("llama", "ep_tp", "expert=4,model=2"),
]


@pytest.mark.parametrize("name,strategy,spec", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_expert_parallel_training_equals_one_device(make_mesh, one_device, name, strategy, spec):
    want = one_device[name]
    result = _fit(name, make_mesh(spec), strategy)
    losses = [r["loss"] for r in result.history]
    want_losses = [r["loss"] for r in want.history]
    assert want_losses[-1] < want_losses[0]  # it trains
    np.testing.assert_allclose(losses, want_losses, rtol=2e-5)
    for key in ("ce_loss", "moe_aux_loss", "moe_balance_loss", "moe_z_loss"):
        got = [r[key] for r in result.history]
        np.testing.assert_allclose(got, [r[key] for r in want.history], rtol=2e-5, err_msg=key)
    np.testing.assert_allclose(
        result.history[-1]["expert_load"], want.history[-1]["expert_load"], atol=1e-6
    )
    got, ref = _params(result), _params(want)
    assert got.keys() == ref.keys()
    # AdamW moves a weight by up to lr = 3e-3 a step whatever its gradient's size, so a
    # near-zero gradient's rounding shows as ~1e-5: 1e-4 is 1/150 of 5 steps' movement
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-4, atol=1e-4, err_msg=k)
    # the experts are split over 'expert': each device holds n_experts / expert of them
    moe = result.model.blocks[1].mlp if name == "gpt" else result.model.blocks.mlp
    n_ep = dict(make_mesh(spec).shape)["expert"]
    assert moe.gate[...].addressable_shards[0].data.shape[-3] == 8 // n_ep


def test_metrics_are_the_losses_and_the_expert_load(one_device):
    """loss = cross-entropy + the weighted aux losses; the load of each layer sums to 1."""
    for name, result in one_device.items():
        cfg = MODELS[name][1]
        for row in result.history:
            assert row["loss"] == pytest.approx(row["ce_loss"] + row["moe_aux_loss"], rel=1e-6)
            want_aux = (
                cfg.aux_loss_weight * row["moe_balance_loss"]
                + cfg.z_loss_weight * (row["moe_z_loss"])
            )
            n_moe = cfg.moe_layers(cfg.n_layers)
            assert row["moe_aux_loss"] == pytest.approx(n_moe * want_aux, rel=1e-5)
            load = np.asarray(row["expert_load"])
            assert load.shape == (n_moe, cfg.n_experts)
            np.testing.assert_allclose(load.sum(-1), 1.0, rtol=1e-6)
            assert row["moe_dropped"] == 0  # dropless
            assert row["moe_balance_loss"] >= 1.0 - 1e-6  # 1 only when perfectly balanced


def _all_to_alls(compiled):
    return sum(
        " all-to-all(" in line or " all-to-all-start(" in line
        for line in compiled.as_text().splitlines()
    )


@pytest.mark.parametrize("name", list(MODELS))
def test_one_dispatch_and_one_combine_all_to_all_per_moe_layer(make_mesh, name):
    cls, cfg = MODELS[name]
    mesh = make_mesh("data=2,expert=4")
    rules = jmp.rules.preset("dp_ep", mesh)
    model = jmp.shard_init(lambda rngs: cls(cfg, rngs=rngs), mesh, rules)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tokens = jax.device_put(_batch(0)[0], NamedSharding(mesh, P(("data", "expert"))))

    def forward(params, tokens):
        with jmp.activate(mesh, rules):
            return nnx.merge(graphdef, params, rest)(tokens)

    with jax.set_mesh(mesh):
        compiled = jax.jit(forward).lower(params, tokens).compile()
    # GPT's blocks are unrolled: two per MoE layer; Llama's are one lax.scan: two in its body,
    # run once per layer
    want = 2 * cfg.moe_layers(cfg.n_layers) if name == "gpt" else 2
    assert _all_to_alls(compiled) == want
    # jmp.inspect sees the same exchanges, once each (XLA:CPU writes one as a tuple of a
    # chunk per peer), executed once per MoE layer (the scan's trip count applied)
    found = [c for c in jmp.inspect.collectives(compiled, mesh) if c.kind == "all-to-all"]
    assert len(found) == want and all(c.axes == ("expert",) for c in found)
    assert sum(c.count for c in found) == 2 * cfg.moe_layers(cfg.n_layers)


def test_validation_loss_is_the_cross_entropy_alone(make_mesh):
    """Eval runs without the aux losses (``next_token_loss(aux=False)``): comparable to a
    dense model's, and equal to the training step's ce_loss on the same batch and weights."""
    mesh = make_mesh("data=2,expert=4")
    rules = jmp.rules.preset("dp_ep", mesh)
    model = jmp.shard_init(lambda rngs: GPT(GPT_MOE, rngs=rngs), mesh, rules)
    loss, metrics = next_token_loss(model, tuple(jnp.asarray(a) for a in _batch(0)))
    evaluate = make_eval_step(
        model, mesh, rules, loss_fn=lambda m, b: next_token_loss(m, b, aux=False)
    )
    val = evaluate(nnx.state(model, nnx.Param), _batch(0))
    np.testing.assert_allclose(float(val), float(metrics["ce_loss"]), rtol=1e-5)
    assert float(loss) > float(val)


def _one_line_error(fn, text):
    with pytest.raises(jmp.ConfigError) as err:
        fn()
    msg = str(err.value)
    assert text in msg and "\n" not in msg, msg


@pytest.mark.parametrize(
    "make,text",
    [
        (lambda: GPTConfig.named("tiny", n_experts=4, top_k=5), "top_k=5 exceeds n_experts=4"),
        (lambda: GPTConfig.named("tiny", n_experts=4, moe_every=0), "moe_every=0 must be"),
        (lambda: GPTConfig.named("tiny", n_experts=-1), "n_experts=-1 must be an int >= 0"),
        (lambda: LlamaConfig.named("tiny", n_experts=4, moe_every=2), "moe_every=2 must be 1"),
        (
            lambda: GPTConfig.named("tiny", n_experts=4, capacity_factor=-1.0),
            "capacity_factor=-1.0 must be None",
        ),
        (
            lambda: GPTConfig.named("tiny", n_experts=4, expert_activation="relu"),
            "expert_activation='relu' must be one of ('swiglu', 'gelu')",
        ),
    ],
)
def test_bad_moe_configs_are_one_line_errors(make, text):
    _one_line_error(make, text)


def test_experts_the_expert_axis_does_not_divide_are_refused(make_mesh):
    mesh = make_mesh("data=2,expert=4")
    cfg = GPTConfig.named("tiny", n_experts=6)
    _one_line_error(
        lambda: jmp.shard_init(lambda r: GPT(cfg, rngs=r), mesh, jmp.rules.preset("dp_ep", mesh)),
        "n_experts=6 is not divisible by mesh axis 'expert' of size 4",
    )


def test_a_moe_model_in_a_pipeline_is_refused():
    from jmp.pipeline import PipelinedGPT

    cfg = GPTConfig.named("tiny", n_layers=4, n_experts=4)
    _one_line_error(
        lambda: PipelinedGPT(cfg, num_stages=2, rngs=nnx.Rngs(0)), "does not run in a pipeline"
    )
    _one_line_error(
        lambda: Llama(LlamaConfig.named("tiny", n_experts=4), num_stages=2, rngs=nnx.Rngs(0)),
        "does not run in a pipeline",
    )


def test_parameter_counts_equal_the_built_models():
    for cls, cfg in MODELS.values():
        model = cls(cfg, rngs=nnx.Rngs(0))
        n = sum(a.size for a in jax.tree.leaves(nnx.state(model, nnx.Param)))
        assert cfg.num_params() == n
    # active: router + top_k experts + shared per MoE layer, by hand for the GPT
    d, f = GPT_MOE.d_model, GPT_MOE.hidden
    dense_mlp = 2 * d * f + f + d
    one_expert = 3 * d * f
    routed_all, routed_active = 8 * one_expert, 2 * one_expert
    assert GPT_MOE.num_params() - GPT_MOE.num_active_params() == routed_all - routed_active
    dense = GPTConfig(**{**GPT_MOE.to_dict(), "n_experts": 0})
    assert GPT_MOE.num_params() - dense.num_params() == (
        d * 8 + routed_all + one_expert - dense_mlp
    )


def test_gelu_experts_count_two_kernels_and_swiglu_configs_read_as_before():
    """GELU experts (up, down; the shared ones too, without biases): the counts equal the built
    model's parameters and the hand count; a SwiGLU config's dict has no new key (its runs
    resume), a GELU one's records it."""
    cfg = GPTConfig(**{**GPT_MOE.to_dict(), "expert_activation": "gelu"})
    model = GPT(cfg, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    assert cfg.num_params() == sum(a.size for a in jax.tree.leaves(params))
    moe = model.blocks[1].mlp
    assert isinstance(moe, MoE) and moe.gate is None and moe.shared is not None
    assert set(nnx.state(moe.shared, nnx.Param)) == {"up", "down"}  # kernels, no biases
    d, f = cfg.d_model, cfg.hidden
    one_expert = 2 * d * f
    dense = GPTConfig(**{**cfg.to_dict(), "n_experts": 0})
    assert cfg.num_params() - dense.num_params() == (
        d * 8 + 8 * one_expert + one_expert - (2 * d * f + f + d)
    )
    assert cfg.num_params() - cfg.num_active_params() == (8 - 2) * one_expert
    llama = LlamaConfig(**{**LLAMA_MOE.to_dict(), "expert_activation": "gelu"})
    n = sum(a.size for a in jax.tree.leaves(nnx.state(Llama(llama, rngs=nnx.Rngs(0)), nnx.Param)))
    assert llama.num_params() == n
    assert "expert_activation" not in GPT_MOE.to_dict()
    assert cfg.to_dict()["expert_activation"] == "gelu" and GPTConfig(**cfg.to_dict()) == cfg


# --- gradient accumulation: the routing metrics of the whole step -----------------------------

ROWS, LEN, E_ROUTED = 16, 8, 4
#: each row's tokens go to experts 0 x5, 1 x2, 2 x1 (top-1), in a shuffled order
ROW_EXPERTS = [0, 0, 0, 0, 0, 1, 1, 2]


class _RoutedLM(nnx.Module):
    """Embedding, a residual top-1 MoE with capacity factor 1, head. Token ``v`` is routed to
    expert ``v % 4`` (its embedding carries ``4 * onehot(v % 4)`` where the router reads), so
    any set of rows with the pattern above overfills expert 0 by the same share."""

    def __init__(self, rngs):
        d = 8
        table = np.random.default_rng(0).normal(size=(VOCAB, d)).astype(np.float32) * 0.1
        table[:, :E_ROUTED] = 4 * np.eye(E_ROUTED, dtype=np.float32)[np.arange(VOCAB) % E_ROUTED]
        self.embed = jmp.layers.named_param(jnp.asarray(table), ("vocab", "embed"))
        self.moe = MoE(d, 8, n_experts=E_ROUTED, top_k=1, capacity_factor=1.0, rngs=rngs)
        self.moe.router[...] = jnp.eye(d, E_ROUTED)
        init = nnx.initializers.normal(0.5)
        self.head = jmp.layers.named_param(init(rngs.params(), (d, VOCAB)), ("embed", "vocab"))

    def __call__(self, tokens):
        h = self.embed[...][tokens]
        return (h + self.moe(h)) @ self.head[...]


def _routed_batch():
    rng = np.random.default_rng(5)
    experts = np.stack([rng.permutation(ROW_EXPERTS) for _ in range(ROWS)])
    inputs = experts + E_ROUTED * rng.integers(0, VOCAB // E_ROUTED, experts.shape)
    return inputs.astype(np.int32), rng.integers(0, VOCAB, (ROWS, LEN), dtype=np.int32)


def _step_metrics(mesh, strategy, microbatches):
    rules = jmp.rules.preset(strategy, mesh)
    model = jmp.shard_init(_RoutedLM, mesh, rules)
    step = make_step(model, optax.sgd(0.1), mesh, rules, microbatches=microbatches)
    batch = jax.device_put(_routed_batch(), step.batch_sharding)
    _, metrics = step(step.init_state(), batch)
    return {k: np.asarray(v) for k, v in metrics.items()}


@pytest.mark.parametrize(
    "spec,strategy",
    [("data=1", "dp"), ("data=8", "dp"), ("data=2,expert=4", "dp_ep")],
    ids=["one_device", "dp8", "dp_ep"],
)
def test_microbatches_report_the_step_totals_of_drops_and_load(make_mesh, spec, strategy):
    """``moe_dropped`` is the (token, choice) pairs dropped over the step's whole batch, the
    same with 2 microbatches as with 1: the capacity applies per forward (per device and
    microbatch), and every device's rows in every microbatch hold the same expert pattern, so
    each forward drops the same share. dp8 accumulates per device over its pure 'data' axis
    (one gradient reduction per step): there the counts are summed over 'data', not averaged;
    dp_ep (whose dispatch shard_map cannot nest in that region) reduces per microbatch."""
    mesh = make_mesh(spec) if spec != "data=1" else jmp.make_mesh(spec, devices=jax.devices()[:1])
    single = _step_metrics(mesh, strategy, 1)
    accumulated = _step_metrics(mesh, strategy, 2)
    # each forward of n tokens keeps ceil(1.0 * n / 4) = n / 4 of expert 0's 5n / 8: 3 per row
    assert single["moe_dropped"] == accumulated["moe_dropped"] == 3 * ROWS
    want_load = np.bincount(ROW_EXPERTS, minlength=E_ROUTED)[None] / len(ROW_EXPERTS)
    np.testing.assert_allclose(single["expert_load"], want_load, rtol=1e-6)
    np.testing.assert_allclose(accumulated["expert_load"], want_load, rtol=1e-6)
    for key in ("moe_balance_loss", "moe_z_loss", "moe_aux_loss"):  # alike in every forward
        np.testing.assert_allclose(accumulated[key], single[key], rtol=1e-5, err_msg=key)


def test_cli_trains_a_moe_gpt_and_logs_its_routing(tmp_path):
    """`jmp train --experts`: the run's metrics hold the aux losses and the expert load, the
    progress prints the load table, and validation is the cross-entropy alone (below the
    training loss with its aux terms on the same weights is not asserted: other batches)."""
    import json

    from tests.cli_util import run_jmp

    out = str(tmp_path / "run")
    args = ["train", "--model", "tiny", "--experts", "8", "--top-k", "2", "--moe-every", "2"]
    args += ["--strategy", "dp_ep", "--mesh", "data=2,expert=4", "--steps", "3", "--batch", "8"]
    args += ["--eval-every", "3", "--sample", "0", "--out", out]
    done = run_jmp(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "expert load at step 3" in done.stdout
    rows = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert row["loss"] == pytest.approx(row["ce_loss"] + row["moe_aux_loss"], rel=1e-6)
        np.testing.assert_allclose(np.sum(row["expert_load"], axis=-1), [1.0], rtol=1e-6)
    config = json.load(open(f"{out}/config.json"))["model"]
    assert (config["n_experts"], config["top_k"], config["moe_every"]) == (8, 2, 2)
    # a resume with other experts is another model: refused, naming the field
    args[args.index("--experts") + 1] = "4"
    again = run_jmp(*args, "--resume")
    assert again.returncode == 2 and "model.n_experts: 8 in the run, 4 now" in again.stderr


@pytest.mark.parametrize(
    "extra, text",
    [
        (["--top-k", "3"], "--top-k shape a mixture of experts, but --experts is 0"),
        (
            ["--expert-activation", "gelu"],
            "--expert-activation shape a mixture of experts, but --experts is 0",
        ),
        (["--experts", "6", "--strategy", "dp_ep", "--mesh", "data=2,expert=4"], "n_experts=6"),
        (["--experts", "4", "--top-k", "5"], "top_k=5 exceeds n_experts=4"),
        (["--experts", "4", "--strategy", "dp_cp", "--mesh", "data=2,context=4"], "context"),
    ],
)
def test_cli_refuses_bad_expert_options_in_one_line(tmp_path, extra, text):
    from tests.cli_util import run_jmp

    out = tmp_path / "run"
    done = run_jmp("train", "--model", "tiny", "--steps", "2", "--out", str(out), *extra)
    assert done.returncode == 2, done.stderr[-2000:]
    assert text in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not out.exists()  # refused before the run folder was made


def test_cli_inspect_shows_the_all_to_alls_over_expert():
    from tests.cli_util import run_jmp

    done = run_jmp(
        "inspect", "--model", "tiny", "--experts", "8", "--moe-every", "2", "--strategy", "ep",
        "--mesh", "expert=8", "--batch", "8", "--expert-activation", "gelu",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    cfg = GPTConfig.named("tiny", n_experts=8, moe_every=2, expert_activation="gelu")
    assert f"({cfg.num_params():,} params, {cfg.num_active_params():,} active per token)" in (
        " ".join(done.stdout.split())
    )
    rows = [line for line in done.stdout.splitlines() if "all-to-all" in line]
    assert rows and all("expert" in line for line in rows), done.stdout
