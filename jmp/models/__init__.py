"""Reference models built from :mod:`jmp.layers`."""

from jmp.models.gpt import GPT, MODEL_SIZES, GPTConfig

__all__ = ["GPT", "GPTConfig", "MODEL_SIZES"]
