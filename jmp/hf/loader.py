"""Load a Hugging Face Llama / Mistral / Qwen2 / Mixtral folder as a sharded
:class:`jmp.models.Llama`.

Parameters go straight into their shardings. The model is built abstractly
(``nnx.eval_shape``: shapes and logical names, no values), the rules turn the names into
shardings, and each device's block of each parameter is read from the safetensors files with
a sliced read: no process ever holds a whole model, nor a whole stacked parameter, in host
memory. The most it holds at once is one device's block of one parameter plus the slice of one
HF tensor being copied into it (a replicated block is read once and copied to every device that
holds it). A Mixtral's experts are read the same way from either of HF's layouts (one tensor per
expert, or transformers 5's fused 3-D tensors; :func:`jmp.hf.names.entries_for`): under ``ep``
each device reads only the experts it holds.

Why not ``jax.make_array_from_callback``: it collects every device's block of a parameter on
the host before copying any to the devices, so a stacked parameter (``n_layers`` HF tensors)
would be whole in host memory. Here each block goes to its devices as soon as it is read, and
``jax.make_array_from_single_device_arrays`` assembles the global array.

Every way the folder can disagree with the model is refused before any device memory is used,
in one line: an unsupported architecture, a missing or truncated file, a tensor whose shape
does not match the config, a tensor name that is not mapped, a missing tensor.

Example (a folder written by :func:`jmp.hf.save`; ``transformers``' ``save_pretrained``
writes the same layout):
    >>> import tempfile
    >>> from jmp.models.llama import Llama, LlamaConfig
    >>> cfg = LlamaConfig.named("tiny", tie_embeddings=True)
    >>> folder = jmp.hf.save(Llama(cfg, rngs=nnx.Rngs(0)), tempfile.mkdtemp())
    >>> loaded = load(folder, mesh, rules)                 # dp_tp on data=2,model=4
    >>> loaded.architecture, loaded.model.blocks.attn.q.kernel.sharding.spec
    ('LlamaForCausalLM', P(None, None, 'model'))
    >>> loaded.model.blocks.attn.k.kernel.sharding.spec    # 2 kv heads < model=4: replicated
    P()
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding

from jmp.errors import ConfigError
from jmp.hf import names
from jmp.hf.config import architecture_of, from_hf
from jmp.hf.files import Checkpoint, read_config
from jmp.hf.tokenizer import HFTokenizer, Tokenizer, load_tokenizer
from jmp.rules import Rules, axes_tuple
from jmp.sharding import named_shardings

if TYPE_CHECKING:
    from jmp.models.llama import Llama, LlamaConfig


@dataclass
class Loaded:
    """What :func:`load` gives: the sharded model and what came with it.

    Attributes:
        model: the :class:`~jmp.models.Llama`, its parameters sharded by the rules.
        config: its :class:`~jmp.models.LlamaConfig`.
        architecture: the HF class name (``'LlamaForCausalLM'``...): :func:`jmp.hf.save`
            writes it back when given ``like=loaded``.
        hf_config: the folder's ``config.json`` as read.
        tokenizer: the folder's ``tokenizer.json``, or bytes when it has none.
        path: the folder.
    """

    model: Llama
    config: LlamaConfig
    architecture: str
    hf_config: dict[str, Any] = field(repr=False)
    tokenizer: Tokenizer = field(repr=False)
    path: str = ""


def config_of(path: str | os.PathLike, /, *, dtype: str | None = None, **overrides: Any) -> Any:
    """The :class:`LlamaConfig` of a folder's ``config.json`` (reads no weights).

    Example:
        >>> import tempfile
        >>> from jmp.models.llama import Llama, LlamaConfig
        >>> folder = jmp.hf.save(Llama(LlamaConfig.named("tiny"), rngs=nnx.Rngs(0)),
        ...                      tempfile.mkdtemp())
        >>> config_of(folder, seq_len=128).n_kv_heads
        2
    """
    path = os.fspath(path)
    source = os.path.join(path, "config.json")
    return from_hf(read_config(path), source=source, dtype=dtype, **overrides)


def stages_of(mesh: Mesh, rules: Rules, /) -> int:
    """How many pipeline stages the rules split the blocks into (1 without a 'stage' rule)."""
    axes = axes_tuple(rules.params_dict.get("stage"))
    return math.prod(int(mesh.shape[a]) for a in axes if a in mesh.shape)


def abstract_model(cfg: Any, mesh: Mesh, rules: Rules, /, *, num_stages: int = 1) -> Llama:
    """The model's shapes and logical names, no values. The mesh and rules decide the k/v
    kernels' names: split over the tensor axis when it divides the kv heads, else replicated."""
    from jmp.models.llama import Llama

    def make() -> Llama:
        return Llama(cfg, rngs=nnx.Rngs(0), num_stages=num_stages, mesh=mesh, rules=rules)

    with nnx.use_eager_sharding(False):  # as jmp.shard_init: names only, no flax sharding
        return nnx.eval_shape(make)


@dataclass(frozen=True)
class _Param:
    """One jmp parameter and how to read any block of it."""

    path: str
    entry: names.Entry
    shape: tuple[int, ...]  # the jmp parameter's, layer dims included
    lead: int  # its number of leading layer dims: 0, 1 (layers) or 2 (stage, layers)
    dtype: Any

    @property
    def experts(self) -> int:
        """The expert dims after the layer dims that index HF tensors: 1 or 0."""
        return int(self.entry.per_expert)

    @property
    def tensor_shape(self) -> tuple[int, ...]:
        """The jmp shape that one HF tensor makes (no layer dims, nor a per-tensor expert)."""
        return self.shape[self.lead + self.experts :]

    def tensors(self, index: Sequence[slice]) -> list[tuple[tuple[int, ...], str]]:
        """(position in the block, HF tensor name) of each HF tensor the block covers."""
        layers = [(where, layer if self.lead else None) for where, layer in self.layers(index)]
        if not self.experts:
            return [(where, self.entry.hf_name(layer)) for where, layer in layers]
        chosen = range(index[self.lead].start, index[self.lead].stop)
        return [
            ((*where, k), self.entry.hf_name(layer, j))
            for where, layer in layers
            for k, j in enumerate(chosen)
        ]

    def all_names(self) -> list[str]:
        """Every HF tensor name the whole parameter is made of."""
        return list(dict.fromkeys(n for _, n in self.tensors([slice(0, n) for n in self.shape])))

    def layers(self, index: Sequence[slice]) -> list[tuple[tuple[int, ...], int]]:
        """(position in the block, HF layer number) of each layer the block covers."""
        if self.lead == 0:
            return [((), 0)]
        if self.lead == 1:
            return [((k,), i) for k, i in enumerate(range(index[0].start, index[0].stop))]
        per = self.shape[1]
        return [
            ((a, b), s * per + j)
            for a, s in enumerate(range(index[0].start, index[0].stop))
            for b, j in enumerate(range(index[1].start, index[1].stop))
        ]


def _path(key: tuple[Any, ...]) -> str:
    return ".".join(str(k) for k in key)


def _plan(
    params: nnx.State, num_stages: int, table: Mapping[str, names.Entry] = names.ENTRIES
) -> list[_Param]:
    plan = []
    for key, variable in nnx.to_flat_state(params):
        path = _path(key)
        entry = table.get(path)
        if entry is None:  # the model grew a parameter this table does not know
            raise ConfigError(
                f"jmp.hf has no Hugging Face name for parameter {path!r}. Fix: add it to "
                f"jmp/hf/names.py."
            )
        lead = 0 if not entry.per_layer else 1 if num_stages == 1 else 2
        value = variable.get_value()
        plan.append(_Param(path, entry, tuple(value.shape), lead, value.dtype))
    return plan


def check_tensors(plan: list[_Param], ckpt: Checkpoint, cfg: Any, source: str) -> None:
    """Every parameter's tensors exist with the config's shapes; every tensor is mapped."""
    wanted: dict[str, _Param] = {}
    for param in plan:
        wanted.update(dict.fromkeys(param.all_names(), param))
    missing = [n for n in wanted if n not in ckpt]
    if missing:
        raise ConfigError(
            f"{source} lacks tensor {missing[0]!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + " that the config's model needs. Fix: a complete checkpoint, or a config.json "
            "that matches it (e.g. tie_word_embeddings, the layer count)."
        )
    for name, param in wanted.items():
        want = names.hf_shape(param.entry, param.tensor_shape)
        if ckpt.shape(name) != want:
            raise ConfigError(
                f"Tensor {name!r} in {ckpt.file_of(name)!r} has shape {ckpt.shape(name)}, but "
                f"config.json needs {want} (jmp {param.path} {param.tensor_shape}). Fix: the "
                f"config.json that belongs to these weights."
            )
    unmapped = [
        n
        for n in ckpt.names()
        if n not in wanted
        and not n.endswith(names.IGNORED_SUFFIXES)
        and not (n == names.ENTRIES["head.kernel"].hf and cfg.tie_embeddings)
    ]
    if unmapped:
        raise ConfigError(
            f"Tensor {unmapped[0]!r} in {ckpt.file_of(unmapped[0])!r} is not mapped to any jmp "
            f"parameter"
            + (f" (nor {len(unmapped) - 1} more)" if len(unmapped) > 1 else "")
            + ". Fix: a folder of a supported architecture whose config.json matches its "
            "weights (the table is jmp/hf/names.py)."
        )


def _normalize(index: Sequence[slice], shape: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape, strict=True))


def _reader(param: _Param, ckpt: Checkpoint) -> Callable[[tuple[slice, ...]], np.ndarray]:
    """``index -> the block of the jmp parameter``, read layer by layer from the files."""

    def read(index: tuple[slice, ...]) -> np.ndarray:
        block_shape = tuple(s.stop - s.start for s in index)
        out = np.empty(block_shape, dtype=param.dtype)
        inner = index[param.lead + param.experts :]
        for where, name in param.tensors(index):
            value = names.from_hf(
                param.entry, lambda s, n=name: ckpt.read(n, s), inner, param.tensor_shape
            )
            out[where] = value.astype(param.dtype, copy=False)
        return out

    return read


def _to_devices(host: np.ndarray, devices: list[Any]) -> list[jax.Array]:
    """Copies of ``host`` on each of ``devices``, finished when this returns."""

    def whole(_index: Any) -> np.ndarray:
        return host

    # make_array_from_callback's batched copy, one device at a time: unlike jax.device_put it
    # neither aliases the host block on XLA:CPU nor keeps a reference to it, so the block is
    # freed when the caller drops it
    copies = [
        jax.make_array_from_callback(host.shape, SingleDeviceSharding(d), whole) for d in devices
    ]
    return jax.block_until_ready(copies)


def place(
    shape: tuple[int, ...], sharding: NamedSharding, read: Callable[[tuple[slice, ...]], Any]
) -> jax.Array:
    """A global array whose every device block is ``read(index)``, one block in host memory at
    a time; a block several devices hold is read once."""
    blocks: dict[tuple[tuple[int, int], ...], tuple[tuple[slice, ...], list[Any]]] = {}
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        assert index is not None  # a NamedSharding gives every device an index
        index = _normalize(index, shape)
        key = tuple((s.start, s.stop) for s in index)
        blocks.setdefault(key, (index, []))[1].append(device)
    arrays = []
    for index, devices in blocks.values():
        arrays += _to_devices(read(index), devices)
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def load(
    path: str | os.PathLike,
    mesh: Mesh,
    rules: Rules,
    /,
    *,
    dtype: str | None = None,
    num_stages: int | None = None,
    **overrides: Any,
) -> Loaded:
    """Build the sharded :class:`~jmp.models.Llama` of a local Hugging Face folder.

    Args:
        path: a folder with ``config.json`` and ``model.safetensors`` (or the shards named by
            ``model.safetensors.index.json``), optionally ``tokenizer.json``.
        mesh: the device mesh.
        rules: the strategy's rules (``jmp.rules.preset("fsdp_tp", mesh)``).
        dtype: parameter (and compute) dtype; default: the dtype config.json records.
        num_stages: pipeline stages; default: the size of the mesh axes the 'stage' rule
            names (1 without pipelining). With stages the blocks are ``(stage, layers, ...)``.
        overrides: other :class:`~jmp.models.LlamaConfig` fields (``seq_len``, ``remat``,
            ``mode``).

    Returns:
        :class:`Loaded`: ``.model``, ``.config``, ``.architecture``, ``.tokenizer``...

    Raises:
        ConfigError: one line naming the file, tensor or setting that is wrong.
    """
    path = os.fspath(path)
    hf = read_config(path)
    source = os.path.join(path, "config.json")
    cfg = from_hf(hf, source=source, dtype=dtype, **overrides)
    ckpt = Checkpoint.open(path)
    tokenizer = load_tokenizer(path)
    if isinstance(tokenizer, HFTokenizer) and tokenizer.vocab_size > cfg.vocab_size:
        raise ConfigError(
            f"The tokenizer of {path!r} has {tokenizer.vocab_size} ids, more than the model's "
            f"vocab_size={cfg.vocab_size}. Fix: the tokenizer.json that belongs to this model."
        )
    stages = stages_of(mesh, rules) if num_stages is None else num_stages
    abstract = abstract_model(cfg, mesh, rules, num_stages=stages)
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ConfigError(
            "jmp.hf.load reads parameters only, but the model has other state "
            f"{[_path(k) for k, _ in nnx.to_flat_state(rest)]}. Fix: jmp/hf/loader.py."
        )
    plan = _plan(params, stages, names.entries_for(ckpt.names()))
    check_tensors(plan, ckpt, cfg, source=path)
    shardings = dict(nnx.to_flat_state(named_shardings(params, rules, mesh)))
    variables = dict(nnx.to_flat_state(params))
    placed = []
    for param in plan:
        key = tuple(param.path.split("."))
        value = place(param.shape, shardings[key].get_value(), _reader(param, ckpt))
        placed.append((key, variables[key].replace(value)))
    loaded_params = nnx.from_flat_state(placed)
    model = nnx.merge(graphdef, loaded_params, rest)
    return Loaded(model, cfg, architecture_of(hf).name, hf, tokenizer, path)
