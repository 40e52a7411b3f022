"""jmp: JAX model parallelism for Flax models.

``import jmp`` is light: it loads the core that needs only JAX (mesh, strategies, rules, context);
everything that needs Flax (sharded init, layers, models, ``jmp.train``, ``jmp.pipeline``), the
planner and ``jmp.inspect`` load on first use, and orbax, matplotlib and rich only when a loop,
checkpoint or table needs them.

Example:
    >>> import jmp
    >>> mesh = jmp.make_mesh("data=2,model=4")
    >>> rules = jmp.rules.preset("dp_tp", mesh)
    >>> rules.params_dict["mlp"]
    'model'
"""

import importlib
from typing import TYPE_CHECKING, Any

from jmp import mesh, rules, strategies
from jmp.context import activate, constrain
from jmp.devices import simulate_cpu_devices
from jmp.errors import ConfigError, DeviceError, JmpError, MeshError, ShardingError
from jmp.mesh import make_mesh
from jmp.rules import Rules

if TYPE_CHECKING:  # loaded lazily by __getattr__; imported here so type checkers see them
    from jmp import hf, inspect, layers, losses, models, pipeline, plan, sharding, train
    from jmp.models.llama import Llama, LlamaConfig
    from jmp.sharding import (
        ParamTable,
        named_shardings,
        param_table,
        partition_specs,
        shard_init,
    )
    from jmp.train.trainer import fit

_LAZY_MODULES = (
    "hf",
    "inspect",
    "layers",
    "losses",
    "models",
    "pipeline",
    "plan",
    "sharding",
    "train",
)
# name -> module that defines it; flax (which loads rich) is imported only when one is used
_LAZY_NAMES = {
    **dict.fromkeys(
        ("ParamTable", "named_shardings", "param_table", "partition_specs", "shard_init"),
        "jmp.sharding",
    ),
    "fit": "jmp.train.trainer",
    "Llama": "jmp.models.llama",
    "LlamaConfig": "jmp.models.llama",
}


def __getattr__(name: str) -> Any:
    # PEP 562: `jmp.plan` imports jmp.plan on first access, so `import jmp` stays fast
    if name in _LAZY_MODULES:
        return importlib.import_module(f"jmp.{name}")
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(_LAZY_NAMES[name]), name)
    raise AttributeError(f"module 'jmp' has no attribute {name!r}")


__all__ = [
    "ConfigError",
    "DeviceError",
    "JmpError",
    "Llama",
    "LlamaConfig",
    "MeshError",
    "ParamTable",
    "Rules",
    "ShardingError",
    "activate",
    "constrain",
    "fit",
    "hf",
    "inspect",
    "layers",
    "losses",
    "make_mesh",
    "mesh",
    "models",
    "named_shardings",
    "param_table",
    "partition_specs",
    "pipeline",
    "plan",
    "rules",
    "shard_init",
    "sharding",
    "simulate_cpu_devices",
    "strategies",
    "train",
]

__version__ = "0.1.0"
