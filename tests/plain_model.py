"""A model written with plain Flax NNX only (no jmp.layers): a patch classifier on dict batches.

It is what a researcher brings: ``nnx.Linear`` / ``nnx.LayerNorm`` whose parameters carry
logical names through ``nnx.with_partitioning``, a residual MLP block repeated ``layers`` times,
and a batch that is a dict ``{"patches": (B, P, patch_dim) float32, "label": (B,) int32}``.
With ``num_stages`` the blocks are stacked for the pipeline (``jmp.pipeline.stack_blocks``);
the same seed gives the same values either way (blocks are created in the same order).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jmp

PATCHES, PATCH_DIM, D, HIDDEN, LAYERS, CLASSES = 4, 12, 16, 32, 4, 8


LECUN = nnx.initializers.lecun_normal()


def _init(names, base=LECUN):
    return nnx.with_partitioning(base, names)


class Block(nnx.Module):
    """x + W2 gelu(W1 norm(x)): a pre-norm residual MLP."""

    def __init__(self, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(
            D,
            scale_init=_init(("embed",), nnx.initializers.ones),
            bias_init=_init(("embed",), nnx.initializers.zeros),
            rngs=rngs,
        )
        self.up = nnx.Linear(
            D,
            HIDDEN,
            kernel_init=_init(("embed", "mlp")),
            bias_init=_init(("mlp",), nnx.initializers.zeros),
            rngs=rngs,
        )
        self.down = nnx.Linear(
            HIDDEN,
            D,
            kernel_init=_init(("mlp", "embed")),
            bias_init=_init(("embed",), nnx.initializers.zeros),
            rngs=rngs,
        )

    def __call__(self, x):
        return x + self.down(nnx.gelu(self.up(self.norm(x))))


class PatchClassifier(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, *, num_stages: int | None = None):
        self.embed = nnx.Linear(
            PATCH_DIM,
            D,
            kernel_init=_init((None, "embed")),
            bias_init=_init(("embed",), nnx.initializers.zeros),
            rngs=rngs,
        )
        if num_stages is None:
            self.blocks = nnx.List([Block(rngs) for _ in range(LAYERS)])
        else:
            self.blocks = jmp.pipeline.stack_blocks(
                Block, num_layers=LAYERS, num_stages=num_stages, rngs=rngs
            )
        self.stacked = num_stages is not None
        self.head = nnx.Linear(
            D,
            CLASSES,
            kernel_init=_init(("embed", "vocab")),
            bias_init=_init(("vocab",), nnx.initializers.zeros),
            rngs=rngs,
        )

    # the pipeline's view (jmp.pipeline.Pipelinable): first stage, blocks, last stage
    def embed_inputs(self, batch):
        return self.embed(batch["patches"])

    def head_loss(self, x, batch):
        logits = self.head(x.mean(axis=1)).astype(jnp.float32)
        # One-hot, not optax's integer-label gather: under pp_dp_tp the logits are split over
        # 'model' inside the stage shard_map, and XLA 0.10.2's SPMD partitioner aborts on that
        # gather (a CHECK failure in ExpandDeviceGroupsWithIota). Outside a pipeline both work.
        labels = jax.nn.one_hot(batch["label"], CLASSES, dtype=logits.dtype)
        return optax.softmax_cross_entropy(logits, labels).mean()

    def features(self, batch):
        x = self.embed_inputs(batch)
        if self.stacked:
            return jmp.pipeline.run_stack(self.blocks, x)
        for block in self.blocks:
            x = block(x)
        return x


def loss_fn(model, batch):
    return model.head_loss(model.features(batch), batch)


def batch(k: int, rows: int = 16) -> dict:
    """Batch k: a pure function of k (what makes resume exact). The label is learnable."""
    rng = np.random.default_rng(k)
    patches = rng.normal(size=(rows, PATCHES, PATCH_DIM)).astype(np.float32)
    label = (patches[:, :, 0].sum(1) > 0).astype(np.int32) + 2 * (patches[:, 0, 1] > 0)
    return {"patches": patches, "label": label.astype(np.int32)}


def unstack(state):
    """A stacked model's parameters in the plain model's layout (blocks/0, blocks/1, ...)."""
    state = nnx.State(dict(state))
    flat = dict(state)
    flat["blocks"] = dict(enumerate(jmp.pipeline.unstack_states(state["blocks"])))
    return nnx.State(flat)


def leaves_by_path(state) -> dict:
    """{path: np.ndarray} for comparing states of different layouts."""
    return {
        jax.tree_util.keystr(p): np.asarray(v)
        for p, v in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(state))
    }
