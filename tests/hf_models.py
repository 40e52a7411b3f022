"""Tiny random Hugging Face models, built locally with transformers (nothing is downloaded).

Each :data:`SPECS` entry is a small config of one architecture and one feature to check:
grouped-query attention (8 heads, 2 kv heads), Llama 3 rope scaling with tied embeddings,
Mistral's sliding window (shorter than the test sequences), Qwen2's q/k/v biases. Every
parameter is drawn at random, norms and biases included (transformers starts norms at one and
biases at zero, which would hide a swapped or missing tensor), with a scale that gives logits
of order one, so a 1e-4 tolerance means something.

``transformers`` and ``torch`` are imported here, never by ``jmp``.
"""

from __future__ import annotations

import os

import numpy as np

VOCAB = 128
SEQ = 16  # > Mistral's window below

_BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)

#: name -> (transformers config class name, its keyword arguments)
SPECS: dict[str, tuple[str, dict]] = {
    "llama_gqa": ("LlamaConfig", dict(_BASE, rope_theta=10000.0, tie_word_embeddings=False)),
    "llama3_tied": (
        "LlamaConfig",
        dict(
            _BASE,
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8,
            },
        ),
    ),
    "mistral_window": (
        "MistralConfig",
        dict(_BASE, sliding_window=5, rope_theta=10000.0, tie_word_embeddings=False),
    ),
    "qwen2_bias": (
        "Qwen2Config",
        dict(_BASE, rope_theta=1e6, tie_word_embeddings=True, use_sliding_window=False),
    ),
}
#: Mixtures of experts, kept apart from :data:`SPECS` (whose every entry tests/test_hf.py loads
#: under every strategy, pipelines included, where experts do not run yet). Mixtral: 4 experts,
#: 2 per token, narrow experts, Mistral's window shorter than the test sequences.
MOE_SPECS: dict[str, tuple[str, dict]] = {
    "mixtral": (
        "MixtralConfig",
        dict(
            _BASE,
            intermediate_size=32,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=5,
            rope_theta=10000.0,
            router_aux_loss_coef=0.02,
            tie_word_embeddings=False,
        ),
    ),
}
ARCHITECTURE = {
    "LlamaConfig": "LlamaForCausalLM",
    "MistralConfig": "MistralForCausalLM",
    "Qwen2Config": "Qwen2ForCausalLM",
    "MixtralConfig": "MixtralForCausalLM",
}


def randomize(model, *, seed: int = 0, scale: float = 0.15) -> None:
    """Draw every parameter: norms around one, the rest normal with std ``scale``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif "embed" in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(scale * noise)


def build_model(name: str, *, seed: int = 0, **overrides):
    """The random ``transformers`` model of :data:`SPECS` (or :data:`MOE_SPECS`) ``[name]``,
    float32, eval mode."""
    import torch
    import transformers

    config_class, kwargs = SPECS[name] if name in SPECS else MOE_SPECS[name]
    config = getattr(transformers, config_class)(**{**kwargs, **overrides})
    config.architectures = [ARCHITECTURE[config_class]]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        config, dtype=torch.float32, attn_implementation="eager"
    )
    randomize(model, seed=seed)
    return model.eval()


def save(model, folder: str, *, max_shard_size: str | None = None, **kwargs) -> str:
    """``save_pretrained`` into ``folder`` (sharded with an index below ``max_shard_size``;
    other ``save_pretrained`` options as given, e.g. ``save_original_format=False``)."""
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(folder, **kwargs)
    return folder


def build(name: str, folder: str, *, seed: int = 0, max_shard_size: str | None = None, **kw):
    """Build :func:`build_model` and save it to ``folder``; returns the model."""
    model = build_model(name, seed=seed, **kw)
    save(model, folder, max_shard_size=max_shard_size)
    return model


def load(folder: str):
    """What a user of ``transformers`` does with a folder: ``from_pretrained`` (float32)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


def load_native(folder: str):
    """``from_pretrained`` in the dtype the folder records (transformers' default, "auto")."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder)


def logits(model, tokens: np.ndarray) -> np.ndarray:
    """transformers' own logits of ``tokens`` (batch, seq) as float32 numpy."""
    import torch

    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits
    return out.float().numpy()


def tokens(batch: int, *, seq: int = SEQ, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(batch, seq)).astype(np.int32)


def train_tokenizer(folder: str, *, vocab_size: int = 300, eos: str = "</s>") -> str:
    """A byte-level BPE trained on a few KB of local text, saved as ``folder/tokenizer.json``
    with a ``tokenizer_config.json`` naming ``eos``."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = open(__file__, encoding="utf-8").read()  # a few KB of text that is always here
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eos],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(text.splitlines(), trainer)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": eos, "tokenizer_class": "PreTrainedTokenizerFast"}, f)
    return folder
