"""Remat policies (jmp.layers.remat): each gives the loss and gradients of keeping everything.

The reference is the same model with ``remat='none'`` (nothing recomputed): a policy only
changes what the backward pass recomputes, never a number beyond float rounding.
"""

import jax
import numpy as np
import pytest
from flax import nnx

from jmp.errors import ConfigError
from jmp.models import GPT, GPTConfig, Llama, LlamaConfig
from jmp.strategies import REMAT_POLICIES
from jmp.train.step import next_token_loss

SIZES = dict(vocab_size=64, seq_len=16, d_model=32, n_layers=2, n_heads=4)
MODELS = {
    "gpt": lambda remat: GPT(GPTConfig(**SIZES, remat=remat), rngs=nnx.Rngs(0)),
    "llama": lambda remat: Llama(
        LlamaConfig(**SIZES, n_kv_heads=2, d_ff=48, remat=remat), rngs=nnx.Rngs(0)
    ),
}
TOKENS = np.random.default_rng(0).integers(0, 64, (4, 17), dtype=np.int32)
BATCH = (TOKENS[:, :-1], TOKENS[:, 1:])


def _loss_and_grads(name, remat):
    graphdef, params = nnx.split(MODELS[name](remat))
    grad_fn = jax.jit(jax.value_and_grad(lambda p: next_token_loss(nnx.merge(graphdef, p), BATCH)))
    return grad_fn(params), grad_fn.lower(params).compile()


@pytest.fixture(scope="module")
def kept_everything():
    return {name: _loss_and_grads(name, "none") for name in MODELS}


@pytest.mark.parametrize("policy", [p for p in REMAT_POLICIES if p != "none"])
@pytest.mark.parametrize("name", list(MODELS))
def test_policy_gives_the_same_loss_and_gradients(kept_everything, name, policy):
    (loss, grads), _ = _loss_and_grads(name, policy)
    (ref_loss, ref_grads), _ = kept_everything[name]
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for (path, g), r in zip(
        jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads), strict=True
    ):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("name", list(MODELS))
def test_a_policy_is_applied(name):
    """The backward pass of every policy but 'none' holds a checkpoint (remat) region."""
    for policy in REMAT_POLICIES:
        graphdef, params = nnx.split(MODELS[name](policy))

        def loss(p, graphdef=graphdef):
            return next_token_loss(nnx.merge(graphdef, p), BATCH)

        jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
        assert ("remat" in jaxpr or "checkpoint" in jaxpr) == (policy != "none"), policy


def test_full_remat_keeps_fewer_temporaries_for_the_scanned_llama(kept_everything):
    _, full = _loss_and_grads("llama", "full")
    _, none = kept_everything["llama"]
    assert full.memory_analysis().temp_size_in_bytes < none.memory_analysis().temp_size_in_bytes


def test_old_and_new_spellings_are_one_config():
    assert GPTConfig(remat=True) == GPTConfig(remat="full")
    assert LlamaConfig(remat=False) == LlamaConfig(remat="none")
    assert GPTConfig(remat="dots").to_dict()["remat"] == "dots"
    with pytest.raises(ConfigError, match=r"remat='some' must be True, False or one of"):
        LlamaConfig(remat="some")


@pytest.mark.parametrize("name", list(MODELS))
def test_a_mixture_of_experts_under_remat_keeps_its_losses(name):
    """The MoE's aux losses leave the recomputed block (GPT: sown; Llama: the scan's output)."""
    experts = dict(n_experts=4, moe_every=2 if name == "gpt" else 1)
    cfgs = {
        "gpt": lambda remat: GPTConfig(**SIZES, **experts, remat=remat),
        "llama": lambda remat: LlamaConfig(**SIZES, n_kv_heads=2, d_ff=48, **experts, remat=remat),
    }
    cls = GPT if name == "gpt" else Llama
    results = []
    for remat in ("none", "full"):
        graphdef, params = nnx.split(cls(cfgs[name](remat), rngs=nnx.Rngs(0)))

        def loss(p, graphdef=graphdef):
            return next_token_loss(nnx.merge(graphdef, p), BATCH)

        results.append(jax.value_and_grad(loss, has_aux=True)(params))
    ((loss_full, metrics), grads), ((loss_none, ref_metrics), ref_grads) = results[1], results[0]
    np.testing.assert_allclose(loss_full, loss_none, rtol=1e-6)
    assert float(ref_metrics["moe_aux_loss"]) > 0
    np.testing.assert_allclose(metrics["moe_aux_loss"], ref_metrics["moe_aux_loss"], rtol=1e-6)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7)
