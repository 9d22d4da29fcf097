"""A population on the devices: host device count, the member axis's mesh, padding,
and the members' initial params.

The member axis is sharded over every local device (``jax.sharding``): on CPU
over host devices (``jax_num_cpu_devices``, set before JAX starts its backend),
on GPU over the visible GPUs. A population that does not divide evenly is padded
with masked members (copies of member 0 that never update and are never
reported). A lone run uses one device, unpadded. Part of the numerical core: no
Hydra, no MLflow.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .models import ModelSpec, init_model

__all__ = ["set_host_devices", "MemberLayout", "member_layout", "init_params", "pad_members"]

MEMBER_AXIS = "member"


def set_host_devices(count: int | None) -> int:
    """Ask for ``count`` CPU devices (None: one per core) before JAX starts its backend.

    Returns:
      the count asked for. Once a backend has started the setting no longer applies
      (JAX ignores it); the devices then are whatever started.
    """
    count = count or os.cpu_count() or 1
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # a backend already started (e.g. in a test process)
        pass
    return count


@dataclass(frozen=True)
class MemberLayout:
    """Where a population's members live.

    Attributes:
      num_members: the real members.
      size: ``num_members`` rounded up to a multiple of the devices used (padding
        members are masked).
      mesh: a 1-D ``Mesh`` over the devices used, axis ``"member"``.
    """

    num_members: int
    size: int
    mesh: Mesh

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    def sharding(self, leaf) -> NamedSharding:
        """Members split over the mesh for arrays with a member axis; scalars replicated."""
        spec = PartitionSpec(MEMBER_AXIS) if np.ndim(leaf) >= 1 else PartitionSpec()
        return NamedSharding(self.mesh, spec)

    def put(self, tree):
        """``jax.device_put`` of a pytree whose leaves have a leading member axis of
        ``size`` (or are scalars), sharded over the mesh."""
        return jax.device_put(tree, jax.tree.map(self.sharding, tree))


def member_layout(num_members: int, devices=None) -> MemberLayout:
    """Shard ``num_members`` over ``devices`` (default: every local device), using no
    more devices than members so a lone run is neither split nor padded."""
    devices = list(devices if devices is not None else jax.local_devices())
    used = max(1, min(len(devices), num_members))
    size = -(-num_members // used) * used
    return MemberLayout(num_members, size, Mesh(np.array(devices[:used]), (MEMBER_AXIS,)))


def pad_members(rows: list, size: int) -> list:
    """``rows`` (one entry per member) padded to ``size`` with copies of the first."""
    return rows + [rows[0]] * (size - len(rows))


JIT_INIT_MAX_LEAVES = 64  # param arrays up to which the init is one jitted program


def init_params(spec: ModelSpec, seeds: list[int], init_scales: list[float]):
    """The members' initial params, as each would be drawn alone.

    Member ``m``'s model is ``init_model(spec with init_scale=init_scales[m],
    key=jax.random.key(seeds[m]))``; ``jax.vmap`` draws them all at once (threefry
    draws under ``vmap`` are the same bits as one by one), inside one ``jax.jit``:
    one compilation (a hit in the persistent cache on a second run) where the same
    init run eagerly compiles each of its operations, ~1 s on a 2-core CPU. A model of
    more than ``JIT_INIT_MAX_LEAVES`` arrays is drawn eagerly instead: its layers repeat
    the same operations, which eager dispatch compiles once each, while one program
    holding every layer's draw grows with depth (issue 13.4: 200 layers of width 4 spent
    minutes compiling their init before the first step).

    Returns:
      ``(graphdef, params)``: params leaves ``(M, ...)`` float32.
    """
    abstract = nnx.eval_shape(lambda: init_model(spec, key=jax.random.key(seeds[0])))
    graphdef, _ = nnx.split(abstract, nnx.Param)

    def one(key, scale):
        model = init_model(dataclasses.replace(spec, init_scale=scale), key=key)
        return nnx.split(model, nnx.Param)[1]

    def draw(seeds, scales):
        return jax.vmap(one)(jax.vmap(jax.random.key)(seeds), scales)

    if len(jax.tree.leaves(nnx.split(abstract, nnx.Param)[1])) <= JIT_INIT_MAX_LEAVES:
        draw = jax.jit(draw)

    params = draw(jnp.asarray(seeds, jnp.uint32), jnp.asarray(init_scales, jnp.float32))
    return graphdef, params
