"""fleet/session.py: one run's lifecycle in the store (begin, keep, finish), and a run cut short by
Ctrl-C or SIGTERM marked `interrupted` with what it kept (in process, synthetic results)."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest

from chipcheck.fleet import synthetic
from chipcheck.fleet.session import RunSession
from chipcheck.fleet.store import Store
from chipcheck.results import ProbeResult


def _begin(run: RunSession) -> None:
    run.begin(host="h", profile="quick", seed=0, argv=["chipcheck", "run"], config={"plan": []})


def test_a_run_kept_and_finished_is_complete_with_its_judgements(tmp_path: Path) -> None:
    f = synthetic.fleet(8, fail_fraction=0.25)
    seen: list[ProbeResult] = []
    store = Store(tmp_path / "r.db")
    with RunSession(store, f.run_id, on_result=seen.append) as run:
        _begin(run)
        run.add_devices(list(f.devices.values()))
        for r in f.results:
            run.keep(r)
        assert not run.keep_new(f.results[0])  # already stored
        summary = run.finish(lambda results: synthetic.judge(f))
    assert seen == f.results == run.results
    assert store.run_status(f.run_id) == "complete"
    assert len(store.results(f.run_id)) == len(f.results) and sorted(store.devices(f.run_id)) == list(range(8))
    assert summary.verdict.value != "pass"  # a quarter of the fleet fails
    store.close()


def test_ctrl_c_marks_the_run_interrupted_and_goes_on(tmp_path: Path) -> None:
    f = synthetic.fleet(4)
    store = Store(tmp_path / "r.db")
    with pytest.raises(KeyboardInterrupt), RunSession(store, f.run_id) as run:
        _begin(run)
        for r in f.results[:3]:
            run.keep(r)
        raise KeyboardInterrupt
    assert store.run_status(f.run_id) == "interrupted" and len(store.results(f.run_id)) == 3
    store.close()


def test_sigterm_is_an_interrupt_inside_the_session_only(tmp_path: Path) -> None:
    f = synthetic.fleet(2)
    store = Store(tmp_path / "r.db")
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), RunSession(store, f.run_id) as run:
        _begin(run)
        run.keep(f.results[0])
        threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGTERM)).start()
        threading.Event().wait(10)  # the signal ends this wait
    assert signal.getsignal(signal.SIGTERM) == before
    assert store.run_status(f.run_id) == "interrupted" and len(store.results(f.run_id)) == 1
    store.close()


def test_an_error_or_a_finished_run_is_not_marked_interrupted(tmp_path: Path) -> None:
    f = synthetic.fleet(2)
    store = Store(tmp_path / "r.db")
    with pytest.raises(RuntimeError), RunSession(store, f.run_id) as run:
        _begin(run)
        raise RuntimeError("not an interrupt")
    assert store.run_status(f.run_id) == "running"
    g = synthetic.fleet(2, run_id="20261125T000001-synthetic")
    with pytest.raises(KeyboardInterrupt), RunSession(store, g.run_id) as run:
        _begin(run)
        for r in g.results:
            run.keep(r)
        run.finish(lambda results: synthetic.judge(g))
        raise KeyboardInterrupt  # after the verdict: the run stays complete
    assert store.run_status(g.run_id) == "complete"
    store.close()
