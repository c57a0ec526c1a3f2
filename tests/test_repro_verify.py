"""A repro never lies: a capture defect is exit 2 naming the op; a candidate file is run as the vendor
would (exit 0 on the reference / fault off, exit 1 on the suspect) before `repro shrink` writes it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_cli

from chipcheck.probes import faults
from chipcheck.reproducers import capture
from chipcheck.reproducers import verify as vf

SPEC = "bitflip:rank=0,bit=25,op=mm,after=1,count=1,at=call"


def test_a_view_of_a_storage_resized_behind_the_recorder_is_a_capture_defect(tmp_path: Path) -> None:
    root = tmp_path / "cap"
    with capture(root):
        a = torch.empty(0)
        a.untyped_storage().resize_(16 * 4)  # no ATen op: the recorder never sees the resize
        b = a.as_strided((4, 4), (4, 1), 0)
        b.fill_(1.0)
        c = b @ b
    assert float(c.sum()) == 64.0  # the step itself ran as it would without capture
    for cmd in (["replay", str(root)], ["shrink", str(root), "-o", str(tmp_path / "r.py")]):
        p = run_cli("repro", *cmd)
        assert p.returncode == 2, p.stdout + p.stderr
        assert "capture defect" in p.stderr and "aten.as_strided.default" in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r.py").exists()


def test_a_real_fault_still_yields_a_verified_repro(tmp_path: Path) -> None:
    root = tmp_path / "cap"
    w = torch.arange(64, dtype=torch.float32).reshape(8, 8) / 7
    inj = faults.make_injector(faults.parse(SPEC), 0, "repro")
    with inj():
        with capture(root):
            h = (w @ w).relu()
            (h @ w).sum()
    out = tmp_path / "repro.py"
    p = run_cli("repro", "shrink", str(root), "--inject", SPEC, "-o", str(out))
    assert p.returncode == 0, p.stderr
    assert "verified: `python repro.py --device cpu --repeat 10` exit 0" in p.stdout
    assert "--inject bitflip:bit=25` exit 1" in p.stdout and out.exists()


@pytest.mark.parametrize(("body", "why"), [("import sys; sys.exit(1)", "it fails with the simulated fault off"),
                                           ("import sys; sys.exit(0)", "it passes on the suspect"),
                                           ("raise SystemExit(3)", "it crashes with the simulated fault off")])
def test_verify_refuses_a_file_that_would_lie(body: str, why: str) -> None:
    v = vf.verify(body, suspect="cpu", reference="cpu", hook="bitflip:bit=3", timeout=60)
    assert not v.ok and why in v.line()


def test_hook_spec_carries_the_simulated_fault_into_repro_py() -> None:
    assert vf.hook_spec(SPEC, 0, op="aten.mm.default", history=False, live=False) == "bitflip:bit=25"
    assert vf.hook_spec(SPEC, 1, op="aten.mm.default", history=False, live=False) is None  # rank 1 is healthy
    assert vf.hook_spec(None, 0, op="aten.mm.default", history=False, live=False) is None  # a real chip
    assert vf.hook_spec("bitflip:bit=3,op=mm,after=2", 0, op="aten.mm.default", history=True,
                        live=True) == "bitflip:bit=3,op=mm,after=2"
    assert vf.hook_spec("stuck:bit=3,value=1", 0, op="aten.mm.default", history=False, live=False) == ""
