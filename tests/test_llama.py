"""jmp.models.Llama: every strategy equals one device, Megatron's count, packing, depth, configs.

Training a few steps under dp, fsdp, tp, fsdp_tp (also with a model axis larger than the kv
heads, whose k/v weights are then replicated, and in manual mode) and pp_dp gives the losses and
parameters of the same training on one device. The compiled forward of a tensor-parallel model
has 2 all-reduces over 'model' in the scanned block body, whatever the depth; the compiled step
of a 32-layer model is no larger than that of a 4-layer one. Hugging Face's implementation is
the oracle of jmp.hf's tests (tests/test_hf.py), which load its weights into this model.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jmp
from jmp.inspect import collectives, summary
from jmp.models.llama import LLAMA_SIZES, Llama, LlamaConfig
from jmp.train import next_token_loss
from tests.plain_model import leaves_by_path

CFG = LlamaConfig.named("tiny", qkv_bias=True)  # 8 heads, 2 kv heads, d_model 64, 2 layers
STEPS, ROWS, SEQ = 3, 8, 32


def batch(k: int) -> tuple[np.ndarray, np.ndarray]:
    """Batch k (a pure function of k): counting sequences, the target is the next token."""
    start = np.random.default_rng(k).integers(0, CFG.vocab_size, (ROWS, 1))
    tokens = (start + np.arange(SEQ + 1)) % CFG.vocab_size
    return tokens[:, :-1].astype(np.int32), tokens[:, 1:].astype(np.int32)


def _fit(mesh, rules, cfg=CFG, stages=1):
    loss = (
        jmp.pipeline.make_loss_fn(mesh=mesh, num_microbatches=2, schedule="1f1b")
        if stages > 1
        else next_token_loss
    )
    return jmp.fit(
        lambda r: Llama(cfg, rngs=r, num_stages=stages, mesh=mesh, rules=rules),
        loss,
        batch,
        mesh=mesh,
        rules=rules,
        optimizer=optax.sgd(0.5),  # linear in the gradients: float noise is not amplified
        steps=STEPS,
        progress=False,
    )


_REFERENCE: dict = {}


def reference():
    """(losses, params) of the training on one device, computed once."""
    if not _REFERENCE:
        mesh = jmp.make_mesh("data=1", devices=jax.devices()[:1])
        result = _fit(mesh, jmp.rules.preset("dp", mesh))
        _REFERENCE["run"] = (
            [r["loss"] for r in result.history],
            leaves_by_path(result.state.params),
        )
    return _REFERENCE["run"]


STRATEGY_CASES = [
    ("dp", "data=8", {}),
    ("fsdp", "data=8", {}),
    ("tp", "model=8", {"mode": "manual"}),  # 8 > 2 kv heads: k/v replicated, shares used
    ("fsdp_tp", "data=2,model=4", {"remat": True}),  # 4 > 2 kv heads
    ("fsdp_tp", "data=4,model=2", {}),  # 2 kv heads split over 2
    ("pp_dp", "stage=2,data=4", {}),
    ("pp_dp_tp", "stage=2,data=2,model=2", {"remat": True}),
]


@pytest.mark.parametrize(
    "strategy,spec,options",
    STRATEGY_CASES,
    ids=[f"{s}-{m}" + "".join(f"-{k}={v}" for k, v in o.items()) for s, m, o in STRATEGY_CASES],
)
def test_every_strategy_equals_one_device(make_mesh, strategy, spec, options):
    mesh = make_mesh(spec)
    rules = jmp.rules.preset(strategy, mesh)
    stages = mesh.shape.get("stage", 1)
    cfg = LlamaConfig(**{**CFG.to_dict(), **options})
    result = _fit(mesh, rules, cfg, stages)
    want_losses, want_params = reference()
    losses = [r["loss"] for r in result.history]
    np.testing.assert_allclose(losses, want_losses, rtol=1e-4)
    assert losses[-1] < losses[0]  # it learns
    params = result.state.params
    got = leaves_by_path(params)
    assert got.keys() == want_params.keys()
    for path, want in want_params.items():
        have = got[path].reshape(want.shape) if stages > 1 else got[path]  # (2, 1) -> (2,)
        np.testing.assert_allclose(have, want, rtol=1e-4, atol=1e-5, err_msg=path)
    # the parameters really are split as the strategy says
    k = params["blocks"]["attn"]["k"]["kernel"].get_value()
    q = params["blocks"]["attn"]["q"]["kernel"].get_value()
    lead = (None,) * (2 if stages > 1 else 1)
    want_q = {
        "dp": (),
        "fsdp": (*lead, "data"),
        "tp": (*lead, None, "model"),
        "fsdp_tp": (*lead, "data", "model"),
        "pp_dp": ("stage",),
        "pp_dp_tp": ("stage", None, None, "model"),
    }[strategy]
    assert _spec(q, len(want_q)) == want_q
    model_ways = mesh.shape.get("model", 1)
    split = model_ways > 1 and CFG.n_kv_heads % model_ways == 0
    assert _spec(k, len(lead) + 2)[-1] == ("model" if split else None)


def _spec(array, n):
    spec = tuple(array.sharding.spec)
    return (spec + (None,) * n)[:n]


# --- the compiled program ----------------------------------------------------------------------


def _compiled_forward(cfg, mesh, rules):
    model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0), mesh=mesh, rules=rules))
    graphdef, state = nnx.split(model)
    shardings = jmp.named_shardings(state, rules, mesh)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings
    )
    tokens = jax.ShapeDtypeStruct(
        (8, SEQ),
        jnp.int32,
        sharding=jax.NamedSharding(mesh, jax.P(rules.activations_dict["batch"])),
    )

    def forward(state, tokens):
        with jmp.activate(mesh, rules):
            return nnx.merge(graphdef, state)(tokens)

    with jmp.activate(mesh, rules):
        return jax.jit(forward).lower(abstract, tokens).compile()


@pytest.mark.parametrize(
    "spec,kv_heads", [("data=2,model=4", 2), ("data=2,model=4", 4), ("data=4,model=2", 2)]
)
def test_tensor_parallel_block_keeps_megatron_count(make_mesh, spec, kv_heads):
    """2 all-reduces over 'model' in the scanned body (run n_layers times) + the embedding's."""
    mesh = make_mesh(spec)
    rules = jmp.rules.preset("dp_tp", mesh)
    cfg = LlamaConfig.named("tiny", n_layers=3, n_kv_heads=kv_heads)
    found = collectives(_compiled_forward(cfg, mesh, rules), mesh)
    over_model = [c for c in found if c.axes == ("model",)]
    assert all(c.kind == "all-reduce" for c in over_model), summary(found)
    in_body = [c for c in over_model if c.count == cfg.n_layers]  # ops in the loop: listed once
    assert len(in_body) == 2, summary(found)
    activation = 8 // mesh.shape["data"] * SEQ * cfg.d_model * 4  # rows/device x seq x d, f32
    assert [c.bytes for c in in_body] == [activation, activation]
    assert len(over_model) == 3, summary(found)  # + the vocabulary-parallel embedding, once
    # the train step: + 2 backward per block (the inputs' gradients of fused q/k/v, gate/up)
    model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0), mesh=mesh, rules=rules))
    step = jmp.train.make_step(model, optax.sgd(0.1), mesh, rules)
    compiled = step.lower(step.abstract_state(), step.abstract_batch(8, SEQ)).compile()
    found = collectives(compiled, mesh)
    in_body = [c for c in found if c.axes == ("model",) and c.count == cfg.n_layers]
    assert [c.bytes for c in in_body if c.bytes == activation] == [activation] * 4, summary(found)
    if kv_heads % mesh.shape["model"] == 0:  # split kv heads: nothing else per block
        assert len(in_body) == 4, summary(found)
    else:  # replicated k/v weights: their gradients are summed over their copies, too
        assert {c.bytes for c in in_body} - {activation}, summary(found)


def test_compiled_step_does_not_grow_with_depth(make_mesh):
    """The blocks are one scan: 4 and 32 layers compile to programs of the same size."""
    mesh = make_mesh("data=2,model=4")
    rules = jmp.rules.preset("fsdp_tp", mesh)
    sizes = {}
    for layers in (4, 32):
        cfg = LlamaConfig.named("tiny", n_layers=layers)
        model = nnx.eval_shape(lambda c=cfg: Llama(c, rngs=nnx.Rngs(0), mesh=mesh, rules=rules))
        step = jmp.train.make_step(model, optax.adam(1e-3), mesh, rules)
        text = step.lower(step.abstract_state(), step.abstract_batch(8, SEQ)).compile().as_text()
        sizes[layers] = len(text.splitlines())
    assert sizes[32] <= sizes[4] * 1.02, sizes


def test_remat_recomputes_the_scanned_blocks():
    def grad_jaxpr(remat):
        model = Llama(LlamaConfig.named("tiny", remat=remat), rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        loss = lambda s, t: nnx.merge(graphdef, s)(t).sum()  # noqa: E731
        return str(jax.make_jaxpr(jax.grad(loss))(state, jnp.zeros((1, 8), jnp.int32)))

    assert "remat" in grad_jaxpr(True) and "remat" not in grad_jaxpr(False)


# --- packing and positions ---------------------------------------------------------------------


def test_packed_documents_equal_each_document_alone(make_mesh):
    model = Llama(LlamaConfig.named("tiny", n_layers=2), rngs=nnx.Rngs(3))
    rng = np.random.default_rng(0)
    doc_a, doc_b = rng.integers(0, 256, 20), rng.integers(0, 256, 44)
    packed = jnp.asarray(np.r_[doc_a, doc_b][None])
    segments = jnp.asarray(np.r_[np.zeros(20), np.ones(44)][None].astype(np.int32))
    positions = jnp.asarray(np.r_[np.arange(20), np.arange(44)][None])
    alone_a = np.asarray(model(jnp.asarray(doc_a[None])))[0]
    alone_b = np.asarray(model(jnp.asarray(doc_b[None])))[0]

    def check(logits):
        np.testing.assert_allclose(logits[:20], alone_a, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(logits[20:], alone_b, rtol=1e-5, atol=1e-5)

    check(np.asarray(model(packed, segment_ids=segments, positions=positions))[0])
    # the same under tensor parallelism (replicated kv heads), batch split over 'data'
    mesh = make_mesh("data=2,model=4")
    rules = jmp.rules.preset("dp_tp", mesh)
    sharded = jmp.shard_init(
        lambda r: Llama(model.cfg, rngs=r, mesh=mesh, rules=rules), mesh, rules, seed=3
    )
    rows = lambda a: jnp.concatenate([a, a])  # noqa: E731  (two rows: one per data shard)
    with jmp.activate(mesh, rules):
        logits = jax.jit(lambda m, t, s, p: m(t, segment_ids=s, positions=p))(
            sharded, rows(packed), rows(segments), rows(positions)
        )
    check(np.asarray(logits)[1])
    # without the segments, the second document sees the first: the check above can fail
    mixed = np.asarray(model(packed, positions=positions))[0]
    assert np.abs(mixed[20:] - alone_b).max() > 1e-2
    with pytest.raises(jmp.ConfigError, match=r"segment_ids has shape \(1, 20\) but tokens"):
        model(packed, segment_ids=segments[:, :20])


# --- configurations ----------------------------------------------------------------------------


def _count(model) -> int:
    return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize(
    "overrides",
    [{}, {"qkv_bias": True}, {"tie_embeddings": True}, {"head_dim": 16, "n_layers": 3}],
)
def test_num_params_counts_the_built_model(overrides):
    cfg = LlamaConfig.named("tiny", **overrides)
    model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    assert cfg.num_params() == _count(model)
    assert (model.head is None) == cfg.tie_embeddings


@pytest.mark.parametrize(
    "name,published",
    # parameter counts the model cards publish (safetensors totals)
    [
        ("llama3-8b", 8_030_261_248),
        ("llama3-70b", 70_553_706_496),
        ("mistral-7b", 7_241_732_096),
        ("qwen2.5-7b", 7_615_616_512),
        ("mixtral-8x7b", 46_702_792_704),
        # the card's 14,315,784,192 less the shared experts' sigmoid gates jmp has not
        # (a 2048-vector in each of the 24 layers)
        ("qwen1.5-moe-a2.7b", 14_315_784_192 - 24 * 2048),
    ],
)
def test_published_sizes_have_their_published_parameter_counts(name, published):
    assert LlamaConfig.named(name).num_params() == published


@pytest.mark.parametrize("name,active", [("mixtral-8x7b", 12.9), ("qwen1.5-moe-a2.7b", 2.7)])
def test_moe_sizes_have_their_published_active_parameters(name, active):
    """The model cards' active parameters (billions, one decimal): "12.9B", "A2.7B"."""
    cfg = LlamaConfig.named(name)
    assert round(cfg.num_active_params() / 1e9, 1) == active
    # and the count is the built model's (abstract shapes of a 2-layer model of that width)
    small = LlamaConfig.named(name, n_layers=2, vocab_size=512)
    assert small.num_params() == _count(nnx.eval_shape(lambda: Llama(small, rngs=nnx.Rngs(0))))


def test_named_sizes_and_dict_round_trip():
    assert {"tiny", "small", "llama3-8b", "llama3-70b", "mistral-7b", "qwen2.5-7b"} <= set(
        LLAMA_SIZES
    )
    cfg = LlamaConfig.named("llama3.1-8b")
    assert cfg.rope_scaling is not None and cfg.rope_scaling.factor == 8.0
    assert LlamaConfig(**cfg.to_dict()) == cfg
    with pytest.raises(jmp.ConfigError, match="Unknown Llama size 'huge'; known: tiny, small"):
        LlamaConfig.named("huge")


def test_bad_config_lists_every_problem():
    with pytest.raises(jmp.ConfigError) as err:
        LlamaConfig(n_heads=8, n_kv_heads=3, norm_eps=0.0, sliding_window=0, dtype="int8")
    text = str(err.value)
    assert text.startswith("Invalid LlamaConfig: ")
    for part in (
        "n_kv_heads=3 must divide n_heads=8",
        "norm_eps=0.0 must be a finite number > 0",
        "sliding_window=0 must be a positive int",
        "dtype='int8' must be one of",
    ):
        assert part in text
    with pytest.raises(jmp.ConfigError, match="d_model=0 must be a positive int"):
        LlamaConfig(d_model=0)


def test_meshes_and_layouts_that_cannot_work_are_refused(make_mesh):
    # 4 query heads cannot split over a model axis of 8
    mesh = make_mesh("model=8")
    rules = jmp.rules.preset("tp", mesh)
    cfg = LlamaConfig.named("tiny", n_heads=4, n_kv_heads=2)
    with pytest.raises(jmp.ShardingError) as err:
        jmp.shard_init(lambda r: Llama(cfg, rngs=r, mesh=mesh, rules=rules), mesh, rules)
    assert "blocks/attn/q/kernel" in str(err.value)
    assert "dimension 2 ('heads', size 4) is not divisible by mesh axis 'model' of size 8" in str(
        err.value
    )
    # built outside shard_init (nothing says how it will be split), the kv heads are named for
    # splitting: on a model axis of 4 the 2 kv heads are refused, naming the fix
    mesh = make_mesh("data=2,model=4")
    rules = jmp.rules.preset("dp_tp", mesh)
    unaware = nnx.eval_shape(lambda: Llama(CFG, rngs=nnx.Rngs(0)))
    with pytest.raises(jmp.ShardingError) as err:
        jmp.sharding.partition_specs(unaware, rules, mesh)
    assert "('kv_heads', size 2) is not divisible by mesh axis 'model' of size 4" in str(err.value)
    assert "map 'kv_heads' to None" in str(err.value)
    # shard_init builds it knowing the mesh: the kv heads are replicated, as with mesh=/rules=
    built = jmp.shard_init(lambda r: Llama(CFG, rngs=r), mesh, rules)
    assert built.blocks.attn.k.kernel.get_metadata()["out_sharding"][2] is None
    # 3 layers do not split into 2 pipeline stages
    with pytest.raises(jmp.ConfigError, match="n_layers=3 is not divisible by the 2 stages"):
        Llama(LlamaConfig.named("tiny", n_layers=3), rngs=nnx.Rngs(0), num_stages=2)
    # a 2-stage model on a mesh of 4 stages
    mesh = make_mesh("stage=4,data=2")
    rules = jmp.rules.preset("pp_dp", mesh)
    with pytest.raises(jmp.ShardingError) as err:
        _fit(mesh, rules, LlamaConfig.named("tiny", n_layers=4), stages=2)
    assert "dimension 0 ('stage', size 2) is not divisible by mesh axis 'stage' of size 4" in str(
        err.value
    )
