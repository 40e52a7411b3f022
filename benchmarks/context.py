"""Context parallelism: per-device activation memory and step time against sequence length.

For the GPT train step (AdamW) under ``cp`` on ``context = 1, 2, 4, 8`` simulated CPU devices,
ring attention against all-gather attention (load-balanced layout): the compiled temporary
bytes per device (``memory_analysis``: activations and workspace) and the median step time,
variants alternated within one run. Also the longest sequence whose step's temporaries fit a
fixed per-device budget. Writes ``results/context.json`` and ``results/context.png``.

    .venv/bin/python benchmarks/context.py [--quick]

CPU times only rank variants measured side by side; absolute times mean something on a GPU.
"""

from __future__ import annotations

import time  # noqa: E402

import common  # first: compilation cache defaults, then JAX

from jmp.models.gpt import GPTConfig  # noqa: E402

WAYS = (1, 2, 4, 8)
IMPLS = ("ring", "allgather")
BUDGET = 24 * 2**20  # per-device temporaries, bytes


def measure(seq: int, ways: int, impl: str, devices, rounds: int) -> dict:
    cfg = GPTConfig(d_model=64, n_layers=2, n_heads=4, seq_len=seq, vocab_size=256, cp_impl=impl)
    strategy, spec = ("dp", "data=1") if ways == 1 else ("cp", f"context={ways}")
    mesh = common.mesh_for(spec, devices)
    compiled, step_s = common.compiled_and_timed(cfg, strategy, mesh, rows=2, rounds=rounds)
    mem = common.jinspect.memory(compiled)
    return {
        "seq": seq,
        "context": ways,
        "impl": impl,
        "temp_bytes": mem.temporaries,
        "argument_bytes": mem.arguments,
        "step_s": step_s,
    }


def main() -> None:
    args = common.parse_args(__doc__.splitlines()[0])
    devices = common.setup()
    started = time.perf_counter()
    seqs = (128, 256) if args.quick else (128, 256, 512, 1024)
    rounds = 2 if args.quick else 4
    rows = []
    for seq in seqs:
        for ways in WAYS:
            for impl in IMPLS if ways > 1 else IMPLS[:1]:
                row = measure(seq, ways, impl, devices, rounds)
                rows.append(row)
                print(
                    f"seq {seq:5d} context {ways} {impl:9s} temp "
                    f"{common.mib(row['temp_bytes']):7.2f} MiB  step {row['step_s'] * 1e3:7.1f} ms"
                )
    fits = {
        f"{w}-{i}": max(
            (
                r["seq"]
                for r in rows
                if r["context"] == w and r["impl"] == i and r["temp_bytes"] <= BUDGET
            ),
            default=None,
        )
        for w in WAYS
        for i in (IMPLS if w > 1 else IMPLS[:1])
    }
    fig, (ax_mem, ax_time) = common.new_figure(ncols=2)
    for w in WAYS:
        for i in IMPLS if w > 1 else IMPLS[:1]:
            pts = [r for r in rows if r["context"] == w and r["impl"] == i]
            label = "1 device" if w == 1 else f"context={w} {i}"
            style = "-" if i == "ring" else "--"
            ax_mem.plot(
                [r["seq"] for r in pts],
                [common.mib(r["temp_bytes"]) for r in pts],
                style,
                marker="o",
                label=label,
            )
            ax_time.plot(
                [r["seq"] for r in pts],
                [r["step_s"] * 1e3 for r in pts],
                style,
                marker="o",
                label=label,
            )
    ax_mem.axhline(common.mib(BUDGET), color="gray", lw=0.8)
    for ax, what in ((ax_mem, "temporary MiB per device"), (ax_time, "step ms (CPU)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length")
        ax.set_ylabel(what)
    ax_mem.legend(fontsize=7)
    common.finish(
        "context",
        {"rows": rows, "budget_bytes": BUDGET, "longest_seq_within_budget": fits},
        fig,
        started,
    )


if __name__ == "__main__":
    main()
