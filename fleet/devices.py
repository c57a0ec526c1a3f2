"""Device discovery, `--devices` parsing and fingerprints.

A *device* is one accelerator (cuda:N) or, on a CPU-only host, a virtual CPU device: one
worker process with its own pinned cores. Two devices share a fingerprint when they must
compute identical bits for identical inputs: same SKU, driver and library versions, and for
CPU devices the same ISA and thread count.
"""

from __future__ import annotations

import hashlib
import os
import platform
import socket
from dataclasses import dataclass
from importlib import metadata

from ..results import DeviceInfo, DeviceKind


class DeviceSpecError(ValueError):
    """A --devices value that names nothing usable (exit 2 with this message)."""


@dataclass(frozen=True, slots=True)
class DeviceRequest:
    kind: DeviceKind
    indices: tuple[int, ...]


def parse_spec(spec: str) -> DeviceRequest | None:
    """Parse `auto` (None), `cpu:N` (N virtual CPU devices) or `cuda:0,3` / `cuda` (all GPUs)."""
    s = spec.strip().lower()
    if s == "auto":
        return None
    kind, _, rest = s.partition(":")
    if kind == "cpu":
        if not rest:
            return DeviceRequest(DeviceKind.CPU, (0,))
        if not rest.isdigit() or int(rest) < 1 or int(rest) > 1024:
            raise DeviceSpecError(f"--devices {spec!r}: cpu:N needs a count 1..1024, e.g. cpu:4")
        return DeviceRequest(DeviceKind.CPU, tuple(range(int(rest))))
    if kind in ("cuda", "gpu"):
        if not rest:
            return DeviceRequest(DeviceKind.CUDA, ())
        try:
            idx = tuple(int(x) for x in rest.split(","))
        except ValueError:
            raise DeviceSpecError(f"--devices {spec!r}: expected cuda:0,3 (GPU indices)") from None
        if len(set(idx)) != len(idx) or any(i < 0 for i in idx):
            raise DeviceSpecError(f"--devices {spec!r}: GPU indices must be distinct and >= 0")
        return DeviceRequest(DeviceKind.CUDA, idx)
    raise DeviceSpecError(f"unknown device spec {spec!r}; use auto, cpu:N or cuda:0,3")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def threads_per_cpu_worker(n_workers: int) -> int:
    return max(1, len(usable_cores()) // max(1, n_workers))


def cores_for(rank: int, n_workers: int) -> list[int]:
    """Cores pinned for CPU worker `rank`: disjoint blocks while there are enough cores."""
    cores = usable_cores()
    t = threads_per_cpu_worker(n_workers)
    return [cores[(rank * t + i) % len(cores)] for i in range(t)]


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "absent"


def fingerprint(fields: dict[str, str]) -> str:
    text = "\n".join(f"{k}={fields[k]}" for k in sorted(fields))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _cpu_isa() -> str:
    import torch

    return str(torch.backends.cpu.get_cpu_capability())


def cpu_devices(n: int, host: str | None = None) -> list[DeviceInfo]:
    host = host or socket.gethostname()
    fields = {
        "sku": cpu_model(),
        "isa": _cpu_isa(),
        "machine": platform.machine(),
        "torch": _version("torch"),
        "threads": str(threads_per_cpu_worker(n)),
    }
    fp = fingerprint(fields)
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return [
        DeviceInfo(index=i, kind=DeviceKind.CPU, name=fields["sku"], memory_bytes=mem // max(1, n),
                   uuid=f"cpu-{host}-{i}", host=host, fingerprint=fp, fingerprint_fields=fields)
        for i in range(n)
    ]


def _nvml_info(index: int) -> dict[str, str]:
    """UUID, serial, driver and VBIOS through NVML (nvidia-ml-py) when present."""
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return {}
    try:
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        out = {"uuid": _s(pynvml.nvmlDeviceGetUUID(h)), "driver": _s(pynvml.nvmlSystemGetDriverVersion())}
        for key, fn in (("serial", "nvmlDeviceGetSerial"), ("vbios", "nvmlDeviceGetVbiosVersion")):
            try:
                out[key] = _s(getattr(pynvml, fn)(h))
            except pynvml.NVMLError:
                out[key] = "n/a"
        return out
    except Exception:  # NVML missing or broken: discovery goes on with torch's view
        return {}


def _s(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def cuda_devices(indices: tuple[int, ...], host: str | None = None) -> list[DeviceInfo]:
    import torch

    host = host or socket.gethostname()
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not indices:
        indices = tuple(range(count))
    missing = [i for i in indices if i >= count]
    if missing:
        raise DeviceSpecError(f"no CUDA device {missing[0]} on {host} ({count} visible); "
                              f"see `chipcheck list`")
    out = []
    for i in indices:
        p = torch.cuda.get_device_properties(i)
        nv = _nvml_info(i)
        fields = {
            "sku": p.name,
            "cc": f"{p.major}.{p.minor}",
            "driver": nv.get("driver", "unknown"),
            "cuda": str(torch.version.cuda),
            "cudnn": str(torch.backends.cudnn.version()),
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else "n/a",
            "torch": _version("torch"),
        }
        uuid = nv.get("uuid") or str(getattr(p, "uuid", f"cuda-{host}-{i}"))
        out.append(DeviceInfo(index=i, kind=DeviceKind.CUDA, name=p.name, memory_bytes=p.total_memory,
                              uuid=uuid, host=host, fingerprint=fingerprint(fields),
                              fingerprint_fields={**fields, **{k: v for k, v in nv.items() if k != "uuid"}}))
    return out


def gpu_count() -> int:
    """GPUs visible, without touching CUDA when NVML can answer."""
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetCount())
    except Exception:
        pass
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def discover(spec: str = "auto", host: str | None = None) -> list[DeviceInfo]:
    """The devices `spec` names on this host; `auto` = every GPU, else one CPU worker per 2 cores."""
    req = parse_spec(spec)
    if req is None:
        if gpu_count() > 0:
            return cuda_devices((), host)
        return cpu_devices(max(1, len(usable_cores()) // 1), host)
    if req.kind is DeviceKind.CPU:
        return cpu_devices(len(req.indices), host)
    devs = cuda_devices(req.indices, host)
    if not devs:
        raise DeviceSpecError(f"--devices {spec!r}: no CUDA device on {host or socket.gethostname()}")
    return devs


def capabilities(info: DeviceInfo) -> frozenset[str]:
    """What optional dtypes the device has (tf32: sm_80+, fp8: sm_89+)."""
    if info.kind is not DeviceKind.CUDA:
        return frozenset()
    major, minor = (int(x) for x in info.fingerprint_fields.get("cc", "0.0").split("."))
    caps = set()
    if major >= 8:
        caps.add("tf32")
    if (major, minor) >= (8, 9):
        caps.add("fp8")
    return frozenset(caps)
