"""Hugging Face checkpoints in and out: Llama, Mistral, Qwen2 and Mixtral folders as sharded
jmp models (a Mixtral is a :class:`jmp.models.Llama` with a mixture of experts on every block).

- :func:`load` reads a local folder (``config.json``, safetensors, optional ``tokenizer.json``)
  into a :class:`jmp.models.Llama` whose parameters are born sharded: each device's block is
  read straight from the files (:mod:`jmp.hf.loader`).
- :func:`save` writes a model back as a folder ``transformers.AutoModelForCausalLM`` loads
  (:mod:`jmp.hf.writer`), one tensor at a time.
- :func:`load_tokenizer` gives the folder's ``tokenizer.json`` tokenizer, or bytes
  (:mod:`jmp.hf.tokenizer`).
- :mod:`jmp.hf.config` converts ``config.json`` <-> :class:`jmp.models.LlamaConfig`;
  :mod:`jmp.hf.names` is the one table of tensor names and layouts.

Nothing is downloaded: paths are local folders. ``torch`` and ``transformers`` are not needed.

Example (a CLI's ``--init hf:PATH`` and ``export --hf OUT`` in four lines):
    >>> import tempfile
    >>> from jmp.models.llama import Llama, LlamaConfig
    >>> cfg = LlamaConfig.named("tiny")
    >>> model = jmp.shard_init(lambda r: Llama(cfg, rngs=r, mesh=mesh, rules=rules), mesh, rules)
    >>> folder = jmp.hf.save(model, tempfile.mkdtemp())       # an HF folder (LlamaForCausalLM)
    >>> loaded = jmp.hf.load(folder, mesh, jmp.rules.preset("fsdp_tp", mesh))
    >>> loaded.architecture, loaded.tokenizer.kind, loaded.config.n_kv_heads
    ('LlamaForCausalLM', 'bytes', 2)
    >>> out = jmp.hf.save(loaded.model, tempfile.mkdtemp(), like=loaded)
"""

from jmp.hf.config import ARCHITECTURES as ARCHITECTURES
from jmp.hf.config import SUPPORTED as SUPPORTED
from jmp.hf.config import from_hf as from_hf
from jmp.hf.config import to_hf as to_hf
from jmp.hf.loader import Loaded as Loaded
from jmp.hf.loader import config_of as config_of
from jmp.hf.loader import load as load
from jmp.hf.tokenizer import ByteTokenizer as ByteTokenizer
from jmp.hf.tokenizer import HFTokenizer as HFTokenizer
from jmp.hf.tokenizer import Tokenizer as Tokenizer
from jmp.hf.tokenizer import load_tokenizer as load_tokenizer
from jmp.hf.writer import save as save

__all__ = [
    "ARCHITECTURES",
    "SUPPORTED",
    "ByteTokenizer",
    "HFTokenizer",
    "Loaded",
    "Tokenizer",
    "config_of",
    "from_hf",
    "load",
    "load_tokenizer",
    "save",
    "to_hf",
]
