"""Step time and compiled temporaries per remat policy, as ratios to keeping everything.

The real jmp train step (``jmp.fit``'s ``make_step``: AdamW, clipping, the guard) of a small
Llama (4 layers, d 256, 8 heads over 4 kv heads, SwiGLU 688, vocabulary 1024, sequence 256,
batch 8, f32) on one CPU device (remat is orthogonal to the mesh), once per policy of
:mod:`jmp.layers.remat`. Temporaries are XLA's per-device ``temp_size_in_bytes``; step times
are medians of interleaved runs (``common.interleaved``), each policy's ratio to ``none``
paired by round. On CPU ``offload`` has no separate host memory to offload to.

    .venv/bin/python benchmarks/remat.py [--quick]
"""

from __future__ import annotations

import time

import common  # first: the compilation cache defaults
import optax  # noqa: E402

import jmp  # noqa: E402
from jmp.models import Llama, LlamaConfig  # noqa: E402
from jmp.strategies import REMAT_POLICIES  # noqa: E402
from jmp.train import make_step  # noqa: E402

SIZES = dict(
    vocab_size=1024, seq_len=256, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, d_ff=688
)
BATCH = 8


def main() -> None:
    args = common.parse_args(__doc__.splitlines()[0])
    started = time.perf_counter()
    devices = common.setup()
    mesh = jmp.make_mesh("data=1", devices=devices[:1])
    rules = jmp.rules.preset("dp", mesh)
    runners, temps, flops = {}, {}, {}
    for policy in REMAT_POLICIES:
        cfg = LlamaConfig(**SIZES, remat=policy)
        model = jmp.shard_init(lambda rngs, cfg=cfg: Llama(cfg, rngs=rngs), mesh, rules)
        step = make_step(model, optax.adamw(1e-3), mesh, rules)
        batch = common.random_batch(step.batch_sharding, BATCH, cfg.seq_len, cfg.vocab_size)
        state = step.init_state()
        compiled = step.lower(state, batch).compile()
        temps[policy] = compiled.memory_analysis().temp_size_in_bytes
        flops[policy] = compiled.cost_analysis().get("flops", float("nan"))

        def run(step=step, box=[state], batch=batch):  # noqa: B006 (the state moves on)
            box[0], metrics = step(box[0], batch)
            return metrics["loss"]

        runners[policy] = run
    rounds = 3 if args.quick else 8
    times = common.interleaved(runners, rounds=rounds, steps=2)
    rows, data = [], {"sizes": SIZES, "batch": BATCH, "policies": {}}
    for policy in REMAT_POLICIES:
        ratio = common.paired_ratio(times[policy], times["none"], group=2)
        row = {
            "step_s": common.median(times[policy]),
            "step_ratio_to_none": ratio,
            "temp_mib": common.mib(temps[policy]),
            "temp_ratio_to_none": temps[policy] / temps["none"],
            "flops_ratio_to_none": flops[policy] / flops["none"],
        }
        data["policies"][policy] = row
        rows.append([policy, *row.values()])
    common.print_table(
        f"remat policies: Llama {SIZES['n_layers']} layers d {SIZES['d_model']}, batch {BATCH}"
        f" x {SIZES['seq_len']}, 1 CPU device",
        ["policy", "step s", "step / none", "temp MiB", "temp / none", "FLOPs / none"],
        rows,
        ["FLOPs: the compiled program's cost analysis (recompute included)"],
    )
    fig, (ax_t, ax_m) = common.new_figure(ncols=2, width=5)
    names = list(REMAT_POLICIES)
    ax_t.bar(names, [data["policies"][p]["step_ratio_to_none"] for p in names])
    ax_t.set_ylabel("step time / none")
    ax_m.bar(names, [data["policies"][p]["temp_mib"] for p in names])
    ax_m.set_ylabel("compiled temporaries (MiB)")
    for ax in (ax_t, ax_m):
        ax.tick_params(axis="x", rotation=30)
    common.finish("remat", data, fig, started)


if __name__ == "__main__":
    main()
