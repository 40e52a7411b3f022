"""Packed attention: the loss of a packed batch equals the per-document losses computed apart.

Documents packed by :func:`jmp.train.data.packing.pack` (segment ids, positions restarting per
document, a loss mask) go through :func:`jmp.train.next_token_loss` into jmp's GPT and Llama.
The reference runs each document alone, as its own batch, and takes the cross-entropy of its
logits with NumPy: if attention leaked across a boundary, or positions did not restart, the
packed loss would differ (the control without segment ids shows it does).
"""

import jax
import numpy as np
import pytest
from flax import nnx

import jmp
from jmp.models import GPT, GPTConfig, Llama, LlamaConfig
from jmp.train import next_token_loss
from jmp.train.data.packing import Layout, pack

SEQ = 64
# four documents that fill row 0 exactly (20 + 30 + 14) and half of row 1 (40): none is cut
LENGTHS = (20, 30, 14, 40)


def _documents(vocab: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, vocab, n).astype(np.int32) for n in LENGTHS]


def _packed(docs: list[np.ndarray]) -> dict:
    offsets = np.cumsum([0, *map(len, docs)])
    layout = Layout.of(offsets, order=np.arange(len(docs)))
    return pack(np.concatenate(docs), layout, np.array([0, 1]), seq_len=SEQ)


def _nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    log_z = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    return log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]


MODELS = {
    "gpt": (lambda rngs: GPT(GPTConfig.named("tiny"), rngs=rngs), 256),
    "llama": (lambda rngs: Llama(LlamaConfig.named("tiny"), rngs=rngs), None),
}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("strategy, spec", [("dp", "data=1"), ("dp_tp", "data=2,model=4")])
def test_packed_loss_equals_the_documents_apart(make_mesh, name, strategy, spec):
    make, vocab = MODELS[name]
    mesh = make_mesh(spec) if spec != "data=1" else jmp.make_mesh(spec, devices=jax.devices()[:1])
    rules = jmp.rules.preset(strategy, mesh)
    model = jmp.shard_init(make, mesh, rules)
    vocab = vocab or model.cfg.vocab_size
    docs = _documents(vocab)
    batch = _packed(docs)
    assert batch["segment_ids"][0].max() == 3 and batch["loss_mask"].sum() == sum(LENGTHS) - 4

    @jax.jit
    def loss(b):
        with jmp.activate(mesh, rules):
            return next_token_loss(model, b)

    @jax.jit
    def logits(tokens):
        with jmp.activate(mesh, rules):
            return model(tokens)

    with jax.set_mesh(mesh):
        packed = float(loss(batch))
        leaky = float(loss({k: batch[k] for k in ("inputs", "targets", "loss_mask")}))
        total = sum(_nll(np.asarray(logits(doc[None, :-1])), doc[None, 1:]).sum() for doc in docs)
    expected = total / (sum(LENGTHS) - len(LENGTHS))
    assert packed == pytest.approx(expected, rel=1e-5)
    assert abs(leaky - expected) > 1e-3  # without segments, attention crosses documents


def test_a_pipelined_gpt_refuses_packed_batches():
    from jmp.pipeline import PipelinedGPT

    model = PipelinedGPT(GPTConfig.named("tiny"), num_stages=2, rngs=nnx.Rngs(0))
    with pytest.raises(jmp.ConfigError, match="packed batches .* not supported under pp_"):
        model.embed_inputs(_packed(_documents(256)))
