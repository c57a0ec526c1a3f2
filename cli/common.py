"""What several commands share: atomic report files, what is new since the last sweep."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from ..options import fail


def write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and a rename: a reader (node_exporter's textfile collector, a log
    shipper) never sees half a file. A device or a pipe (/dev/stdout) is written in place."""
    if path.exists() and not path.is_file():
        path.write_text(text)
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_output(path: Path, text: str, flag: str, kept: str = "") -> None:
    """`write_atomic`, a failure one line and exit 2 (`kept`: where what was measured still is): the
    check before the run (`check_writable`) cannot see a disk that fills up meanwhile."""
    try:
        write_atomic(path, text)
    except OSError as e:
        fail(f"{flag} {path}: cannot be written ({e.strerror or e}){kept}")


def print_news(db_path: Any) -> None:
    """What is new since the last sweep: the first thing a sweep reports."""
    from ..fleet import history
    from ..fleet.store import Store

    store = Store(db_path)
    try:
        rep = history.report(store)
    finally:
        store.close()
    for line in news_lines(rep):
        click.echo(line)


def news_lines(rep: Any) -> list[str]:
    if rep.latest is None:
        return ["no judged runs in the store yet"]
    out = [f"New since the last sweep (run {rep.latest}, {len(rep.runs)} runs in history):"]
    news = [f"  {n.host} {n.device} {n.uuid}: {n.verdict.value} (was {n.before.value if n.before else 'not seen'})"
            for n in rep.new_failures]
    news += [f"  {', '.join(f.hosts)} {f.device} {f.code.code} {f.code.action.value}: {f.detail}"
             for f in rep.new_findings]
    return out + (news or ["  nothing"])


