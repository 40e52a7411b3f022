"""jmp: JAX model parallelism for Flax models.

Example:
    >>> import jmp
    >>> jmp.simulate_cpu_devices(8)
    >>> mesh = jmp.make_mesh("data=2,model=4")
    >>> rules = jmp.rules.preset("dp_tp", mesh)
"""

from typing import TYPE_CHECKING

from jmp import (
    checkpoint,
    data,
    generate,
    inspect,
    layers,
    loop,
    losses,
    mesh,
    models,
    plan,
    rules,
    train,
)
from jmp.context import activate, constrain
from jmp.devices import simulate_cpu_devices
from jmp.errors import ConfigError, DeviceError, JmpError, MeshError, ShardingError
from jmp.mesh import make_mesh
from jmp.rules import Rules
from jmp.sharding import (
    ParamTable,
    named_shardings,
    param_table,
    partition_specs,
    shard_init,
)

if TYPE_CHECKING:
    # not imported eagerly (`from jmp import *` and `import jmp.pipeline` load it); this lets
    # type checkers see the name that __all__ lists
    from jmp import pipeline

__all__ = [
    "ConfigError",
    "checkpoint",
    "data",
    "generate",
    "loop",
    "losses",
    "models",
    "train",
    "DeviceError",
    "JmpError",
    "MeshError",
    "ParamTable",
    "pipeline",
    "plan",
    "Rules",
    "ShardingError",
    "activate",
    "constrain",
    "inspect",
    "layers",
    "mesh",
    "make_mesh",
    "named_shardings",
    "param_table",
    "partition_specs",
    "rules",
    "shard_init",
    "simulate_cpu_devices",
]

__version__ = "0.1.0"
