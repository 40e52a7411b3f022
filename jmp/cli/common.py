"""What the commands share: the parser, argument types, model and mesh arguments, devices.

The argument types (:func:`positive_int`, :func:`nonnegative_int`, :func:`finite_float`,
:func:`positive_float`, :func:`nonnegative_float`, :func:`fraction`, :func:`mesh_text`) check a
value while the command line is parsed: a bad one is refused in one line that names it, before
JAX starts, and ``--help`` still works.

Example:
    >>> p = CommandParser(prog="jmp demo")
    >>> add_model_args(p)
    >>> p.parse_args(["--strategy", "tp", "--seq", "64"]).seq
    64
    >>> positive_int("0")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: 0 is not a positive integer (use a whole number >= 1)
"""

from __future__ import annotations

import argparse
import copy
import math
import os
from typing import Any, NoReturn

from jmp import strategies
from jmp.errors import ConfigError

#: The options that shape a mixture of experts: option -> (config field, default).
_EXPERT_SHAPE = {
    "--top-k": ("top_k", 2),
    "--shared-experts": ("n_shared_experts", 0),
    "--moe-every": ("moe_every", 1),
    "--expert-activation": ("expert_activation", "swiglu"),
}

#: The GPT size ``jmp train`` trains without --model.
DEFAULT_MODEL = "small"

# --- the parser ------------------------------------------------------------------------------


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default: ``(default: X)``, or ``(required)``; also for an
    option without help text.

    An option whose default is None and whose help already says what the default means
    (``sequence length (default per model)``) is not given a bare ``(default: None)`` too.
    """

    def _format_action(self, action: argparse.Action) -> str:
        if action.option_strings and action.help is None:  # no help text: still the default
            action = copy.copy(action)
            action.help = "(required)" if action.required else "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.required and action.option_strings:
            return f"{text} (required)"
        if action.default is None and "default" in text.lower():
            return text
        return super()._get_help_string(action)


class CommandParser(argparse.ArgumentParser):
    """The parser of ``jmp`` and of each command: ``--help`` shows every option's default, and a
    bad argument ends with one line on stderr (no usage block) and exit code 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        message = " ".join(message.splitlines()).rstrip(".")
        self.exit(2, f"{self.prog}: error: {message}. See: {self.prog} --help\n")


# --- argument types (argparse ``type=``): each names the refused value ----------------------


def _number(text: str, kind: type[int] | type[float], what: str) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def positive_int(text: str) -> int:
    """An ``int`` >= 1 (a count of steps, rows, devices...)."""
    value = _number(text, int, "an integer")
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"{value} is not a positive integer (use a whole number >= 1)"
        )
    return value


def nonnegative_int(text: str) -> int:
    """An ``int`` >= 0 (0 meaning none, e.g. ``--sample 0``)."""
    value = _number(text, int, "an integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative (use a whole number >= 0)")
    return value


def seed_int(text: str) -> int:
    """A random seed: an ``int`` in [0, 2**32) (what numpy's and JAX's generators take)."""
    value = _number(text, int, "an integer")
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"{value} is not a seed in [0, 2**32)")
    return value


def finite_float(text: str) -> float:
    """A ``float`` that is not nan or inf."""
    value = _number(text, float, "a number")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_float(text: str) -> float:
    """A finite ``float`` > 0 (a learning rate, a timeout)."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value:g} is not > 0 (use a positive number)")
    return value


def nonnegative_float(text: str) -> float:
    """A finite ``float`` >= 0 (a temperature, a weight decay)."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value:g} is negative (use a number >= 0)")
    return value


def fraction(text: str) -> float:
    """A ``float`` in (0, 1] (a share of device memory)."""
    value = finite_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value:g} is not in (0, 1] (use a share such as 0.9)")
    return value


def profile_window(text: str) -> tuple[int, int]:
    """``START:END``: the steps (1-based, inclusive) a profile covers."""
    from jmp.train.observe import parse_window

    try:
        return parse_window(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def mesh_text(text: str) -> str:
    """A mesh like ``data=2,model=4``: not empty, well formed (its fit is checked later)."""
    from jmp.errors import MeshError
    from jmp.mesh import parse_mesh_spec

    if not text.strip():
        raise argparse.ArgumentTypeError(
            f"{text!r} is an empty mesh (give axis=size pairs, e.g. data=2,model=4, or leave "
            "--mesh out for the strategy's default)"
        )
    try:
        parse_mesh_spec(text)
    except MeshError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


# --- what train and inspect share ------------------------------------------------------------


def add_model_args(p: argparse.ArgumentParser, *, model_default: str | None = "small") -> None:
    """The strategy, mesh and model options; ``model_default=None`` for a command where
    ``--model`` is one of two starts (``jmp train --init``), resolved by :func:`gpt_config`."""
    p.add_argument("--strategy", default="dp_tp", help=strategies.help_text())
    p.add_argument(
        "--mesh",
        type=mesh_text,
        default=None,
        help="e.g. data=2,model=4 (default per strategy: each kind's share, the last "
        "kind takes the rest of the devices)",
    )
    p.add_argument(
        "--devices",
        type=positive_int,
        default=8,
        help="CPU devices to simulate when no accelerator is present",
    )
    p.add_argument(
        "--model",
        default=model_default,
        help="tiny | small | medium | ..."
        if model_default
        else f"GPT size: tiny | small | medium | ... (default: {DEFAULT_MODEL}; not with --init)",
    )
    p.add_argument(
        "--seq", type=positive_int, default=None, help="sequence length (default per model)"
    )
    p.add_argument(
        "--mode",
        default="auto",
        choices=strategies.MODES,
        help="auto: XLA inserts the collectives from sharding annotations; manual: "
        "shard_map with explicit psums; collective: manual, with sp's all-gathers and "
        "reduce-scatters as collective matmuls (ring steps overlapping the partial products)",
    )
    p.add_argument("--dtype", default="float32", help="compute dtype, e.g. bfloat16")
    p.add_argument(
        "--remat",
        nargs="?",
        const="full",
        default="none",
        choices=strategies.REMAT_POLICIES,
        help="what each block keeps for the backward pass; the rest is recomputed (full: only "
        "its input; dots: matmul outputs; dots_no_batch: matmuls with weights; offload: those in "
        "host memory); --remat alone is full",
    )
    p.add_argument(
        "--experts",
        type=nonnegative_int,
        default=0,
        help="routed experts in each MoE block: the blocks' MLPs become mixtures of SwiGLU "
        "(or --expert-activation gelu) experts (0: a dense model); ep strategies split them "
        "over 'expert'",
    )
    p.add_argument(
        "--top-k",
        type=positive_int,
        default=_EXPERT_SHAPE["--top-k"][1],
        help="experts each token goes to (--experts)",
    )
    p.add_argument(
        "--shared-experts",
        type=nonnegative_int,
        default=_EXPERT_SHAPE["--shared-experts"][1],
        help="experts every token uses besides its routed ones (DeepSeek-MoE; --experts)",
    )
    p.add_argument(
        "--moe-every",
        type=positive_int,
        default=_EXPERT_SHAPE["--moe-every"][1],
        help="every k-th block is a MoE block, the others dense (--experts)",
    )
    p.add_argument(
        "--expert-activation",
        default=_EXPERT_SHAPE["--expert-activation"][1],
        choices=("swiglu", "gelu"),  # jmp.layers.moe.ACTIVATIONS (not imported: JAX not yet)
        help="the experts' MLPs: swiglu (gate, up, down) or gelu (up, down: GPT's dense MLP's "
        "kind; --experts)",
    )
    p.add_argument(
        "--cp-impl",
        default="ring",
        choices=("ring", "allgather"),
        help="context-parallel attention (cp strategies): K/V blocks passed around the ring, "
        "or all-gathered",
    )
    p.add_argument(
        "--cp-load-balance",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="cp strategies: device i holds sequence chunks i and 2c-1-i (equal causal work)",
    )


def start_devices(n: int) -> None:
    """Simulate ``n`` CPU devices unless an accelerator is present (set before JAX starts).

    Raises:
        DeviceError: JAX cannot start the backend ``JAX_PLATFORMS`` asks for (say ``cuda`` on a
            machine without an NVIDIA GPU or without jaxlib's CUDA plugin).
    """
    import jax

    import jmp.runtime.distributed
    from jmp.devices import simulate_cpu_devices, use_gpu_xla_flags

    if jmp.runtime.distributed.is_initialized():
        return  # every process's devices are started, and checked against the mesh
    use_gpu_xla_flags()  # where a GPU may be: collectives overlapping compute
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms in ("", "cpu"):
        simulate_cpu_devices(n)
    try:
        jax.devices()
    # jax 0.10 raises RuntimeError when a backend fails to start, and a bare AssertionError
    # when JAX_PLATFORMS=cuda finds no NVIDIA GPU at all (it skips cuda, then has no backend)
    except (RuntimeError, AssertionError) as err:
        raise backend_error(platforms, err) from None


def backend_error(platforms: str, err: BaseException) -> Exception:
    """The :class:`~jmp.errors.DeviceError` for a backend JAX could not start, in one line."""
    from jmp.errors import DeviceError

    detail = " ".join(str(err).split())
    detail = f" (JAX: {detail})" if detail else ""
    if any(p.strip() in ("cuda", "gpu") for p in platforms.split(",")):
        return DeviceError(
            f"JAX_PLATFORMS={platforms!r}: no CUDA device or jaxlib CUDA plugin found{detail}. "
            "Fix: unset JAX_PLATFORMS (or set JAX_PLATFORMS=cpu) to run on the CPU, or install "
            "jax[cuda12] on a machine with an NVIDIA GPU."
        )
    where = f"JAX_PLATFORMS={platforms!r}" if platforms else "the default platform"
    return DeviceError(
        f"JAX could not start a backend for {where}{detail}. Fix: unset JAX_PLATFORMS (or set "
        "JAX_PLATFORMS=cpu), or install the jaxlib plugin for that platform."
    )


def setup(args: argparse.Namespace) -> tuple[Any, Any, Any, str]:
    """Devices, mesh, rules and the GPT config the model options ask for."""
    mesh, rules, mesh_text = setup_mesh(args)
    return mesh, rules, gpt_config(args), mesh_text


def setup_mesh(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """Start the devices; the mesh (``--mesh`` or the strategy's default) and its rules."""
    import jmp

    start_devices(args.devices)
    mesh_text = mesh_spec(args)
    mesh = jmp.make_mesh(mesh_text)
    return mesh, jmp.rules.preset(args.strategy, mesh), mesh_text


def model_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields ``--mode``, ``--remat``, ``--cp-*`` and ``--seq`` set (GPT and Llama
    alike)."""
    overrides: dict[str, Any] = {
        "mode": args.mode,
        "remat": args.remat,
        "cp_impl": args.cp_impl,
        "cp_load_balance": args.cp_load_balance,
    }
    if args.seq is not None:  # 0 is refused (the config), never read as "the default"
        overrides["seq_len"] = args.seq
    return overrides


def expert_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The mixture-of-experts fields ``--experts``, ``--top-k``, ``--shared-experts``,
    ``--moe-every`` and ``--expert-activation`` set (empty for a dense model; the shape options
    without ``--experts`` are refused rather than ignored)."""
    values = {opt: getattr(args, opt[2:].replace("-", "_")) for opt in _EXPERT_SHAPE}
    if not args.experts:
        given = [opt for opt, (_, default) in _EXPERT_SHAPE.items() if values[opt] != default]
        if given:
            raise ConfigError(
                f"{', '.join(given)} shape a mixture of experts, but --experts is 0 (a dense "
                f"model). Fix: add --experts N (e.g. --experts 8), or drop {', '.join(given)}."
            )
        return {}
    return {"n_experts": args.experts, **{_EXPERT_SHAPE[o][0]: v for o, v in values.items()}}


def gpt_config(args: argparse.Namespace) -> Any:
    """The :class:`~jmp.models.GPTConfig` of ``--model`` (default small) and its options."""
    from jmp.models import GPTConfig

    name = args.model or DEFAULT_MODEL
    return GPTConfig.named(
        name, dtype=args.dtype, **model_overrides(args), **expert_overrides(args)
    )


def fits(mesh_text: str, n: int) -> bool:
    from jmp.mesh import parse_mesh_spec

    return math.prod(parse_mesh_spec(mesh_text).values()) == n


def mesh_spec(args: argparse.Namespace) -> str:
    """``--mesh``, or the strategy's default mesh (checks the strategy name first)."""
    from jmp.errors import MeshError

    default = strategies.default_mesh(args.strategy)  # raises ConfigError for a bad name
    if args.mesh is None:
        return default
    if not str(args.mesh).strip():
        raise MeshError(
            f"--mesh {args.mesh!r} is empty. Fix: give axis=size pairs (e.g. {default!r}) or "
            "leave --mesh out for the strategy's default."
        )
    return args.mesh
