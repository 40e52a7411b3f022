"""Write a :class:`jmp.models.Llama` as a Hugging Face folder that ``transformers`` loads.

The folder holds ``config.json`` (:func:`jmp.hf.config.to_hf`: the architecture and
``model_type`` of the folder it was loaded from when given ``like=``, the dtype recorded),
the weights as safetensors, and the tokenizer when one is given. Above ``max_shard_bytes`` the
weights are split into ``model-0000k-of-0000n.safetensors`` files with a
``model.safetensors.index.json``, as ``save_pretrained`` does.

One tensor at a time: each HF tensor (one layer of one stacked parameter; one expert of one
layer for a Mixtral's experts, in the Hub's per-expert layout that ``save_pretrained`` writes)
is gathered from the devices by a small compiled slice, written, and dropped. The safetensors
header is computed from the shapes first, so the file is written as a stream and no file's
worth of tensors is ever in host memory. Several processes: every process takes part in the
gathers, the first one writes.

Example:
    >>> import tempfile, os
    >>> from jmp.models.llama import Llama, LlamaConfig
    >>> cfg = LlamaConfig.named("tiny")
    >>> model = jmp.shard_init(lambda r: Llama(cfg, rngs=r, mesh=mesh, rules=rules), mesh, rules)
    >>> folder = save(model, tempfile.mkdtemp())
    >>> sorted(os.listdir(folder))
    ['config.json', 'model.safetensors']
"""

from __future__ import annotations

import functools
import glob
import json
import math
import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jmp.errors import ConfigError
from jmp.hf import names
from jmp.hf.config import to_hf
from jmp.hf.files import CONFIG, INDEX, SINGLE, read_config
from jmp.hf.tokenizer import HFTokenizer, Tokenizer

#: Above this many bytes of weights the folder gets several files and an index (the size of
#: one file; save_pretrained's default is 5 GB as well).
MAX_SHARD_BYTES = 5 * 2**30

#: The dtypes :func:`save` writes (safetensors' F32, BF16, F16).
SAVE_DTYPES = ("float32", "bfloat16", "float16")

_CODES = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.float64): "F64",
}


@dataclass(frozen=True)
class _Tensor:
    """One HF tensor to write: its name, shape, dtype and how to fetch it."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fetch: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@functools.cache
def _gather(sharding: Any, dtype: Any) -> Callable[..., jax.Array]:
    """A compiled ``x[i, j] -> replicated`` for arrays of ``sharding``: one layer at a time."""
    out = NamedSharding(sharding.mesh, PartitionSpec()) if hasattr(sharding, "mesh") else None
    return jax.jit(lambda x, *i: x[i].astype(dtype), out_shardings=out)


def _fetch(entry: names.Entry, x: jax.Array, where: tuple[int, ...], dtype: np.dtype) -> Any:
    """The HF tensor at ``where`` (layer, expert) of ``x`` (all of it for ``()``) on this host."""
    layer = _gather(x.sharding, jnp.dtype(dtype))(x, *(np.int32(i) for i in where))
    return names.to_hf(entry, np.asarray(layer.addressable_data(0)))


def _parts(
    entry: names.Entry, shape: tuple[int, ...], n_layers: int, stages: int
) -> tuple[list[tuple[str, tuple[int, ...]]], tuple[int, ...]]:
    """(HF name, index of its slice of the jmp parameter) of each HF tensor of ``entry``, and
    their shape. The stacked dims are ``(layers,)`` or ``(stage, layers)``; a per-expert entry's
    expert dim follows them."""
    if not entry.per_layer:
        return [(entry.hf_name(), ())], names.hf_shape(entry, shape)
    per = n_layers // stages
    layers = [(i, (i,) if stages == 1 else (i // per, i % per)) for i in range(n_layers)]
    skip = 1 if stages == 1 else 2
    if not entry.per_expert:
        return [(entry.hf_name(i), where) for i, where in layers], names.hf_shape(
            entry, shape[skip:]
        )
    experts = range(shape[skip])
    parts = [(entry.hf_name(i, j), (*where, j)) for i, where in layers for j in experts]
    return parts, names.hf_shape(entry, shape[skip + 1 :])


def _tensors(model: Any, dtype: str | None) -> list[_Tensor]:
    """Every HF tensor of ``model``, in the table's order, each layer (and expert) its own."""
    flat = {".".join(map(str, k)): v for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    unknown = sorted(set(flat) - set(names.ENTRIES))
    if unknown:  # never drop a parameter silently
        raise ConfigError(
            f"jmp.hf has no Hugging Face name for parameter(s) {', '.join(unknown)}. Fix: add "
            f"them to jmp/hf/names.py."
        )
    tensors = []
    for path, entry in names.ENTRIES.items():
        if path not in flat:
            continue  # biases without qkv_bias, the head when tied, experts of a dense model
        value = flat[path].get_value()
        out = np.dtype(dtype) if dtype else np.dtype(value.dtype)
        parts, shape = _parts(entry, tuple(value.shape), model.cfg.n_layers, model.num_stages)
        for name, where in parts:
            fetch = functools.partial(_fetch, entry, value, where, out)
            tensors.append(_Tensor(name, shape, out, fetch))
    return tensors


def _split(tensors: list[_Tensor], max_bytes: int) -> list[list[_Tensor]]:
    files: list[list[_Tensor]] = [[]]
    size = 0
    for t in tensors:
        if files[-1] and size + t.nbytes > max_bytes:
            files.append([])
            size = 0
        files[-1].append(t)
        size += t.nbytes
    return files


def write_safetensors(path: str, tensors: list[_Tensor], /, *, write: bool = True) -> None:
    """Stream ``tensors`` into one safetensors file, fetching each only when it is written.

    The format: an 8-byte little-endian header length, the JSON header (each tensor's dtype,
    shape and byte range; padded to 8 bytes), then the tensors' bytes back to back.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        if t.dtype not in _CODES:
            raise ConfigError(f"Cannot save {t.name} as {t.dtype}. Fix: dtype in {list(_CODES)}.")
        header[t.name] = {
            "dtype": _CODES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") if write else open(os.devnull, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for t in tensors:
            data = t.fetch()  # every process gathers; only the writer keeps the bytes
            assert data.shape == t.shape and data.dtype == t.dtype, (t.name, data.shape)
            f.write(np.ascontiguousarray(data).view(np.uint8).tobytes())
            del data
    if write:
        os.replace(tmp, path)


def _remove_old_weights(folder: str) -> None:
    """save_pretrained's rule: weights of an earlier save would mix with the new ones."""
    for old in [SINGLE, INDEX, *map(os.path.basename, glob.glob(f"{folder}/model-*-of-*"))]:
        if os.path.exists(os.path.join(folder, old)):
            os.remove(os.path.join(folder, old))


def _base_config(like: Any) -> Mapping[str, Any] | None:
    if like is None or isinstance(like, Mapping):
        return like
    if isinstance(like, str | os.PathLike):
        return read_config(like)
    hf_config = getattr(like, "hf_config", None)  # a jmp.hf.Loaded
    if isinstance(hf_config, Mapping):
        return hf_config
    raise ConfigError(
        f"save(like=...) takes a jmp.hf.Loaded, a config dict or a folder, got "
        f"{type(like).__name__}. Fix: pass what jmp.hf.load returned."
    )


def save(
    model: Any,
    path: str | os.PathLike,
    /,
    *,
    dtype: str | None = None,
    like: Any = None,
    architecture: str | None = None,
    tokenizer: Tokenizer | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> str:
    """Write ``model`` (a :class:`~jmp.models.Llama`, sharded or not) as an HF folder.

    Args:
        model: the model; its parameters may be sharded over any mesh, pipelined or not.
        path: the folder (created if needed); weights of an earlier save in it are replaced.
        dtype: the saved tensors' dtype (``'bfloat16'``...); default: the parameters' own.
        like: a :class:`jmp.hf.Loaded`, a ``config.json`` dict or an HF folder whose
            architecture and other settings (token ids...) the config keeps.
        architecture: the HF class to write; default ``like``'s, else the one the config
            needs (Mixtral with experts, Qwen2 with q/k/v biases, Mistral with a window, else
            Llama). A mixture of experts is written as Mixtral, its experts one tensor each;
            a ``capacity_factor`` is a training setting and is not written (transformers
            runs the experts dropless).
        tokenizer: written beside the weights when it is a ``tokenizer.json`` one.
        max_shard_bytes: the largest file; above it the weights are split with an index.

    Returns:
        The folder's path.
    """
    from jmp.models.llama import Llama

    if not isinstance(model, Llama):
        raise ConfigError(
            f"jmp.hf.save writes jmp.models.Llama models, got {type(model).__name__}. Fix: "
            f"build the model as Llama(LlamaConfig(...)) (or load it with jmp.hf.load)."
        )
    if not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise ConfigError(f"max_shard_bytes={max_shard_bytes!r} must be a positive int.")
    if dtype is not None and dtype not in SAVE_DTYPES:
        raise ConfigError(
            f"Cannot save as dtype={dtype!r}. Fix: one of {', '.join(SAVE_DTYPES)}, or None "
            f"for the parameters' own."
        )
    folder = os.fspath(path)
    # the config first: a model the architecture cannot express is refused by what it lacks
    # (shared experts...), not by the parameters that have no HF name
    saved = dtype or str(np.dtype(model.embed.embedding.get_value().dtype))
    config = to_hf(model.cfg, architecture=architecture, base=_base_config(like), dtype=saved)
    tensors = _tensors(model, dtype)
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(folder, exist_ok=True)
        _remove_old_weights(folder)
    files = _split(tensors, max_shard_bytes)
    file_names = (
        [SINGLE]
        if len(files) == 1
        else [f"model-{k + 1:05d}-of-{len(files):05d}.safetensors" for k in range(len(files))]
    )
    for name, group in zip(file_names, files, strict=True):
        write_safetensors(os.path.join(folder, name), group, write=writer)
    if not writer:
        return folder
    if len(files) > 1:
        index = {
            "metadata": {"total_size": sum(t.nbytes for t in tensors)},
            "weight_map": {t.name: n for n, g in zip(file_names, files, strict=True) for t in g},
        }
        _write_json(os.path.join(folder, INDEX), index)
    _write_json(os.path.join(folder, CONFIG), config)
    if isinstance(tokenizer, HFTokenizer):
        tokenizer.save(folder)
    return folder


def _write_json(path: str, data: Any) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(path + ".tmp", path)
