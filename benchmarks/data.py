"""The input pipeline against the train step: does the step ever wait for data?

On a corpus prepared from the Python standard library's sources (bytes tokenizer; the script
also times ``prepare`` itself, with bytes and with a locally trained BPE), it measures in one
run, alternating the variants round by round:

- the loader's throughput per process: ``Loader.local_batch`` (one batch built by the calling
  thread, no prefetch) for 1, 2 and 4 simulated processes (each builds ``batch / processes``
  rows of the same global batch): tokens/s per process;
- what the step consumes: the real jmp train step (``jmp.train.make_step``, AdamW) of a tiny GPT
  on the same batch shape, dp_tp on ``data=2,model=4``: tokens/s;
- the time the step waits for data: a training loop taking ``Loader.device_batches(k)``
  (grain's prefetch threads build and place the next batches while the step runs), the wait
  measured around each call, and the loop's step time.

It prints the ratio (loader tokens/s per process) / (step tokens/s): the issue's goal is >= 10
with a wait of about 0. On these 2-core machines the loader's threads and XLA's share the same
cores, so the loop measures the worst case; absolute figures mean something only on a GPU.

Run: ``python benchmarks/data.py [--quick]``.
"""

from __future__ import annotations

import os
import tempfile
import time

import common  # first: it sets JAX's environment (cache) and sys.path
import jax

from jmp.models.gpt import GPTConfig
from jmp.train import TrainConfig
from jmp.train.data import Loader, batch_sharding, default_corpus_files, prepare

STRATEGY, MESH = "dp_tp", "data=2,model=4"
PROCESSES = (1, 2, 4)


def extra(parser):
    parser.add_argument("--batch", type=int, default=16, help="global batch (rows)")
    parser.add_argument("--seq", type=int, default=256, help="tokens per row")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds")


def utf8_files(files: list[str]) -> list[str]:
    """The files that are UTF-8 text (the stdlib holds a few test files in other encodings,
    which ``prepare`` refuses by name)."""
    kept = []
    for name in files:
        with open(name, "rb") as f:
            try:
                f.read().decode("utf-8")
            except UnicodeDecodeError:
                continue
        kept.append(name)
    return kept


def time_prepare(files: list[str], root: str, quick: bool) -> dict:
    """MB/s of ``prepare`` with the bytes tokenizer (all files) and a BPE (a share of them)."""
    out = {}
    nbytes = sum(os.path.getsize(f) for f in files)
    t0 = time.perf_counter()
    corpus = prepare(files, os.path.join(root, "bytes"), progress=False).corpus
    out["bytes_MB_per_s"] = nbytes / 1e6 / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    assert prepare(files, os.path.join(root, "bytes"), progress=False).reused
    out["no_op_s"] = time.perf_counter() - t0
    share = files[: len(files) // (8 if quick else 3)]
    share_bytes = sum(os.path.getsize(f) for f in share)
    t0 = time.perf_counter()
    bpe = prepare(share, os.path.join(root, "bpe"), tokenizer="bpe:4096", progress=False).corpus
    out["bpe_4096_MB_per_s"] = share_bytes / 1e6 / (time.perf_counter() - t0)
    out["bpe_MB"], out["bytes_MB"] = share_bytes / 1e6, nbytes / 1e6
    out["bpe_tokens_per_byte"] = bpe.n_tokens / share_bytes
    out["corpus"] = corpus
    return out


def main() -> None:
    args = common.parse_args(__doc__.splitlines()[0], extra)
    started = time.perf_counter()
    devices = common.setup()
    rounds = args.rounds or (4 if args.quick else 8)
    batch, seq = args.batch, args.seq
    files = utf8_files(default_corpus_files())
    if args.quick:
        files = files[: len(files) // 4]
    root = tempfile.mkdtemp(prefix="jmp-bench-data-")
    prep = time_prepare(files, root, args.quick)
    corpus = prep.pop("corpus")

    mesh = common.mesh_for(MESH, devices)
    cfg = GPTConfig.named("tiny", seq_len=seq)
    _, step, rules = common.build(cfg, STRATEGY, mesh, train_cfg=TrainConfig(steps=1000))
    sharding = batch_sharding(mesh, rules)
    state = {"s": step.init_state(), "k": 0}
    with Loader(corpus, seq_len=seq, batch_size=batch, sharding=sharding) as first:
        placed = first.device_batches(0)
    fixed = (placed["inputs"], placed["targets"])

    def train_step():
        state["s"], metrics = step(state["s"], fixed)
        return metrics["loss"]

    loaders = {
        p: Loader(corpus, seq_len=seq, batch_size=batch, process_index=0, process_count=p)
        for p in PROCESSES
    }
    cursor = {p: 0 for p in PROCESSES}

    def build(p):
        def run():
            cursor[p] += 1  # the next step each call, as a run reads them
            return loaders[p].local_batch(cursor[p])

        return run

    runners = {"step": train_step, **{f"loader_p{p}": build(p) for p in PROCESSES}}
    times = common.interleaved(runners, rounds=rounds, steps=5, warmup=2)
    step_s = common.median(times["step"])
    step_tps = batch * seq / step_s
    per_process = {p: (batch // p) * seq / common.median(times[f"loader_p{p}"]) for p in PROCESSES}

    # the loop: the step fed by the prefetching loader, waits measured around each call
    waits, steps_s = [], []
    with Loader(corpus, seq_len=seq, batch_size=batch, sharding=sharding) as loader:
        n = 10 if args.quick else 30
        for k in range(n + 2):
            t0 = time.perf_counter()
            b = loader.device_batches(k)
            t1 = time.perf_counter()
            state["s"], metrics = step(state["s"], (b["inputs"], b["targets"]))
            float(metrics["loss"])  # the trainer reads the loss each step
            if k >= 2:  # after the prefetch has started
                waits.append(t1 - t0)
                steps_s.append(time.perf_counter() - t0)
    for loader in loaders.values():
        loader.close()
    wait_s, loop_s = common.median(waits), common.median(steps_s)

    rows = [
        ["train step (consumes)", step_s * 1e3, step_tps, 1.0],
        *[
            [
                f"loader, {p} process(es): {batch // p} rows each",
                batch // p * seq / v * 1e3,
                v,
                v / step_tps,
            ]
            for p, v in per_process.items()
        ],
    ]
    ratio = per_process[1] / step_tps
    notes = [
        f"batch {batch} x seq {seq}, tiny GPT ({cfg.n_layers} layers, d {cfg.d_model}), "
        f"{STRATEGY} on {MESH}, {len(jax.devices())} {jax.default_backend()} devices; corpus "
        f"{corpus.n_documents} documents, {corpus.n_tokens / 1e6:.1f}M tokens",
        f"loader / step = {ratio:,.0f}x (1 process, one thread, no prefetch; goal >= 10x)",
        f"prefetching loop: the step waits {wait_s * 1e3:.3f} ms (median) per {loop_s * 1e3:.1f} "
        f"ms step ({wait_s / loop_s:.2%}); max wait {max(waits) * 1e3:.2f} ms",
        f"prepare: bytes {prep['bytes_MB_per_s']:.1f} MB/s ({prep['bytes_MB']:.1f} MB), no-op "
        f"re-run {prep['no_op_s']:.2f} s; bpe:4096 {prep['bpe_4096_MB_per_s']:.2f} MB/s "
        f"(training + tokenizing {prep['bpe_MB']:.1f} MB, {prep['bpe_tokens_per_byte']:.2f} "
        "tokens/byte)",
    ]
    common.print_table(
        "Input pipeline against the train step",
        ["what", "ms per batch", "tokens/s", "x step"],
        rows,
        notes,
    )

    fig, ax = common.new_figure()
    names = ["step"] + [f"loader\n{p} proc" for p in PROCESSES]
    values = [step_tps] + [per_process[p] for p in PROCESSES]
    ax.bar(names, values, color=["tab:gray"] + ["tab:blue"] * len(PROCESSES))
    ax.set_yscale("log")
    ax.set_ylabel("tokens/s (per process for the loader)")
    ax.set_title(f"loader vs step, batch {batch} x {seq}; wait {wait_s * 1e3:.2f} ms/step")
    data = {
        "batch": batch,
        "seq": seq,
        "mesh": MESH,
        "strategy": STRATEGY,
        "step_s": step_s,
        "step_tokens_per_s": step_tps,
        "loader_tokens_per_s_per_process": {str(p): v for p, v in per_process.items()},
        "ratio_loader_over_step": ratio,
        "loop_wait_s_median": wait_s,
        "loop_wait_s_max": max(waits),
        "loop_step_s_median": loop_s,
        "prepare": prep,
        "times": times,
    }
    common.finish("data", data, fig, started)


if __name__ == "__main__":
    main()
