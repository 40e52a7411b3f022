"""What one step computes and keeps per device: activations alive at the backward pass and
FLOPs (model and executed).

Example:
    >>> model, executed = _flops(GPTConfig.named("tiny"), 8 * 64, 64, remat=True)
    >>> executed / model
    1.3333333333333333
"""

from __future__ import annotations

import math

from jmp.models.gpt import GPTConfig
from jmp.plan.moe_costs import expert_slots
from jmp.plan.terms import _Ctx


def _activation_bytes(c: _Ctx, compute_bytes: int, flash: bool) -> int:
    """Activations alive at the start of the backward pass, per device.

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
    eq. 2, tensor parallel without sequence parallel) adapted to this block: no dropout masks,
    RMSNorm, ``compute_bytes`` per value. Per token and layer:
    ``4d`` (both norms' inputs and outputs, whole on every device) ``+ (4d + 2f + a*s) / t``
    (q, k, v, attention output, GELU input and output, softmax probabilities, split t ways).
    ``flash`` drops the ``a*s`` probabilities: on GPUs with 16-bit compute
    ``jax.nn.dot_product_attention`` uses cuDNN's fused attention, which keeps none.
    Plus, per token, the logits (``V/t`` values, in the compute dtype and again in float32
    for the loss), the embedding output, and under a vocabulary split the one-hot ids the
    embedding's product keeps for its gradient (``V/t``). With remat only each block's input
    is kept, and one block is recomputed at a time.

    Under sequence parallelism (their eq. 4, adapted the same way) the residual stream is split
    ``t`` ways between the tensor-parallel regions: the norms' inputs (``2d / t`` per token),
    the embedding output and, with remat, the kept block inputs. The norms' outputs are kept as
    the column-parallel matmuls gathered them, whole (``2d``), for their weight gradients.
    """
    cfg = c.cfg
    d, f, h = cfg.d_model, cfg.hidden, cfg.n_heads
    # FSDP splits weights at rest, not activations
    t_h, t_f, t_v = (c.tensor_split(r)[1] for r in ("qkv", "up", "head"))
    tokens, cb = c.tokens, compute_bytes
    # per token: the softmax probabilities over every key (cp ring: float32 blocks, one per
    # hop, all kept; allgather: as dense attention, none with flash)
    probs = h // t_h * c.seq * (4 if c.context and c.cp_impl == "ring" else 0 if flash else cb)
    # the residual stream's share on this device (sp: its sequence chunk), and the norms' values
    t_r = t_h if c.seq_split else 1
    norms = 2 * d // t_r + 2 * d
    block = tokens * (cb * (norms + 4 * d // t_h + 2 * f // t_f) + probs)
    if c.context:  # K/V of the whole sequence (allgather: made whole over rows and heads too)
        whole = c.rows * c.seq * 2 * d // t_h * cb
        if c.cp_impl == "allgather":
            whole *= t_h * math.prod(c.mesh[a] for a in c.batch_axes)
        block += whole
    vocab = tokens * cfg.vocab_size // t_v * (cb + 4 + (cb if t_v > 1 else 0))
    moe = cfg.moe_layers(cfg.n_layers)
    if moe:  # a MoE block keeps its expert rows instead of the dense MLP's 2f per token
        fe = cfg.expert_width(f)
        slots = expert_slots(c)  # expert rows per token: top_k, or the fixed buffers' slots
        moe_block = (
            block
            - tokens * cb * 2 * f // t_f
            + tokens * cb * (slots * (2 * d + 3 * fe) + 3 * fe * cfg.n_shared_experts)
        )
        moe_block += tokens * cfg.n_experts * 4  # router probabilities, float32
    else:
        moe_block = block
    blocks = block * (cfg.n_layers - moe) + moe_block * moe
    residual = tokens * d * cb // t_r  # one block's input (or the embedding's output)
    kept = residual * cfg.n_layers + max(block, moe_block) if c.remat else blocks
    return int(kept + vocab + residual)


def _flops(
    cfg: GPTConfig,
    tokens: int,
    seq: int,
    remat: bool,
    cp: bool = False,
    expert_slots: float | None = None,
) -> tuple[float, float]:
    """(model FLOPs, executed FLOPs) of one step: 6·N·tokens + causal attention.

    N counts the matmul weights one token uses (blocks and head; the embedding and position
    tables are lookups; a MoE block counts its router, ``top_k`` routed and the shared experts:
    active parameters). Causal attention: QK^T and AV cost 2·s·d each per token and layer
    forward, half of it masked: 6·L·s·d per token for forward and backward. Executed FLOPs add
    what the program computes beyond that: context-parallel attention computes the masked half
    too (whole key blocks), expert parallelism runs every slot of its fixed-size buffers
    (``expert_slots`` expert rows per token instead of ``top_k``), remat one more forward.
    """
    d, f, L = cfg.d_model, cfg.hidden, cfg.n_layers
    moe = cfg.moe_layers(L)
    expert = 3 * d * cfg.expert_width(f)  # one SwiGLU expert
    n_mm = L * 4 * d * d + (L - moe) * 2 * d * f + d * cfg.vocab_size
    n_mm += moe * (d * cfg.n_experts + (cfg.top_k + cfg.n_shared_experts) * expert)
    model = 6 * n_mm * tokens + 6 * L * seq * d * tokens
    executed = model + (6 * L * seq * d * tokens if cp else 0)
    if moe and expert_slots is not None:
        executed += 6 * moe * expert * (expert_slots - cfg.top_k) * tokens
    return model, executed * (4 / 3 if remat else 1)
