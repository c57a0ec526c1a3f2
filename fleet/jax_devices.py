"""Device discovery through JAX: TPUs (and GPUs/CPUs as JAX sees them) as DeviceInfo with fingerprints.

JAX runs one process per host that drives all of that host's devices; `jax.devices()` lists
every device of the job (all hosts under jax.distributed), `jax.local_devices()` this process's.
Two devices share a fingerprint when they must compute identical bits: same platform and device
kind (e.g. "TPU v5 lite"), same jax/jaxlib and platform (runtime) version, same x64 setting.
Where a device tells its place (TPU `coords`, `core_on_chip`), it is recorded with the device
(fingerprint_fields), but it is not part of the fingerprint: position does not change the bits.

`discover()` is this host's devices (a single-host run); `discover_global()` is every device of a
multi-host job (after fleet/jax_multihost.initialize) in one global-rank order that every process
agrees on, each device described by the process that drives it (exchanged, not assumed).
"""

from __future__ import annotations

import dataclasses
import json
import socket
from dataclasses import dataclass
from typing import Any

from ..results import DeviceInfo, DeviceKind
from .devices import DeviceSpecError, fingerprint

_KIND = {"tpu": DeviceKind.TPU, "gpu": DeviceKind.CUDA, "cuda": DeviceKind.CUDA, "rocm": DeviceKind.ROCM,
         "cpu": DeviceKind.CPU}
# fields that say where a device is, not what it computes: recorded, kept out of the fingerprint
PLACEMENT = ("id", "process_index", "coords", "core_on_chip", "local_hardware_id", "slice_index")


def kind_of(platform: str) -> DeviceKind:
    """DeviceKind for a JAX platform name ("tpu", "gpu"/"cuda", "rocm", "cpu")."""
    try:
        return _KIND[platform.lower()]
    except KeyError:
        raise DeviceSpecError(f"JAX platform {platform!r} is not one chipcheck knows (tpu, gpu, cpu)") from None


def describe(d: Any, host: str) -> DeviceInfo:
    """One local jax Device as a DeviceInfo (index = the device id; discover_global replaces it with the
    device's position on its host)."""
    import jax
    import jaxlib

    client = getattr(d, "client", None)
    fields = {
        "backend": "jax",
        "platform": d.platform,
        "sku": str(getattr(d, "device_kind", d.platform)),
        "jax": jax.__version__,
        "jaxlib": getattr(jaxlib, "__version__", "unknown"),
        "platform_version": str(getattr(client, "platform_version", "unknown")),
        "x64": str(bool(jax.config.jax_enable_x64)),
    }
    fp = fingerprint(fields)
    placement = {k: str(getattr(d, k)) for k in PLACEMENT if getattr(d, k, None) is not None}
    mem = 0
    try:
        mem = int((d.memory_stats() or {}).get("bytes_limit", 0))
    except Exception:  # not every platform reports memory (CPU may raise): discovery goes on
        mem = 0
    return DeviceInfo(index=int(d.id), kind=kind_of(d.platform), name=fields["sku"], memory_bytes=mem,
                      uuid=f"jax-{host}-{d.platform}-{d.id}", host=host, fingerprint=fp,
                      fingerprint_fields={**fields, **placement})


def discover(host: str | None = None) -> tuple[list[Any], list[DeviceInfo]]:
    """This process's JAX devices (JAX's model: one process drives every device of its host),
    and their DeviceInfo, ranked by position."""
    import jax

    host = host or socket.gethostname()
    devs = list(jax.local_devices())
    if not devs:
        raise DeviceSpecError(f"JAX sees no device on {host}")
    return devs, [describe(d, host) for d in devs]


@dataclass(frozen=True, slots=True)
class GlobalDevices:
    """Every device of a (multi-host) JAX job in global-rank order, the same in every process.

    Global rank = position in `devices`: sorted by (process index, device id), so each process's
    ranks are contiguous (process 0 first), as the torch launcher numbers ranks host by host.
    """

    devices: list[Any]
    """The jax Devices, global rank = position (only `local` ones are addressable here)."""
    infos: list[DeviceInfo]
    """Aligned with `devices`, each as the process that drives it described it (its host, its versions)."""
    local: tuple[int, ...]
    """The global ranks this process drives."""
    process_index: int
    """This process's index in the job."""
    hosts: tuple[str, ...]
    """Host name per process index."""

    @property
    def process_count(self) -> int:
        return len(self.hosts)


def global_order(devices: list[Any]) -> list[Any]:
    """`devices` in global-rank order: (process index, id), the same in every process."""
    return sorted(devices, key=lambda d: (int(d.process_index), int(d.id)))


def discover_global(host: str | None = None) -> GlobalDevices:
    """Every device of the job (jax.devices() after jax.distributed), ranked the same in every
    process, with each device's DeviceInfo as its own process describes it: host names, memory,
    jax/jaxlib versions and so fingerprints are exchanged, not assumed. DeviceInfo.index is the
    device's position on its host (as torch's cuda:N). Every process of the job must call it
    (it exchanges data with all of them); with one process it is `discover()` in global form.
    """
    import jax

    host = host or socket.gethostname()
    me = jax.process_index()
    devs = global_order(list(jax.devices()))
    if not devs:
        raise DeviceSpecError(f"JAX sees no device on {host}")
    mine = [d for d in devs if d.process_index == me]
    infos = [dataclasses.replace(describe(d, host), index=i) for i, d in enumerate(mine)]
    payload = json.dumps({"process": me, "host": host, "devices": [i.to_dict() for i in infos]}).encode()
    per_process = [json.loads(b) for b in allgather_bytes(payload)]
    all_infos: list[DeviceInfo] = []
    for p, got in enumerate(per_process):
        ids = [int(d.id) for d in devs if d.process_index == p]
        theirs = [DeviceInfo.from_dict(x) for x in got["devices"]]
        if got["process"] != p or [int(i.fingerprint_fields["id"]) for i in theirs] != ids:
            raise DeviceSpecError(f"process {p} ({got['host']}) describes devices "
                                  f"{[i.fingerprint_fields.get('id') for i in theirs]}, but JAX on {host} "
                                  f"lists {ids} for it: the processes disagree on the job's devices")
        all_infos += theirs
    return GlobalDevices(devices=devs, infos=all_infos, local=tuple(r for r, d in enumerate(devs) if d.process_index == me),
                         process_index=me, hosts=tuple(str(x["host"]) for x in per_process))


def allgather_bytes(data: bytes) -> list[bytes]:
    """Every process's `data`, by process index (a collective: every process must call it)."""
    import numpy as np
    from jax.experimental import multihost_utils

    sizes = np.asarray(multihost_utils.process_allgather(np.array([len(data)], dtype=np.int32))).reshape(-1)
    width = max(1, int(sizes.max()))
    buf = np.zeros(width, dtype=np.uint8)
    buf[:len(data)] = np.frombuffer(data, dtype=np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), width)
    return [rows[p, :int(n)].tobytes() for p, n in enumerate(sizes)]


def sees_tpu() -> bool:
    """Whether JAX is installed and this host has TPUs (for `--backend auto`), without importing
    JAX where there is plainly none: JAX's import and backend start-up cost seconds."""
    import glob
    import importlib.util
    import os

    if importlib.util.find_spec("jax") is None:
        return False
    if not (glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*") or os.environ.get("TPU_NAME")
            or os.environ.get("TPU_ACCELERATOR_TYPE")):
        return False
    # Asked in a child restricted to the TPU platform: in this process JAX would start every
    # backend, and on a GPU host its CUDA client would hold most of the GPUs' memory while the
    # torch workers run.
    import subprocess
    import sys

    probe = "import jax; print(any(d.platform == 'tpu' for d in jax.devices()))"
    try:
        p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "JAX_PLATFORMS": "tpu"})
    except (OSError, subprocess.TimeoutExpired):
        return False
    return p.returncode == 0 and p.stdout.strip().endswith("True")
