"""The MoE layer equals a NumPy loop over tokens and their chosen experts; expert parallelism
equals one device, with one dispatch and one combine all-to-all per forward.

The reference is written from the definitions, not from jmp's code: for each token, a softmax
over the router logits, its ``k`` best experts (weights renormalized or not), the weighted sum of
those experts' SwiGLU (or tanh-GELU) outputs, computed one token and one expert at a time in
float64; its gradients are derived by hand (SwiGLU, GELU, the weights' renormalization, the
softmax) in the same loop. The auxiliary losses are checked against their formulas on
routings made by hand.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jmp
from jmp.inspect import collectives, summary
from jmp.layers.moe import MoE, captured_aux
from tests.helpers import forward_and_grads, value

B, T, D, F, E = 8, 4, 16, 8, 8
NAMES = dict.fromkeys(jmp.rules.LOGICAL_NAMES, None)


def _random(seed, shape, scale=1.0):
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


def ep_rules(batch=("data", "expert"), expert="expert"):
    """What an ``ep`` kind would add: experts over 'expert', tokens over data and expert."""
    return jmp.Rules({**NAMES, "expert": expert}, {**NAMES, "batch": batch})


# --- the NumPy reference: a loop over tokens and their chosen experts ------------------------


def _silu(a):
    return a / (1 + np.exp(-a))


def _swiglu_and_back(x, gate, up, down, g):
    """One token through one SwiGLU expert, and the backward of ``g . out`` (all float64)."""
    a, b = x @ gate, x @ up
    s = 1 / (1 + np.exp(-a))
    h = a * s * b
    out = h @ down
    dh = down @ g
    da, db = dh * b * (s * (1 + a * (1 - s))), dh * a * s
    grads = {"gate": np.outer(x, da), "up": np.outer(x, db), "down": np.outer(h, g)}
    return out, grads, gate @ da + up @ db


def _gelu_and_back(x, up, down, g):
    """One token through one GELU expert ``down(gelu(x @ up))``, GELU's tanh form (GPT-2's)."""
    a = x @ up
    c = np.sqrt(2 / np.pi)
    t = np.tanh(c * (a + 0.044715 * a**3))
    h = 0.5 * a * (1 + t)
    out = h @ down
    da = (down @ g) * (0.5 * (1 + t) + 0.5 * a * (1 - t**2) * c * (1 + 3 * 0.044715 * a**2))
    return out, {"up": np.outer(x, da), "down": np.outer(h, g)}, up @ da


KERNELS = {"swiglu": ("gate", "up", "down"), "gelu": ("up", "down")}


def _expert_and_back(activation, x, kernels, g):
    """``kernels``: the expert's matrices by name (KERNELS[activation])."""
    if activation == "swiglu":
        return _swiglu_and_back(x, kernels["gate"], kernels["up"], kernels["down"], g)
    return _gelu_and_back(x, kernels["up"], kernels["down"], g)


def np_moe(x, p, probe, *, top_k, normalize=True, activation="swiglu"):
    """Output and gradients of ``sum(y * probe)`` for the parameters ``p`` and the input."""
    names = KERNELS[activation]
    x, probe = x.reshape(-1, x.shape[-1]).astype(np.float64), probe.reshape(-1, x.shape[-1])
    y, dx = np.zeros_like(x), np.zeros_like(x)
    grads = {n: np.zeros_like(v) for n, v in p.items()}
    for t in range(len(x)):
        z = x[t] @ p["router"]
        prob = np.exp(z - z.max())
        prob /= prob.sum()
        chosen = sorted(range(len(prob)), key=lambda e: -prob[e])[:top_k]
        total = sum(prob[e] for e in chosen) if normalize else 1.0
        dprob = np.zeros_like(prob)
        dweight = {}
        for e in chosen:
            w = prob[e] / total
            expert = {n: p[n][e] for n in names}
            out, g_e, dx_e = _expert_and_back(activation, x[t], expert, w * probe[t])
            y[t] += w * out
            dx[t] += dx_e
            for n in names:
                grads[n][e] += g_e[n]
            dweight[e] = probe[t] @ out
        for e in chosen:  # through w_e = prob_e / total
            dprob[e] = dweight[e] / total
            if normalize:
                dprob[e] -= sum(dweight[i] * prob[i] for i in chosen) / total**2
        dz = prob * (dprob - dprob @ prob)
        grads["router"] += np.outer(x[t], dz)
        dx[t] += p["router"] @ dz
        if "shared_down" in p:
            shared = {n: p["shared_" + n] for n in names}
            out, g_s, dx_s = _expert_and_back(activation, x[t], shared, probe[t])
            y[t] += out
            dx[t] += dx_s
            for n in names:
                grads["shared_" + n] += g_s[n]
    return y, grads, dx


def _params(moe):
    names = KERNELS[moe.activation]
    p = {n: value(getattr(moe, n)).astype(np.float64) for n in ("router", *names)}
    if moe.shared is not None:
        for n in names:
            p["shared_" + n] = value(getattr(moe.shared, n).kernel).astype(np.float64)
    return p


def _grads_like_params(state_grads, moe):
    names = KERNELS[moe.activation]
    g = {n: value(state_grads[n]) for n in ("router", *names)}
    if moe.shared is not None:
        for n in names:
            g["shared_" + n] = value(state_grads["shared"][n]["kernel"])
    # every gradient is one of these: nothing of the layer is left out of the comparison
    assert len(jax.tree.leaves(state_grads)) == len(g)
    return g


def _grad_fn(moe):
    graphdef, state = nnx.split(moe)

    def loss(state, x, probe):
        return (nnx.merge(graphdef, state)(x) * probe).sum()

    return state, jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


CASES = {  # name: MoE options
    "top1": dict(top_k=1, normalize_weights=False),  # Switch: the raw probability
    "top2": dict(top_k=2),
    "top2_shared": dict(top_k=2, n_shared_experts=2),
    "gelu_top2_shared": dict(top_k=2, n_shared_experts=2, activation="gelu"),
}


def _reference(moe, x, probe, opts):
    """The NumPy loop's output, parameter gradients and input gradient for ``moe``'s values."""
    return np_moe(
        x,
        _params(moe),
        probe,
        top_k=opts["top_k"],
        normalize=opts.get("normalize_weights", True),
        activation=opts.get("activation", "swiglu"),
    )


def _assert_equals_reference(y, grads, dx, moe, want):
    want_y, want_g, want_dx = want
    np.testing.assert_allclose(np.asarray(y).reshape(-1, D), want_y, rtol=1e-5, atol=1e-5)
    got = _grads_like_params(grads, moe)
    assert set(got) == set(want_g)
    for n, w in want_g.items():
        np.testing.assert_allclose(got[n], w, rtol=1e-5, atol=1e-5, err_msg=n)
        assert np.abs(w).max() > 1e-3, n  # every parameter is really exercised
    np.testing.assert_allclose(np.asarray(dx).reshape(-1, D), want_dx, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_moe_equals_numpy_loop_over_tokens_and_experts(case):
    opts = CASES[case]
    moe = MoE(D, F, n_experts=E, rngs=nnx.Rngs(1), **opts)
    x, probe = _random(2, (B, T, D)), _random(3, (B, T, D))
    state, grad = _grad_fn(moe)
    (_, (g, dx)), y = grad(state, jnp.asarray(x), probe), moe(jnp.asarray(x))
    _assert_equals_reference(y, g, dx, moe, _reference(moe, x, probe, opts))


# --- auxiliary losses and capacity on routings made by hand ----------------------------------


def _hand_routed(logits, **opts):
    """A MoE whose router logits are exactly ``logits``: features = experts, router = I."""
    n_experts = logits.shape[-1]
    moe = MoE(n_experts, 4, n_experts=n_experts, rngs=nnx.Rngs(0), **opts)
    moe.router[...] = jnp.eye(n_experts)
    return moe, jnp.asarray(logits[None], jnp.float32)  # one batch row of len(logits) tokens


def test_aux_losses_equal_their_formulas_on_a_hand_made_routing():
    # 4 tokens, 4 experts, top-1: tokens choose experts 0, 0, 1, 3 (by construction)
    logits = np.array(
        [[3.0, 1, 0, 0], [2.0, 0, 1, 0], [0, 2.5, 0, 1.0], [0.5, 0, 0, 4.0]], np.float32
    )
    moe, x = _hand_routed(logits, top_k=1, aux_loss_weight=0.1, z_loss_weight=0.01)
    _, aux = moe(x, return_aux=True)
    f = np.array([2, 1, 0, 1]) / 4  # fraction of tokens per expert
    prob = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    balance = 4 * np.sum(f * prob.mean(0))  # Switch Transformer, eq. (4)
    z = np.mean(np.log(np.exp(logits).sum(-1)) ** 2)  # ST-MoE, eq. (5)
    np.testing.assert_allclose(np.asarray(aux.expert_load), f, rtol=1e-6)
    np.testing.assert_allclose(float(aux.load_balancing_loss), balance, rtol=1e-5)
    np.testing.assert_allclose(float(aux.z_loss), z, rtol=1e-5)
    np.testing.assert_allclose(float(aux.loss), 0.1 * balance + 0.01 * z, rtol=1e-5)
    # top-2: pairs (0,1) (0,2) (1,3) (3,0): each expert's share of the 8 (token, choice) pairs
    moe2, _ = _hand_routed(logits, top_k=2)
    _, aux2 = moe2(x, return_aux=True)
    f2 = np.array([3, 2, 1, 2]) / 8
    np.testing.assert_allclose(np.asarray(aux2.expert_load), f2, rtol=1e-6)
    np.testing.assert_allclose(float(aux2.load_balancing_loss), 4 * np.sum(f2 * prob.mean(0)), 1e-5)
    # perfectly balanced routing: the loss is 1 (its minimum)
    even, xe = _hand_routed(np.eye(4, dtype=np.float32) * 5, top_k=1)
    assert float(even(xe, return_aux=True)[1].load_balancing_loss) == pytest.approx(1.0, rel=1e-6)


def test_capacity_drops_the_later_tokens_and_counts_them():
    # 8 tokens, top-1 over 4 experts: 5 want expert 0, 2 expert 1, 1 expert 2
    choice = [0, 0, 1, 0, 2, 0, 1, 0]
    logits = np.eye(4, dtype=np.float32)[choice] * 4
    dense, x = _hand_routed(logits, top_k=1)
    capped, _ = _hand_routed(logits, top_k=1, capacity_factor=1.0)  # C = ceil(8 / 4) = 2
    for n in ("gate", "up", "down"):
        getattr(capped, n)[...] = getattr(dense, n)[...]
    want = np.asarray(dense(x))[0]
    y, aux = capped(x, return_aux=True)
    y = np.asarray(y)[0]
    kept = [0, 1, 2, 4, 6]  # expert 0 keeps its first 2 tokens (0, 1); 3, 5, 7 are dropped
    assert int(aux.dropped) == 3
    np.testing.assert_allclose(y[kept], want[kept], rtol=1e-6, atol=1e-7)
    assert np.all(y[[3, 5, 7]] == 0) and np.all(np.abs(want[[3, 5, 7]]) > 0)


def test_capacity_serves_first_choices_before_second_choices():
    # top-2 over 4 experts, 4 tokens; capacity 1.0 -> C = ceil(4 * 2 / 4) = 2 per expert.
    # first choices: 0, 0, 1, 2; second choices: 1, 1, 0, 0. Expert 0 gets first choices of
    # tokens 0, 1 (full), so the second choices of tokens 2 and 3 for it are dropped; expert 1
    # takes token 2's first choice, then token 0's second; token 1's second is dropped.
    logits = np.array([[3.0, 2, 0, 0], [3.0, 2, 0, 0], [2.0, 3, 0, 0], [2.0, 0, 3, 0]], np.float32)
    capped, x = _hand_routed(logits, top_k=2, capacity_factor=1.0)
    y, aux = capped(x, return_aux=True)
    assert int(aux.dropped) == 3
    kept = {0: (0, 1), 1: (0,), 2: (1,), 3: (2,)}  # token-major order would drop token 2's best
    p = _params(capped)
    prob = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    for t, experts in kept.items():
        top2 = np.sort(prob[t])[-2:].sum()  # a drop does not renormalize the survivors
        want = sum(
            prob[t, e]
            / top2
            * _swiglu_and_back(logits[t], p["gate"][e], p["up"][e], p["down"][e], np.zeros(4))[0]
            for e in experts
        )
        np.testing.assert_allclose(np.asarray(y)[0, t], want, rtol=1e-5, atol=1e-6)


def _loss_and_drops(moe, x, probe):
    y, aux = moe(x, return_aux=True)
    return float((np.asarray(y, np.float64) * probe).sum()), int(aux.dropped)


def test_dropless_loss_does_not_change_once_the_capacity_is_high_enough():
    x, probe = jnp.asarray(_random(2, (B, T, D))), _random(3, (B, T, D))
    losses = {}
    for factor in (None, 0.5, 1.0, E / 2, 2 * E):  # E / top_k: room for every token
        moe = MoE(D, F, n_experts=E, top_k=2, capacity_factor=factor, rngs=nnx.Rngs(1))
        losses[factor] = _loss_and_drops(moe, x, probe)
    assert losses[None][1] == 0 and losses[0.5][1] > losses[1.0][1] > 0
    assert losses[0.5][0] != pytest.approx(losses[None][0], rel=1e-4)  # drops change the loss
    for factor in (E / 2, 2 * E):
        assert losses[factor][1] == 0
        assert losses[factor][0] == pytest.approx(losses[None][0], rel=1e-5)


# --- expert parallelism ----------------------------------------------------------------------


def _all_to_alls(compiled, mesh):
    """Mesh axes of each all-to-all instruction (XLA:CPU writes one as a tuple of per-peer
    operands, which jmp.inspect reports one by one: count instructions instead)."""
    lines = [
        line
        for line in compiled.as_text().splitlines()
        if " all-to-all(" in line or " all-to-all-start(" in line
    ]
    return [collectives(line, mesh)[0].axes for line in lines]


def _make(**opts):
    return lambda r: MoE(D, F, n_experts=E, top_k=2, n_shared_experts=1, rngs=r, **opts)


@pytest.fixture(scope="module")
def one_device():
    """The unsharded layer's output and gradients (the reference for every mesh)."""
    moe = _make()(nnx.Rngs(0))
    x, probe = _random(2, (B, T, D)), _random(3, (B, T, D))
    state, grad = _grad_fn(moe)
    _, (g, dx) = grad(state, jnp.asarray(x), probe)
    return x, probe, np.asarray(moe(jnp.asarray(x))), _grads_like_params(g, moe), np.asarray(dx)


EP_MESHES = {  # id: (mesh, rules, all-to-alls in the forward)
    "ep2_dp4": ("data=4,expert=2", ep_rules(), 2),
    "ep4_dp2": ("data=2,expert=4", ep_rules(), 2),
    "ep8": ("expert=8", ep_rules(batch="expert"), 2),
    "ep4_fsdp2": (  # experts' embed dim also split over 'data' at rest (gathered to compute)
        "data=2,expert=4",
        jmp.Rules({**NAMES, "expert": "expert", "embed": "data"}, ep_rules().activations),
        2,
    ),
    "ep4_tp2": (  # each expert's hidden dim split over 'model' (Megatron inside each expert)
        "expert=4,model=2",
        jmp.Rules(
            {**NAMES, "expert": "expert", "mlp": "model"},
            {**NAMES, "batch": "expert", "mlp": "model"},
        ),
        2,
    ),
    "dp8": ("data=8", ep_rules(batch="data", expert=None), 0),  # replicated experts: no a2a
}


@pytest.mark.parametrize("spec,rules,a2a", EP_MESHES.values(), ids=EP_MESHES.keys())
def test_expert_parallel_equals_one_device_with_one_dispatch_and_one_combine(
    make_mesh, one_device, spec, rules, a2a
):
    mesh = make_mesh(spec)
    x, probe, want_y, want_g, want_dx = one_device
    moe = jmp.shard_init(_make(), mesh, rules)
    n_ep = mesh.shape.get("expert", 1)
    assert moe.gate[...].addressable_shards[0].data.shape[0] == E // n_ep  # experts split
    batch_axes = rules.activations_dict["batch"]
    xs = jax.device_put(x, NamedSharding(mesh, P(batch_axes)))
    y, grads, dx, fwd, grad = forward_and_grads(moe, mesh, rules, xs, probe)
    np.testing.assert_allclose(np.asarray(y), want_y, rtol=1e-5, atol=1e-5)
    got = _grads_like_params(grads, moe)
    for n, want in want_g.items():
        np.testing.assert_allclose(got[n], want, rtol=1e-5, atol=1e-5, err_msg=n)
    np.testing.assert_allclose(np.asarray(dx), want_dx, rtol=1e-5, atol=1e-5)
    assert _all_to_alls(fwd, mesh) == [("expert",)] * a2a, summary(collectives(fwd, mesh))
    # the backward sends the gradients back the same two ways
    assert _all_to_alls(grad, mesh) == [("expert",)] * (2 * a2a)


def test_gelu_experts_under_expert_parallelism_equal_the_numpy_loop(make_mesh):
    """GELU experts split over 'expert' (the slot buffers and the two all-to-alls) equal the
    loop over tokens; the parameters are the router, up and down (no gate), and the shared
    experts' up and down kernels (no biases)."""
    mesh, rules = make_mesh("data=2,expert=4"), ep_rules()
    opts = CASES["gelu_top2_shared"]
    moe = jmp.shard_init(lambda r: MoE(D, F, n_experts=E, rngs=r, **opts), mesh, rules)
    assert moe.gate is None and moe.up[...].addressable_shards[0].data.shape[0] == E // 4
    paths = {".".join(map(str, k)) for k, _ in nnx.to_flat_state(nnx.state(moe, nnx.Param))}
    assert paths == {"router", "up", "down", "shared.up.kernel", "shared.down.kernel"}, paths
    x, probe = _random(2, (B, T, D)), _random(3, (B, T, D))
    xs = jax.device_put(x, NamedSharding(mesh, P(("data", "expert"))))
    y, grads, dx, fwd, _ = forward_and_grads(moe, mesh, rules, xs, probe)
    _assert_equals_reference(y, grads, dx, moe, _reference(moe, x, probe, opts))
    assert _all_to_alls(fwd, mesh) == [("expert",)] * 2


def test_expert_parallel_capacity_high_enough_is_dropless(make_mesh, one_device):
    mesh, rules = make_mesh("data=2,expert=4"), ep_rules()
    x, probe, want_y, *_ = one_device
    moe = jmp.shard_init(_make(capacity_factor=E / 2), mesh, rules)
    xs = jax.device_put(x, NamedSharding(mesh, P(("data", "expert"))))
    with jmp.activate(mesh, rules):
        y, aux = jax.jit(lambda m, x: m(x, return_aux=True))(moe, xs)
    assert int(aux.dropped) == 0
    np.testing.assert_allclose(np.asarray(y), want_y, rtol=1e-5, atol=1e-5)


# --- a tiny model trained with AdamW: expert parallel equals one device ----------------------

VOCAB = 32


class TinyMoELM(nnx.Module):
    """Embedding, one residual MoE block, output head; its loss adds the layer's aux loss."""

    def __init__(self, rngs):
        init = nnx.initializers.normal(0.5)
        self.embed = jmp.layers.named_param(init(rngs.params(), (VOCAB, D)), ("vocab", "embed"))
        self.moe = MoE(
            D, F, n_experts=E, top_k=2, aux_loss_weight=0.1, z_loss_weight=0.01, rngs=rngs
        )
        self.head = jmp.layers.named_param(init(rngs.params(), (D, VOCAB)), ("embed", "vocab"))

    def __call__(self, tokens):
        h = self.embed[...][tokens]
        return (h + self.moe(h)) @ self.head[...]


def _train(mesh, rules, steps=3):
    """Losses and final parameters of AdamW steps; unsharded when ``mesh`` is None."""
    make = TinyMoELM
    model = make(nnx.Rngs(0)) if mesh is None else jmp.shard_init(make, mesh, rules)
    graphdef, params = nnx.split(model)
    tx = optax.adamw(1e-2)
    tokens = np.random.default_rng(4).integers(0, VOCAB, (B, T + 1))

    def loss_fn(params, batch):
        logits, found = nnx.capture(nnx.merge(graphdef, params), nnx.Intermediate)(batch[:, :-1])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
        aux = captured_aux(found)
        assert len(aux) == 1  # the layer's losses reach the training loss
        return ce + aux[0].loss

    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state, run, losses = tx.init(params), jax.jit(step), []
    if mesh is None:
        context, batch = contextlib.nullcontext(), jnp.asarray(tokens)
    else:  # traced (at the first call) with the mesh and rules active
        context = jmp.activate(mesh, rules)
        batch = jax.device_put(tokens, NamedSharding(mesh, P(rules.activations_dict["batch"])))
    with context:
        for _ in range(steps):
            params, opt_state, loss = run(params, opt_state, batch)
            losses.append(float(loss))
    return losses, jax.tree.map(np.asarray, params)


@pytest.fixture(scope="module")
def trained_on_one_device():
    return _train(None, None)


@pytest.mark.parametrize("spec", ["data=2,expert=4", "expert=8"])
def test_adamw_steps_of_a_tiny_moe_model_equal_one_device(make_mesh, trained_on_one_device, spec):
    want_losses, want = trained_on_one_device
    assert want_losses[-1] < want_losses[0]  # it trains
    mesh = make_mesh(spec)
    losses, got = _train(mesh, ep_rules(batch=("data", "expert") if "data" in spec else "expert"))
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))


# --- bad input: one line each ----------------------------------------------------------------


def _one_line_error(fn, text):
    with pytest.raises(jmp.ConfigError) as err:
        fn()
    assert text in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert "Fix" in str(err.value) or "must" in str(err.value) or "choose" in str(err.value)


@pytest.mark.parametrize(
    "opts,text",
    [
        (dict(n_experts=4, top_k=5), "top_k=5 exceeds n_experts=4"),
        (dict(n_experts=4, top_k=0), "top_k=0 must be an int >= 1"),
        (dict(n_experts=4, capacity_factor=0.0), "capacity_factor=0.0 must be None or"),
        (dict(n_experts=4, n_shared_experts=-1), "n_shared_experts=-1 must be an int >= 0"),
        (dict(n_experts=4, activation="relu"), "activation='relu' must be one of ('swiglu',"),
    ],
)
def test_bad_moe_options_are_refused(opts, text):
    _one_line_error(lambda: MoE(D, F, rngs=nnx.Rngs(0), **opts), text)


def test_experts_the_expert_axis_does_not_divide_are_refused(make_mesh):
    mesh = make_mesh("data=2,expert=4")
    _one_line_error(
        lambda: jmp.shard_init(lambda r: MoE(D, F, n_experts=6, rngs=r), mesh, ep_rules()),
        "n_experts=6 is not divisible by mesh axis 'expert' of size 4",
    )


def test_tokens_not_split_over_the_expert_axis_are_refused(make_mesh):
    mesh = make_mesh("data=2,expert=4")
    moe = MoE(D, F, n_experts=E, rngs=nnx.Rngs(0))
    with jmp.activate(mesh, ep_rules(batch="data")):
        _one_line_error(lambda: moe(jnp.ones((B, T, D))), "needs the tokens split over it too")
