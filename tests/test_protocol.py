"""The worker protocol: every message survives the line it travels on; what is not ours is skipped."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chipcheck.fleet import protocol
from chipcheck.results import DeviceInfo, DeviceKind, ErrorInfo, ErrorKind, ProbeResult, Verdict

ROOT = Path(__file__).resolve().parents[1]


def _result() -> ProbeResult:
    return ProbeResult(run_id="r1", host="h", rank=2, device="cpu:2", fingerprint="fp", probe="matmul",
                       case="float32/random", verdict=Verdict.ERROR, seed=7, metrics={"tflops_best": 0.5},
                       error=ErrorInfo(kind=ErrorKind.TIMEOUT, message="late"), started=1.0, ended=2.0)


def _device() -> DeviceInfo:
    return DeviceInfo(host="h", index=0, kind=DeviceKind.CPU, name="cpu", memory_bytes=1, fingerprint="fp", uuid="u-0")


ALL = [protocol.Hello(pid=12, ranks=[0, 1], settings={"threads": 1}, devices=[_device()]),
       protocol.Usage(message="no such device"), protocol.Wait(probe="matmul", case="a"),
       protocol.Start(probe="collectives", case="all_gather/int32", ranks=[0, 1]), protocol.Progress(ops=17),
       protocol.Result(result=_result()), protocol.Barrier(name="end", cases=12), protocol.Synced(),
       protocol.Bye(), protocol.PeerLost(rank=3, why="crash (signal 9)"), protocol.ProgressQuery()]


@pytest.mark.parametrize("msg", ALL, ids=lambda m: type(m).__name__)
def test_every_message_comes_back_as_it_was_sent(msg: protocol.Message) -> None:
    line = protocol.encode(msg)
    assert "\n" not in line
    assert protocol.decode(line) == msg
    assert protocol.decode(line.encode()) == msg


@pytest.mark.parametrize("line", ["", "hello", "[1, 2]", '{"t": "nope"}', '{"no_t": 1}', '{"t": "progress"}',
                                  '{"t": "progress", "ops": 1, "extra": 2}', '{"t": "result", "result": "x"}',
                                  '{"t": "hello", "pid": 1, "devices": [3]}', "\x00\xff"])
def test_a_line_that_is_not_a_well_formed_message_is_not_ours(line: str) -> None:
    assert protocol.decode(line) is None


def test_pump_skips_stray_lines_and_ends_with_none() -> None:
    got: list[protocol.Message | None] = []
    lines = [b"a library printed this\n", protocol.encode(protocol.Bye()).encode() + b"\n", b"{}\n"]
    protocol.pump(iter(lines), got.append)
    assert got == [protocol.Bye(), None]


def test_the_sender_writes_whole_lines() -> None:
    buf = io.StringIO()
    send = protocol.Sender(buf)
    send(protocol.Wait(probe="p", case="c"))
    send(protocol.Bye())
    assert list(protocol.messages(buf.getvalue().splitlines())) == [protocol.Wait(probe="p", case="c"),
                                                                      protocol.Bye()]


def test_a_workers_stray_print_never_reaches_the_result_channel(tmp_path: Path) -> None:
    # open_channel moves stdout to stderr: a library's print cannot corrupt the stream
    code = ("from chipcheck.fleet import protocol\n"
            "send = protocol.Sender(protocol.open_channel())\n"
            "print('stray')\n"
            "send(protocol.Bye())\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "CHIPCHECK_RESULT_FD": "-1"})
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == [protocol.encode(protocol.Bye())]
    assert "stray" in p.stderr
