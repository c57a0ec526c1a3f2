"""CUDA raw kernels (through cupy, an optional extra): memory patterns and an independent GEMM.

Purpose: code paths that do not go through the vendor's libraries, so a disagreement between
them and cuBLAS / the caching allocator's copy kernels says something. cupy is imported only
when one of these functions is called on a CUDA device; this module imports on any host.

Requirement: cupy (`pip install chipcheck[gpu]`), a CUDA device; tensors are torch tensors
shared with cupy zero-copy through `__cuda_array_interface__`, and kernels are launched on
torch's current stream so they are ordered with torch's work.

- Memory patterns on 32-bit words, bit-identical to `probes.memory.pattern_torch` (the hash is
  `generator.hash_indices`): `write_pattern`, `verify_pattern` (records up to `max_records`
  failing byte addresses with their expected and actual words), `moving_inversion` (per-thread
  segments, ascending read-verify-write-complement then descending, as memtestG80 does).
- `sgemm`: a plain 16x16 shared-memory tiled fp32 GEMM (fp32 fma accumulation), not cuBLAS.
"""

from __future__ import annotations

import functools
from typing import Any

# Pattern kinds shared with probes/memory.py (kept as small ints: they are kernel arguments).
KIND = {"walking": 0, "address": 1, "random": 2, "inversions": 2}

_MEM_SRC = r"""
typedef unsigned int u32;
typedef unsigned long long u64;

__device__ __forceinline__ u32 mix32(u32 x) {
    x ^= x >> 16; x *= 0x7FEB352Du; x ^= x >> 15; x *= 0x846CA68Bu; x ^= x >> 16;
    return x;
}

// The word a pattern puts at global word index i (generator.hash_indices for `random`).
__device__ __forceinline__ u32 pattern(int kind, u64 i, u32 s, u32 key) {
    if (kind == 0) return 1u << ((u32)(i + s) & 31u);
    if (kind == 1) { u64 a = i * 4ull; return (u32)a ^ (u32)(a >> 32); }
    return mix32(((u32)(i * 0x9E3779B9ull + key)) ^ (u32)(i >> 32));
}

__device__ __forceinline__ void record(u64 i, u32 want, u32 got, u64* count, u64* addr, u32* exp,
                                       u32* act, u32 max_records) {
    u64 slot = atomicAdd(count, 1ull);
    if (slot < max_records) { addr[slot] = i * 4ull; exp[slot] = want; act[slot] = got; }
}

extern "C" __global__ void write_pattern(u32* buf, u64 n, int kind, u32 s, u32 key, u32 inv) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        buf[i] = pattern(kind, i, s, key) ^ inv;
}

extern "C" __global__ void verify_pattern(const u32* buf, u64 n, int kind, u32 s, u32 key, u32 inv,
                                          u64* count, u64* addr, u32* exp, u32* act, u32 max_records) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        u32 want = pattern(kind, i, s, key) ^ inv;
        u32 got = buf[i];
        if (got != want) record(i, want, got, count, addr, exp, act, max_records);
    }
}

// One thread owns words [t*seg, (t+1)*seg): up = read p, write ~p ascending; down = read ~p,
// write p descending. The order inside a segment is what couples neighbouring cells.
extern "C" __global__ void moving_inversion(u32* buf, u64 n, u64 seg, int kind, u32 s, u32 key, int up,
                                            u64* count, u64* addr, u32* exp, u32* act, u32 max_records) {
    u64 t = blockIdx.x * (u64)blockDim.x + threadIdx.x;
    u64 lo = t * seg;
    if (lo >= n) return;
    u64 hi = lo + seg < n ? lo + seg : n;
    for (u64 j = 0; j < hi - lo; ++j) {
        u64 i = up ? lo + j : hi - 1 - j;
        u32 p = pattern(kind, i, s, key);
        u32 want = up ? p : ~p;
        u32 got = buf[i];
        if (got != want) record(i, want, got, count, addr, exp, act, max_records);
        buf[i] = ~want;
    }
}
"""

_GEMM_SRC = r"""
#define TILE 16
// C = A B, row-major, fp32 products accumulated with fmaf in k order: deliberately simple.
extern "C" __global__ void sgemm_tiled(const float* __restrict__ A, const float* __restrict__ B,
                                       float* __restrict__ C, int M, int N, int K) {
    __shared__ float As[TILE][TILE];
    __shared__ float Bs[TILE][TILE + 1];
    int tx = threadIdx.x, ty = threadIdx.y;
    int row = blockIdx.y * TILE + ty, col = blockIdx.x * TILE + tx;
    float acc = 0.0f;
    for (int t = 0; t < K; t += TILE) {
        As[ty][tx] = (row < M && t + tx < K) ? A[(size_t)row * K + t + tx] : 0.0f;
        Bs[ty][tx] = (t + ty < K && col < N) ? B[(size_t)(t + ty) * N + col] : 0.0f;
        __syncthreads();
        #pragma unroll
        for (int l = 0; l < TILE; ++l) acc = fmaf(As[ty][l], Bs[l][tx], acc);
        __syncthreads();
    }
    if (row < M && col < N) C[(size_t)row * N + col] = acc;
}
"""


def available(device: Any) -> bool:
    """True when `device` is a CUDA device and cupy imports (the optional `gpu` extra)."""
    if getattr(device, "type", "") != "cuda":
        return False
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _module(src: str) -> Any:
    import cupy

    return cupy.RawModule(code=src, options=("--std=c++14",))


def _stream() -> Any:
    import cupy
    import torch

    return cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)


def _as_cupy(t: Any) -> Any:
    import cupy

    return cupy.asarray(t)


class ErrorSink:
    """Device-side buffers the verify kernels append failing words to (count may exceed capacity)."""

    def __init__(self, max_records: int):
        import cupy

        self.max_records = max_records
        self.count = cupy.zeros(1, dtype=cupy.uint64)
        self.addr = cupy.zeros(max_records, dtype=cupy.uint64)
        self.exp = cupy.zeros(max_records, dtype=cupy.uint32)
        self.act = cupy.zeros(max_records, dtype=cupy.uint32)

    def args(self) -> tuple[Any, ...]:
        import numpy as np

        return self.count, self.addr, self.exp, self.act, np.uint32(self.max_records)

    def drain(self) -> tuple[int, list[tuple[int, int, int]]]:
        """(failing words seen, [(byte address, expected, actual)] up to capacity); resets the sink."""
        n = int(self.count.get()[0])
        k = min(n, self.max_records)
        recs = list(zip(self.addr[:k].get().tolist(), self.exp[:k].get().tolist(), self.act[:k].get().tolist(),
                        strict=True))
        self.count.fill(0)
        return n, recs


def _grid(n: int, threads: int = 256) -> tuple[tuple[int], tuple[int]]:
    return (min(65535 * 4, max(1, (n + threads - 1) // threads)),), (threads,)


def write_pattern(buf: Any, kind: str, s: int, key: int, inv: bool) -> None:
    """buf (torch int32, CUDA) <- pattern(kind, pass s) ^ (all ones if inv)."""
    import numpy as np

    b = _as_cupy(buf).view("uint32")
    k = _module(_MEM_SRC).get_function("write_pattern")
    with _stream():
        k(*_grid(b.size), (b, np.uint64(b.size), np.int32(KIND[kind]), np.uint32(s & 0xFFFFFFFF),
                           np.uint32(key), np.uint32(0xFFFFFFFF if inv else 0)))


def verify_pattern(buf: Any, kind: str, s: int, key: int, inv: bool, sink: ErrorSink) -> None:
    """Append every word of buf that differs from the pattern to `sink`."""
    import numpy as np

    b = _as_cupy(buf).view("uint32")
    k = _module(_MEM_SRC).get_function("verify_pattern")
    with _stream():
        k(*_grid(b.size), (b, np.uint64(b.size), np.int32(KIND[kind]), np.uint32(s & 0xFFFFFFFF), np.uint32(key),
                           np.uint32(0xFFFFFFFF if inv else 0), *sink.args()))


def moving_inversion(buf: Any, kind: str, s: int, key: int, up: bool, sink: ErrorSink, seg_words: int = 1024) -> None:
    """One sweep of moving inversions (up: verify p, write ~p; down: verify ~p, write p)."""
    import numpy as np

    b = _as_cupy(buf).view("uint32")
    threads = (b.size + seg_words - 1) // seg_words
    k = _module(_MEM_SRC).get_function("moving_inversion")
    with _stream():
        k(((threads + 255) // 256,), (256,), (b, np.uint64(b.size), np.uint64(seg_words), np.int32(KIND[kind]),
                                             np.uint32(s & 0xFFFFFFFF), np.uint32(key), np.int32(1 if up else 0),
                                             *sink.args()))


def sgemm(a: Any, b: Any) -> Any:
    """C = A B (torch float32 CUDA tensors, row-major) by the tiled RawKernel; returns a torch tensor."""
    import numpy as np
    import torch

    m, k = a.shape
    n = b.shape[1]
    a, b = a.contiguous(), b.contiguous()
    c = torch.empty((m, n), dtype=torch.float32, device=a.device)
    fn = _module(_GEMM_SRC).get_function("sgemm_tiled")
    with _stream():
        fn(((n + 15) // 16, (m + 15) // 16), (16, 16),
           (_as_cupy(a), _as_cupy(b), _as_cupy(c), np.int32(m), np.int32(n), np.int32(k)))
    return c
