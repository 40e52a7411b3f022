"""Reference models built from :mod:`jmp.layers`: GPT (learned positions) and Llama (RoPE, GQA)."""

from jmp.models.gpt import GPT, MODEL_SIZES, GPTConfig
from jmp.models.llama import LLAMA_SIZES, Llama, LlamaConfig

__all__ = ["GPT", "LLAMA_SIZES", "MODEL_SIZES", "GPTConfig", "Llama", "LlamaConfig"]
