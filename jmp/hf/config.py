"""Hugging Face ``config.json`` <-> :class:`jmp.models.llama.LlamaConfig`.

Four architectures share jmp's Llama decoder: ``LlamaForCausalLM`` (grouped-query attention,
optional Llama 3 rope scaling), ``MistralForCausalLM`` (a sliding attention window),
``Qwen2ForCausalLM`` (biases on q/k/v) and ``MixtralForCausalLM`` (Mistral's attention with a
mixture of experts on every block: :class:`jmp.layers.MoE` routes as Mixtral does, a softmax
over all ``num_local_experts``, the ``num_experts_per_tok`` largest, their weights renormalized
to sum to 1, SwiGLU experts, dropless). Both spellings of the rotary settings are read: the
``rope_theta`` + ``rope_scaling`` keys of published checkpoints (transformers 4) and the
``rope_parameters`` dict transformers 5 writes; :func:`to_hf` writes both, so either version
loads the folder. Anything the decoder cannot express (another activation, an output-projection
bias, per-layer sliding windows, another rope type, router jitter noise) is refused by name,
never ignored.

Mixtral's ``router_aux_loss_coef`` weighs one load-balancing loss pooled over all layers,
``top_k`` times Switch's (:class:`jmp.layers.MoEAux`); jmp adds one Switch loss per layer, so
it becomes ``aux_loss_weight = router_aux_loss_coef * top_k / n_layers`` (the same gradient
scale; transformers adds it only with ``output_router_logits``), and Mixtral has no router z
loss (``z_loss_weight=0``). Pass ``aux_loss_weight=`` to :func:`from_hf` to choose otherwise.

Example:
    >>> hf = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 128, "hidden_size": 64,
    ...       "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 8,
    ...       "num_key_value_heads": 2, "rope_theta": 1e6}
    >>> cfg = from_hf(hf)
    >>> cfg.n_kv_heads, cfg.qkv_bias, cfg.rope_theta
    (2, True, 1000000.0)
    >>> to_hf(cfg, base=hf)["architectures"]
    ['Qwen2ForCausalLM']
    >>> moe = from_hf({**hf, "architectures": ["MixtralForCausalLM"], "num_local_experts": 8,
    ...                "num_experts_per_tok": 2, "router_aux_loss_coef": 0.02})
    >>> moe.n_experts, moe.top_k, moe.qkv_bias, round(moe.aux_loss_weight, 6)
    (8, 2, False, 0.02)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from jmp.errors import ConfigError

if TYPE_CHECKING:
    from jmp.models.llama import LlamaConfig


@dataclass(frozen=True)
class Architecture:
    """What one Hugging Face architecture name means for the decoder."""

    name: str
    model_type: str
    qkv_bias: bool  # Qwen2 always has q/k/v biases; Llama's attention_bias also biases o_proj
    sliding: bool  # reads a sliding attention window
    experts: bool = False  # a mixture of experts on every block (Mixtral)


ARCHITECTURES: Mapping[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("LlamaForCausalLM", "llama", qkv_bias=False, sliding=False),
        Architecture("MistralForCausalLM", "mistral", qkv_bias=False, sliding=True),
        Architecture("Qwen2ForCausalLM", "qwen2", qkv_bias=True, sliding=True),
        Architecture("MixtralForCausalLM", "mixtral", qkv_bias=False, sliding=True, experts=True),
    )
}
SUPPORTED = ", ".join(ARCHITECTURES)

#: The training length given to a loaded model when none is asked for: HF's
#: ``max_position_embeddings`` is the longest context it was trained for (131072 for Mistral),
#: not a sensible default sequence length (RoPE itself has no length limit).
DEFAULT_SEQ_LEN = 2048

_DTYPES = ("float32", "bfloat16", "float16")
_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)


def architecture_of(hf: Mapping[str, Any], /, *, source: str = "config.json") -> Architecture:
    """The supported :class:`Architecture` a config names, or a one-line ConfigError."""
    names = hf.get("architectures") or []
    if not names and hf.get("model_type"):
        by_type = {a.model_type: a for a in ARCHITECTURES.values()}
        if hf["model_type"] in by_type:
            return by_type[hf["model_type"]]
        names = [f"model_type {hf['model_type']!r}"]
    if len(names) == 1 and names[0] in ARCHITECTURES:
        return ARCHITECTURES[names[0]]
    named = ", ".join(map(str, names)) or "none"
    raise ConfigError(
        f"Unsupported architecture {named} in {source}. Fix: give a folder of one of the "
        f"supported architectures: {SUPPORTED}."
    )


def checkpoint_dtype(hf: Mapping[str, Any], /) -> str | None:
    """The dtype a config records (``dtype`` in transformers 5, ``torch_dtype`` before)."""
    value = hf.get("dtype") or hf.get("torch_dtype")
    return str(value).removeprefix("torch.") if value else None


def _rope(hf: Mapping[str, Any], problems: list[str]) -> tuple[float, Any]:
    params = dict(hf.get("rope_parameters") or {})
    theta = float(hf.get("rope_theta") or params.get("rope_theta") or 10000.0)
    scaling = hf.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        problems.append(
            f"rope_type {kind!r} is not supported (only the default and 'llama3' rope scaling)"
        )
        return theta, None
    from jmp.layers.rope import RopeScaling

    fields = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [f for f in fields if f not in scaling]
    if missing:
        problems.append(f"llama3 rope scaling lacks {', '.join(missing)}")
        return theta, None
    return theta, RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )


def _sliding_window(hf: Mapping[str, Any], arch: Architecture, problems: list[str]) -> int | None:
    if arch.model_type in ("mistral", "mixtral"):
        return hf.get("sliding_window")
    if arch.model_type != "qwen2" or not hf.get("use_sliding_window"):
        return None
    # Qwen2 slides only in some layers (layer_types / max_window_layers); one stacked, scanned
    # block has one attention pattern, so only "every layer slides" can be loaded.
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types") or [
        "sliding_attention" if i >= hf.get("max_window_layers", n) else "full_attention"
        for i in range(n)
    ]
    if set(types) == {"sliding_attention"}:
        return hf.get("sliding_window")
    if "sliding_attention" in types:
        problems.append(
            "a sliding window in only some layers (use_sliding_window with layer_types "
            f"{sorted(set(types))}) is not supported: the scanned blocks share one pattern"
        )
    return None


def _unsupported(hf: Mapping[str, Any], arch: Architecture) -> list[str]:
    problems = []
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
    if arch.model_type == "llama" and hf.get("attention_bias"):
        problems.append("attention_bias=true (a bias on o_proj too) is not supported")
    if hf.get("mlp_bias"):
        problems.append("mlp_bias=true is not supported")
    if arch.experts and hf.get("router_jitter_noise"):
        problems.append(
            f"router_jitter_noise={hf['router_jitter_noise']} is not supported (jmp's router "
            f"adds no noise: set it to 0.0)"
        )
    return problems


#: Mixtral's keys for the experts, beyond the dense ones.
_EXPERT_KEYS = ("num_local_experts", "num_experts_per_tok")


def _expert_fields(
    hf: Mapping[str, Any], arch: Architecture, problems: list[str]
) -> dict[str, Any]:
    """The :class:`~jmp.models.experts.ExpertsConfig` fields of a Mixtral config."""
    if not arch.experts:
        return {}
    n, k = hf["num_local_experts"], hf["num_experts_per_tok"]
    if not (_count(n) and _count(k) and k <= n):
        problems.append(
            f"num_experts_per_tok={k!r} and num_local_experts={n!r} must be ints with "
            f"1 <= num_experts_per_tok <= num_local_experts"
        )
        return {}
    coef = float(hf.get("router_aux_loss_coef", 0.001))  # transformers' default
    return {
        "n_experts": n,
        "top_k": k,
        "moe_every": 1,
        "aux_loss_weight": coef * k / hf["num_hidden_layers"],
        "z_loss_weight": 0.0,
    }


def _count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def from_hf(
    hf: Mapping[str, Any],
    /,
    *,
    source: str = "config.json",
    dtype: str | None = None,
    **overrides: Any,
) -> LlamaConfig:
    """The :class:`LlamaConfig` of a Hugging Face config dict.

    Args:
        hf: the parsed ``config.json``.
        source: where it came from, for error messages.
        dtype: parameter and compute dtype; default: the one the config records, else float32.
        overrides: other :class:`LlamaConfig` fields (``seq_len``, ``remat``, ``mode``...);
            ``seq_len`` defaults to ``min(max_position_embeddings, DEFAULT_SEQ_LEN)``.

    Raises:
        ConfigError: one line naming an unsupported architecture, missing key or feature.
    """
    from jmp.models.llama import LlamaConfig

    arch = architecture_of(hf, source=source)
    required = _REQUIRED + (_EXPERT_KEYS if arch.experts else ())
    missing = [k for k in required if hf.get(k) is None]
    if missing:
        raise ConfigError(
            f"{source} lacks {', '.join(missing)} (needed for {arch.name}). Fix: give a "
            f"complete config.json (as transformers' save_pretrained writes it)."
        )
    problems = _unsupported(hf, arch)
    theta, scaling = _rope(hf, problems)
    window = _sliding_window(hf, arch, problems)
    experts = _expert_fields(hf, arch, problems)
    if problems:
        raise ConfigError(
            f"Cannot load {arch.name} from {source}: {'; '.join(problems)}. Fix: jmp's Llama "
            f"decoder has only these features; fine-tune such a model with transformers itself."
        )
    dtype = dtype or checkpoint_dtype(hf) or "float32"
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported. Fix: one of {', '.join(_DTYPES)}.")
    fields: dict[str, Any] = {
        "vocab_size": hf["vocab_size"],
        "d_model": hf["hidden_size"],
        "n_layers": hf["num_hidden_layers"],
        "n_heads": hf["num_attention_heads"],
        "n_kv_heads": hf.get("num_key_value_heads") or hf["num_attention_heads"],
        "head_dim": hf.get("head_dim"),
        "d_ff": hf["intermediate_size"],
        "seq_len": min(hf.get("max_position_embeddings") or DEFAULT_SEQ_LEN, DEFAULT_SEQ_LEN),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "qkv_bias": arch.qkv_bias,
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "sliding_window": window,
        "dtype": dtype,
        "param_dtype": dtype,
        **experts,
    }
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(LlamaConfig)})
    if unknown:
        raise ConfigError(
            f"Unknown LlamaConfig field(s) {', '.join(unknown)}. Fix: use one of "
            f"{', '.join(f.name for f in dataclasses.fields(LlamaConfig))}."
        )
    return LlamaConfig(**{**fields, **overrides})


def default_architecture(cfg: LlamaConfig, /) -> Architecture:
    """The architecture a config without a source folder is written as."""
    if cfg.n_experts:
        return ARCHITECTURES["MixtralForCausalLM"]
    if cfg.qkv_bias:
        return ARCHITECTURES["Qwen2ForCausalLM"]
    if cfg.sliding_window is not None:
        return ARCHITECTURES["MistralForCausalLM"]
    return ARCHITECTURES["LlamaForCausalLM"]


def _check_expressible(cfg: LlamaConfig, arch: Architecture) -> None:
    problems = []
    if cfg.qkv_bias != arch.qkv_bias:
        problems.append(
            f"qkv_bias={cfg.qkv_bias} but {arch.name} has "
            f"{'q/k/v biases' if arch.qkv_bias else 'no q/k/v biases'}"
        )
    if cfg.sliding_window is not None and not arch.sliding:
        problems.append(f"sliding_window={cfg.sliding_window} but {arch.name} has no window")
    if bool(cfg.n_experts) != arch.experts:
        problems.append(
            f"n_experts={cfg.n_experts} but {arch.name} "
            f"{'is a mixture of experts' if arch.experts else 'has no experts'}"
        )
    if cfg.n_experts and cfg.n_shared_experts:
        problems.append(f"n_shared_experts={cfg.n_shared_experts} but {arch.name} has none")
    if cfg.n_experts and cfg.expert_activation != "swiglu":
        problems.append(
            f"expert_activation={cfg.expert_activation!r} but {arch.name}'s experts are SwiGLU"
        )
    if problems:
        raise ConfigError(
            f"Cannot save as {arch.name}: {'; '.join(problems)}. Fix: save as "
            f"{default_architecture(cfg).name} (architecture=None) or change the config."
        )


def _rope_fields(cfg: LlamaConfig) -> dict[str, Any]:
    scaling = None
    if cfg.rope_scaling is not None:
        scaling = {"rope_type": "llama3", **dataclasses.asdict(cfg.rope_scaling)}
    params = {"rope_theta": cfg.rope_theta, **(scaling or {"rope_type": "default"})}
    return {"rope_theta": cfg.rope_theta, "rope_scaling": scaling, "rope_parameters": params}


def _window_fields(cfg: LlamaConfig, arch: Architecture) -> dict[str, Any]:
    if arch.model_type in ("mistral", "mixtral"):
        return {"sliding_window": cfg.sliding_window}
    if arch.model_type == "qwen2":
        sliding = cfg.sliding_window is not None
        kind = "sliding_attention" if sliding else "full_attention"
        return {
            "use_sliding_window": sliding,
            "sliding_window": cfg.sliding_window,
            "max_window_layers": 0 if sliding else cfg.n_layers,
            "layer_types": [kind] * cfg.n_layers,
        }
    return {}


def _expert_keys(cfg: LlamaConfig, arch: Architecture) -> dict[str, Any]:
    """Mixtral's expert keys (the inverse of :func:`_expert_fields`); the experts' width is
    ``intermediate_size`` (a Mixtral block has no dense MLP)."""
    if not arch.experts:
        return {}
    coef = cfg.aux_loss_weight * cfg.n_layers / cfg.top_k
    return {
        "intermediate_size": cfg.expert_width(cfg.d_ff),
        "num_local_experts": cfg.n_experts,
        "num_experts_per_tok": cfg.top_k,
        "router_aux_loss_coef": float(f"{coef:.12g}"),  # 0.02, not 0.020000000000000004
        "router_jitter_noise": 0.0,
    }


def to_hf(
    cfg: LlamaConfig,
    /,
    *,
    architecture: str | None = None,
    base: Mapping[str, Any] | None = None,
    dtype: str | None = None,
) -> dict[str, Any]:
    """A Hugging Face ``config.json`` dict for ``cfg``.

    Args:
        architecture: the HF class name; default: ``base``'s, else the one ``cfg`` needs
            (Mixtral with experts, Qwen2 with q/k/v biases, Mistral with a sliding window,
            else Llama).
        base: a config to start from (the loaded folder's): its other keys (token ids,
            ``max_position_embeddings``...) are kept, the model's shape comes from ``cfg``.
        dtype: the dtype recorded (the saved tensors'); default ``cfg.param_dtype``.
    """
    base = dict(base or {})
    if architecture is None and base:
        arch = architecture_of(base, source="the base config")
    elif architecture is None:
        arch = default_architecture(cfg)
    else:
        arch = architecture_of({"architectures": [architecture]}, source="architecture=")
    _check_expressible(cfg, arch)
    dtype = dtype or cfg.param_dtype
    base.pop("torch_dtype", None)  # transformers 5 reads `dtype`; one key, not two that differ
    return {
        **base,
        "architectures": [arch.name],
        "model_type": arch.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim or cfg.d_model // cfg.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": max(base.get("max_position_embeddings") or 0, cfg.seq_len),
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        **({"attention_bias": False, "mlp_bias": False} if arch.model_type == "llama" else {}),
        **_rope_fields(cfg),
        **_window_fields(cfg, arch),
        **_expert_keys(cfg, arch),
        "dtype": dtype,
    }
