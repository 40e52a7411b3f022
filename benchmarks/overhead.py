"""jmp's train step against a hand-written ``jax.jit`` step with the same model math.

The baseline is an independent pure-jnp GPT over a plain dict of parameters, placed with the
same ``NamedSharding`` s jmp gives them under ``dp_tp`` (checked), with the same optax chain
(global-norm clipping + AdamW on jmp's schedule) and donated state. It writes out the sharding a
careful hand-written Megatron step would: batch over ``data``; vocabulary, heads and MLP hidden
over ``model``; the embedding as a one-hot matmul over the split vocabulary.

First the two are checked to compute the same losses (and parameters) from the same parameters;
then they are timed alternately in one run (jmp auto, jmp manual, baseline), and their
lower+compile times are measured with the persistent compilation cache off.

The required workload is ``GPTConfig.named("medium")``: 4 layers, d_model 256, 4 heads x 64,
MLP 1024, vocabulary 1024, sequence 128, global batch 8, f32, AdamW, no remat, data=2,model=4.

Run: ``python benchmarks/overhead.py [--quick]``.
"""

from __future__ import annotations

import time

import common  # first: it sets JAX's environment (cache) and sys.path
import jax

# Compile times must be real compiles: the persistent cache is decided once per process, at the
# first compile, so it is switched off before anything compiles (the runs below compile anew).
jax.config.update("jax_enable_compilation_cache", False)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jmp.models.gpt import GPTConfig  # noqa: E402
from jmp.train import TrainConfig, lr_schedule  # noqa: E402

STRATEGY, MESH = "dp_tp", "data=2,model=4"
REFERENCE_S_PER_STEP = {
    "MaxText 0.2.5": 0.50,
    "naive hand-written jax.jit": 0.75,
    "hand-written jax.jit, vocab-split embed/head": 0.66,
}
EPS = 1e-6


# --- the baseline: an independent GPT in plain jnp -----------------------------------------


def param_specs(cfg: GPTConfig) -> dict:
    """dp_tp placement written by hand: vocab, heads and MLP hidden over 'model'."""
    layer = {
        "ln1": P(),
        "wqkv": P(None, None, "model"),
        "wo": P("model"),
        "bo": P(),
        "ln2": P(),
        "w1": P(None, "model"),
        "b1": P("model"),
        "w2": P("model"),
        "b2": P(),
    }
    return {
        "wte": P("model"),
        "wpe": P(),
        "layers": [dict(layer) for _ in range(cfg.n_layers)],
        "ln_f": P(),
        "w_head": P(None, "model"),
    }


def to_baseline_layout(pure: dict) -> dict:
    """jmp's parameter tree (``nnx.to_pure_dict``) under the baseline's own names."""
    layers = [
        {
            "ln1": b["norm1"]["scale"],
            "wqkv": b["attn"]["qkv"],
            "wo": b["attn"]["out"],
            "bo": b["attn"]["out_bias"],
            "ln2": b["norm2"]["scale"],
            "w1": b["mlp"]["up"]["kernel"],
            "b1": b["mlp"]["up"]["bias"],
            "w2": b["mlp"]["down"]["kernel"],
            "b2": b["mlp"]["down"]["bias"],
        }
        for _, b in sorted(pure["blocks"].items())
    ]
    return {
        "wte": pure["embed"]["embedding"],
        "wpe": pure["position"],
        "layers": layers,
        "ln_f": pure["norm"]["scale"],
        "w_head": pure["head"]["kernel"],
    }


def rms_norm(x: jax.Array, scale: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + EPS)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def gpt_loss(params: dict, tokens: jax.Array, targets: jax.Array, mesh) -> jax.Array:
    c = lambda x, *spec: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)))  # noqa: E731
    vocab = params["wte"].shape[0]
    one_hot = c(jax.nn.one_hot(tokens, vocab, dtype=params["wte"].dtype), "data", None, "model")
    x = c(jnp.einsum("bsv,vd->bsd", one_hot, params["wte"]), "data", None, None)
    x = c(x + params["wpe"][: tokens.shape[1]], "data", None, None)
    for p in params["layers"]:
        # the bias is added to each sublayer's output after its all-reduce, then the residual
        h = rms_norm(x, p["ln1"])
        qkv = c(jnp.einsum("bsd,dthk->bsthk", h, p["wqkv"]), "data", None, None, "model", None)
        o = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], is_causal=True)
        x = x + (c(jnp.einsum("bshk,hkd->bsd", o, p["wo"]), "data", None, None) + p["bo"])
        h = rms_norm(x, p["ln2"])
        u = jax.nn.gelu(c(h @ p["w1"] + p["b1"], "data", None, "model"))
        y = c(c(u, "data", None, "model") @ p["w2"], "data", None, None) + p["b2"]
        x = c(x + y, "data", None, None)
    logits = c(rms_norm(x, params["ln_f"]) @ params["w_head"], "data", None, "model")
    logits = logits.astype(jnp.float32)
    target = jnp.sum(logits * jax.nn.one_hot(targets, vocab, dtype=logits.dtype), axis=-1)
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - target)


def make_baseline(
    cfg: GPTConfig, values: dict, mesh, train_cfg: TrainConfig, *, guard: bool = False
):
    """(jitted step, state factory, parameter shardings) of the hand-written baseline.

    ``guard=True`` adds by hand what jmp's step does beyond the math: keep the old state when
    the loss or the gradient norm is not finite, and return the gradient norm.
    """
    shardings = jax.tree.map(
        lambda s: NamedSharding(mesh, s), param_specs(cfg), is_leaf=lambda x: isinstance(x, P)
    )
    tx = optax.chain(
        optax.clip_by_global_norm(train_cfg.clip_norm),
        optax.adamw(lr_schedule(train_cfg), b1=0.9, b2=0.95, weight_decay=train_cfg.weight_decay),
    )
    replicated = NamedSharding(mesh, P())
    data = NamedSharding(mesh, P("data"))

    def init_state() -> tuple:
        params = jax.tree.map(lambda v, s: jax.device_put(v, s), values, shardings)
        opt_state = tx.init(params)  # eager: moments follow the params; counters land anywhere
        opt_state = jax.tree.map(
            lambda a: a if isinstance(a.sharding, NamedSharding) else jax.device_put(a, replicated),
            opt_state,
        )
        return params, opt_state

    params, opt_state = init_state()
    state_shardings = jax.tree.map(lambda a: a.sharding, (params, opt_state))

    def step(state: tuple, batch: tuple) -> tuple:
        params, opt_state = state
        loss, grads = jax.value_and_grad(gpt_loss)(params, *batch, mesh)
        updates, new_opt_state = tx.update(grads, opt_state, params)
        new = (optax.apply_updates(params, updates), new_opt_state)
        if not guard:
            return new, loss
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
        return new, {"loss": loss, "grad_norm": grad_norm}

    jitted = jax.jit(
        step,
        in_shardings=(state_shardings, (data, data)),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )
    return jitted, init_state, shardings


# --- the benchmark -------------------------------------------------------------------------


def check_same_math(jmp_step, base_step, base_init, base_shardings, jmp_pure, batches) -> dict:
    """Same placement, same losses for 3 steps, same parameters after them."""
    jmp_layout = to_baseline_layout(jmp_pure)
    placement_differs = [
        jax.tree_util.keystr(path)
        for (path, a), s in zip(
            jax.tree_util.tree_leaves_with_path(jmp_layout),
            jax.tree.leaves(base_shardings),
            strict=True,
        )
        if not s.is_equivalent_to(a.sharding, a.ndim)
    ]
    state_j, state_b = jmp_step.init_state(), base_init()
    losses = []
    for batch in batches:
        state_j, metrics = jmp_step(state_j, batch)
        state_b, loss_b = base_step(state_b, batch)
        losses.append((float(metrics["loss"]), float(loss_b)))
    after_j = jax.tree.leaves(to_baseline_layout(nnx.to_pure_dict(state_j.params)))
    diff = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(after_j, jax.tree.leaves(state_b[0]), strict=True)
    )
    rel = max(abs(a - b) / abs(b) for a, b in losses)
    return {
        "losses_jmp_vs_baseline": losses,
        "max_rel_loss_diff": rel,
        "max_abs_param_diff_after_steps": diff,
        "placement_differs": placement_differs,
        "same": rel < 1e-5 and diff < 1e-5 and not placement_differs,
    }


def compile_times(
    variants: dict, reps: int, mesh, *, once: tuple[str, ...] = ()
) -> tuple[dict, dict]:
    """Lower and compile seconds of each variant (alternating, in-memory caches cleared), and
    what XLA says of each compiled step: per-device FLOPs, bytes accessed, collectives."""
    out = {name: {"lower": [], "compile": []} for name in variants}
    costs = {}
    names = list(variants)
    for r in range(reps):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if r and name in once:
                continue
            jitted, args = variants[name]
            jax.clear_caches()
            t0 = time.perf_counter()
            lowered = jitted.lower(*args)
            t1 = time.perf_counter()
            compiled = lowered.compile()
            out[name]["lower"].append(t1 - t0)
            out[name]["compile"].append(time.perf_counter() - t1)
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, list | tuple) else cost
            found, _ = common.collectives(compiled, mesh)
            costs[name] = {
                "flops": float(cost.get("flops", 0.0)),
                "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
                "collectives": sum(c.count for c in found),
                "scalar_collectives": sum(c.count for c in found if common.is_scalar(c)),
                "collective_ring_bytes": sum(common.ring_bytes(c, mesh) for c in found),
            }
    return out, costs


def run_workload(
    label: str, cfg: GPTConfig, batch_size: int, devices, *, rounds: int, compile_reps: int
) -> dict:
    mesh = common.mesh_for(MESH, devices)
    train_cfg = TrainConfig()
    model, step_auto, _ = common.build(cfg, STRATEGY, mesh, train_cfg=train_cfg)
    manual_cfg = GPTConfig(**{**cfg.to_dict(), "mode": "manual"})
    _, step_manual, _ = common.build(manual_cfg, STRATEGY, mesh, train_cfg=train_cfg)
    jmp_pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    values = jax.tree.map(np.asarray, to_baseline_layout(jmp_pure))  # a copy, on the host
    base_step, base_init, base_shardings = make_baseline(cfg, values, mesh, train_cfg)
    guard_step, guard_init, _ = make_baseline(cfg, values, mesh, train_cfg, guard=True)
    batches = [
        common.random_batch(
            step_auto.batch_sharding, batch_size, cfg.seq_len, cfg.vocab_size, seed=k
        )
        for k in range(3)
    ]
    batch = batches[0]

    ctimes, costs = compile_times(
        {
            "jmp": (step_auto, (step_auto.init_state(), batch)),
            "jmp manual": (step_manual, (step_manual.init_state(), batch)),
            "baseline": (base_step, (base_init(), batch)),
            "baseline+guard": (guard_step, (guard_init(), batch)),
        },
        compile_reps,
        mesh,
        once=("baseline+guard",),
    )
    check = check_same_math(step_auto, base_step, base_init, base_shardings, jmp_pure, batches)

    steps = {
        "jmp": (step_auto, step_auto.init_state),
        "jmp manual": (step_manual, step_manual.init_state),
        "baseline": (base_step, base_init),
        "baseline+guard": (guard_step, guard_init),
    }
    states = {name: init() for name, (_, init) in steps.items()}

    def runner(name):
        def run():
            states[name], out = steps[name][0](states[name], batch)
            return out

        return run

    times = common.interleaved(
        {name: runner(name) for name in steps}, rounds=rounds, steps=1, warmup=2
    )
    ctotal = {
        n: [lo + co for lo, co in zip(v["lower"], v["compile"], strict=True)]
        for n, v in ctimes.items()
    }
    return {
        "workload": label,
        "config": cfg.to_dict(),
        "mesh": MESH,
        "strategy": STRATEGY,
        "global_batch": batch_size,
        "check": check,
        "step_times_s": times,
        "median_step_s": {n: common.median(t) for n, t in times.items()},
        "ratio_jmp_over_baseline": common.paired_ratio(times["jmp"], times["baseline"], 1),
        "ratio_manual_over_baseline": common.paired_ratio(
            times["jmp manual"], times["baseline"], 1
        ),
        "ratio_guard_over_baseline": common.paired_ratio(
            times["baseline+guard"], times["baseline"], 1
        ),
        "ratio_jmp_over_guard": common.paired_ratio(times["jmp"], times["baseline+guard"], 1),
        # in the JSON only: the fastest steps, another (noisier here) estimate
        "ratio_of_fastest_steps": {n: min(t) / min(times["baseline"]) for n, t in times.items()},
        "compile_times_s": ctimes,
        "compiled_cost_per_device": costs,
        "median_compile_s": {n: common.median(t) for n, t in ctotal.items()},
        "median_lower_s": {n: common.median(v["lower"]) for n, v in ctimes.items()},
        "compile_ratio_jmp_over_baseline": common.median(ctotal["jmp"])
        / common.median(ctotal["baseline"]),
        "compile_ratio_manual_over_baseline": common.median(ctotal["jmp manual"])
        / common.median(ctotal["baseline"]),
    }


def plot(results: list[dict]):
    fig, (ax_ratio, ax_abs, ax_comp) = common.new_figure(3, width=4.6)
    names = ["jmp", "jmp manual", "baseline", "baseline+guard"]
    width = 0.8 / len(names)
    xs = np.arange(len(results))
    for i, name in enumerate(names):
        ratios = [
            common.paired_ratio(r["step_times_s"][name], r["step_times_s"]["baseline"], 1)
            for r in results
        ]
        ax_ratio.bar(xs + i * width, ratios, width, label=name)
        ax_comp.bar(
            xs + i * width, [r["median_compile_s"][name] for r in results], width, label=name
        )
        ax_comp.bar(
            xs + i * width,
            [r["median_lower_s"][name] for r in results],
            width,
            color="k",
            alpha=0.3,
            label="(lowering)" if i == len(names) - 1 else None,
        )
    ax_ratio.axhline(1.03, color="k", ls="--", lw=1, label="target 1.03")
    ax_ratio.set_ylabel("step time / baseline (median of paired ratios)")
    ax_comp.set_ylabel("lower + compile, seconds")
    for ax in (ax_ratio, ax_comp):
        ax.set_xticks(xs + 1.5 * width, [r["workload"] for r in results])
        ax.legend(fontsize=7)
    medium = next(r for r in results if r["workload"] == "medium")
    steps = [medium["median_step_s"][n] for n in names]
    q1 = [np.percentile(medium["step_times_s"][n], 25) for n in names]
    q3 = [np.percentile(medium["step_times_s"][n], 75) for n in names]
    refs = list(REFERENCE_S_PER_STEP.items())
    ax_abs.bar(
        np.arange(len(names)),
        steps,
        yerr=[np.subtract(steps, q1), np.subtract(q3, steps)],
        capsize=3,
        color=[f"C{i}" for i in range(len(names))],
    )
    ax_abs.bar(np.arange(len(refs)) + len(names), [v for _, v in refs], color="lightgray")
    ax_abs.set_xticks(
        np.arange(len(names) + len(refs)),
        names
        + ["MaxText 0.2.5\n(reference)", "naive jit\n(reference)", "vocab-split jit\n(reference)"],
        rotation=60,
        fontsize=7,
    )
    ax_abs.set_ylabel("seconds per step (median, IQR)")
    ax_abs.set_title("medium workload", fontsize=9)
    fig.suptitle(f"jmp vs hand-written jax.jit, {STRATEGY} on {MESH} (8 simulated CPU devices)")
    return fig


def main() -> None:
    started = time.perf_counter()
    args = common.parse_args(__doc__.splitlines()[0])
    devices = common.setup()
    workloads = [("medium", GPTConfig.named("medium"), 8)]
    if not args.quick:
        workloads.append(("tiny", GPTConfig.named("tiny"), 16))
    rounds, reps = (8, 1) if args.quick else (30, 5)
    results = [
        run_workload(label, cfg, bs, devices, rounds=rounds, compile_reps=reps)
        for label, cfg, bs in workloads
    ]

    rows = []
    for r in results:
        m, c = r["median_step_s"], r["median_compile_s"]
        rows.append(
            [
                r["workload"],
                m["jmp"],
                m["jmp manual"],
                m["baseline"],
                m["baseline+guard"],
                r["ratio_jmp_over_baseline"],
                r["ratio_manual_over_baseline"],
                r["ratio_jmp_over_guard"],
                c["jmp"],
                c["baseline"],
                r["compile_ratio_jmp_over_baseline"],
                r["compile_ratio_manual_over_baseline"],
                "yes" if r["check"]["same"] else "NO",
            ]
        )
    notes = []
    for r in results:
        c = r["check"]
        notes.append(
            f"{r['workload']}: same math: max rel. loss diff "
            f"{c['max_rel_loss_diff']:.1e} over 3 steps, max |param diff| after them "
            f"{c['max_abs_param_diff_after_steps']:.1e}, placement differs for "
            f"{c['placement_differs'] or 'no parameter'}"
        )
    for r in results:
        c = r["compiled_cost_per_device"]
        b = c["baseline"]
        parts = [
            f"{n} {c[n]['flops'] / b['flops']:.3f} / "
            f"{c[n]['bytes_accessed'] / b['bytes_accessed']:.3f} / "
            f"{c[n]['collective_ring_bytes'] / b['collective_ring_bytes']:.3f} / "
            f"{c[n]['scalar_collectives']}"
            for n in c
        ]
        notes.append(
            f"{r['workload']}, compiled, per device, relative to the baseline (FLOPs / "
            f"bytes accessed / collective bytes / one-element all-reduces): " + "; ".join(parts)
        )
        lower = r["median_lower_s"]
        notes.append(
            f"{r['workload']}: lowering (tracing) jmp {lower['jmp']:.2f} s, manual "
            f"{lower['jmp manual']:.2f} s, baseline {lower['baseline']:.2f} s of the "
            f"compile times"
        )
    notes.append(
        "baseline+guard = the baseline plus, written by hand, what jmp's step adds: "
        "keep the old state when the loss or gradient norm is not finite (a select "
        "over parameters and optimizer state) and return the gradient norm. Where it "
        "compiles to jmp's FLOPs and bytes (above), jmp/(base+guard) is jmp's own "
        "overhead and its distance from 1 is the timing noise"
    )
    medium = next(r for r in results if r["workload"] == "medium")
    m = medium["median_step_s"]
    notes.append(
        f"medium (4 layers, d 256, 4x64 heads, MLP 1024, vocab 1024, seq 128, batch 8, "
        f"f32, AdamW, no remat, dp_tp data=2,model=4, 8 simulated CPU devices): jmp "
        f"{m['jmp']:.3f} s/step, jmp manual {m['jmp manual']:.3f}, baseline "
        f"{m['baseline']:.3f}; reference on these machines: "
        + ", ".join(f"{k} ~{v:.2f}" for k, v in REFERENCE_S_PER_STEP.items())
        + " (absolute times move with the other jobs on the machine; the ratios are the "
        "measurement)"
    )
    notes.append(
        "ratios = median over rounds of the per-round ratio of step times; each round "
        "runs every variant one step, in an order rotated every round; compile = lower "
        "+ compile with the persistent cache off; target jmp/baseline <= 1.03"
    )
    common.print_table(
        "jmp step vs hand-written jax.jit step (seconds)",
        [
            "workload",
            "jmp",
            "manual",
            "base",
            "base+guard",
            "jmp/base",
            "manual/base",
            "jmp/(base+guard)",
            "compile jmp",
            "compile base",
            "compile jmp/base",
            "compile manual/base",
            "same math",
        ],
        rows,
        notes,
    )
    common.finish(
        "overhead",
        {"quick": args.quick, "reference_s_per_step": REFERENCE_S_PER_STEP, "results": results},
        plot(results),
        started,
    )


if __name__ == "__main__":
    main()
