"""Sequence parallelism: tp against tp_sp, per-device temporaries and step time against length.

For the GPT train step (AdamW) on ``model = 4`` simulated CPU devices, tensor parallelism with
and without sequence parallelism (``tp``, ``tp_sp``, both ``mode='manual'``): the compiled
temporary bytes per device (``memory_analysis``) and the median step time, the two timed
alternately in one loop, and the bytes moved over 'model' (ring volume: an all-reduce moves
twice what a reduce-scatter or an all-gather of the same array moves). Writes
``results/sequence.json`` and ``results/sequence.png``.

    .venv/bin/python benchmarks/sequence.py [--quick]

CPU times only rank variants measured side by side; absolute times mean something on a GPU.
"""

from __future__ import annotations

import time  # noqa: E402

import common  # first: compilation cache defaults, then JAX

from jmp.models.gpt import GPTConfig  # noqa: E402

STRATEGIES = ("tp", "tp_sp")
WAYS = 4


def measure(seq: int, devices, rounds: int) -> dict[str, dict]:
    """Both strategies at one length: compiled, then timed alternately in one loop."""
    cfg = GPTConfig(d_model=256, n_layers=2, n_heads=8, seq_len=seq, vocab_size=256, mode="manual")
    mesh = common.mesh_for(f"model={WAYS}", devices)
    rows, runners = {}, {}
    for strategy in STRATEGIES:
        _, step, _ = common.build(cfg, strategy, mesh)
        holder = {"state": step.init_state()}
        batch = common.random_batch(step.batch_sharding, 2, seq, cfg.vocab_size)
        compiled = step.lower(holder["state"], batch).compile()
        found = common.jinspect.collectives(compiled, mesh)
        rows[strategy] = {
            "seq": seq,
            "strategy": strategy,
            "temp_bytes": common.jinspect.memory(compiled).temporaries,
            "model_ring_bytes": sum(
                common.ring_bytes(c, mesh) for c in found if c.axes == ("model",)
            ),
            "kinds_over_model": sorted({c.kind for c in found if c.axes == ("model",)}),
        }

        def run(step=step, holder=holder, batch=batch):
            holder["state"], metrics = step(holder["state"], batch)
            return metrics["loss"]

        runners[strategy] = run
    times = common.interleaved(runners, rounds=rounds)
    for strategy, row in rows.items():
        row["step_s"] = common.median(times[strategy])
    rows["tp_sp"]["step_ratio_tp_sp_over_tp"] = common.paired_ratio(times["tp_sp"], times["tp"], 1)
    return rows


def main() -> None:
    args = common.parse_args(__doc__.splitlines()[0])
    devices = common.setup()
    started = time.perf_counter()
    seqs = (256, 512) if args.quick else (256, 512, 1024, 2048)
    rounds = 2 if args.quick else 4
    rows = []
    for seq in seqs:
        pair = measure(seq, devices, rounds)
        rows += pair.values()
        tp, sp = pair["tp"], pair["tp_sp"]
        print(
            f"seq {seq:5d}  temp tp {common.mib(tp['temp_bytes']):7.2f} MiB  tp_sp "
            f"{common.mib(sp['temp_bytes']):7.2f} MiB ({sp['temp_bytes'] / tp['temp_bytes']:.3f})"
            f"  ring bytes over 'model' tp_sp/tp "
            f"{sp['model_ring_bytes'] / tp['model_ring_bytes']:.3f}  step tp "
            f"{tp['step_s'] * 1e3:7.1f} ms  tp_sp {sp['step_s'] * 1e3:7.1f} ms "
            f"({sp['step_ratio_tp_sp_over_tp']:.3f}, median of paired ratios)"
        )
    fig, (ax_mem, ax_time) = common.new_figure(ncols=2)
    for s in STRATEGIES:
        pts = [r for r in rows if r["strategy"] == s]
        x = [r["seq"] for r in pts]
        ax_mem.plot(x, [common.mib(r["temp_bytes"]) for r in pts], marker="o", label=s)
        ax_time.plot(x, [r["step_s"] * 1e3 for r in pts], marker="o", label=s)
    for ax, what in ((ax_mem, "temporary MiB per device"), (ax_time, "step ms (CPU)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length")
        ax.set_ylabel(what)
    ax_mem.legend(fontsize=7)
    common.finish("sequence", {"rows": rows, "model_axis": WAYS}, fig, started)


if __name__ == "__main__":
    main()
