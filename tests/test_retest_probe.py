"""The retest probe's cases (probes/retest.py): `gemm` in the profile's dtype, `gemm.DTYPE` in the
dtype a suspect is slow in; anything else is a configuration error, not a crash."""

from __future__ import annotations

import pytest
from conftest import cpu_ctx

from chipcheck.probes import retest
from chipcheck.probes.base import InvalidConfig, Unsupported


def test_a_gemm_retest_runs_in_the_dtype_its_case_names_sized_for_the_device() -> None:
    probe = retest.RetestProbe()
    cfg = probe.config("quick", "cpu", frozenset())
    ctx = cpu_ctx("retest")
    fn, what = retest._kernel(ctx, cfg, "gemm", "")
    assert what == {"kernel": f"{cfg.gemm_dtype} GEMM n={cfg.gemm_n}", "dtype": cfg.gemm_dtype}
    fn, what = retest._kernel(ctx, cfg, "gemm", "bfloat16")
    assert what == {"kernel": f"bfloat16 GEMM n={cfg.gemm_n}", "dtype": "bfloat16"} and str(fn().dtype) == "torch.bfloat16"
    _, what = retest._kernel(ctx, cfg, "gemm", "float16")  # a CPU's fp16 GEMM is ~50x slower: smaller
    assert what == {"kernel": "float16 GEMM n=256", "dtype": "float16"}
    for dtype in ("tf32", "float8_e4m3fn"):  # matmul's kernels: CUDA's tensor cores only
        with pytest.raises(Unsupported):
            retest._kernel(ctx, cfg, "gemm", dtype)


def test_an_attention_retest_runs_forward_and_backward_at_the_profile_s_shape() -> None:
    probe = retest.RetestProbe()
    cfg = probe.config("quick", "cpu", frozenset())
    fn, what = retest._kernel(cpu_ctx("retest"), cfg, "attention", "")
    assert what == {"kernel": f"{cfg.gemm_dtype} causal attention forward+backward bhsd={cfg.attention_bhsd}",
                    "dtype": cfg.gemm_dtype}
    out = fn()
    assert list(out.shape) == cfg.attention_bhsd and not out.isnan().any()


@pytest.mark.parametrize("case", ["attention.bfloat16", "gemm.int8", "gemm.float64", "copy.bfloat16", "link/extended", "gemm/again"])
def test_an_unknown_retest_case_is_a_configuration_error(case: str) -> None:
    probe = retest.RetestProbe()
    with pytest.raises(InvalidConfig, match="unknown retest case"):
        probe.run_case(cpu_ctx("retest"), probe.config("quick", "cpu", frozenset()), case)


def test_a_known_case_outside_the_fleet_worker_asks_for_its_group() -> None:
    probe = retest.RetestProbe()
    with pytest.raises(InvalidConfig, match="needs ctx.group"):
        probe.run_case(cpu_ctx("retest"), probe.config("quick", "cpu", frozenset()), "gemm.bfloat16/extended")
