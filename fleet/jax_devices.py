"""Device discovery through JAX: TPUs (and GPUs/CPUs as JAX sees them) as DeviceInfo with fingerprints.

JAX runs one process per host that drives all of that host's devices; `jax.devices()` lists
every device of the job (all hosts under jax.distributed), `jax.local_devices()` this process's.
Two devices share a fingerprint when they must compute identical bits: same platform and device
kind (e.g. "TPU v5 lite"), same jax/jaxlib and platform (runtime) version, same x64 setting.
Where a device tells its place (TPU `coords`, `core_on_chip`), it is recorded with the device
(fingerprint_fields), but it is not part of the fingerprint: position does not change the bits.
"""

from __future__ import annotations

import socket
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
    """One jax Device as a DeviceInfo (index = its position among this process's devices is set by the caller)."""
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
