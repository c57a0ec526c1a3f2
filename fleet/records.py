"""Checking a result record that comes from outside before anything trusts it.

A shard line (`chipcheck ingest`) or a stored result body is JSON written by another process, on
another node, maybe half-written, maybe hostile. `parse_result` checks every field's type and range
and returns a `ProbeResult` or raises `BadRecord` with a one-line reason; nothing else in the
fleet code has to guard against a string where a number belongs. Host names are checked against
what DNS (RFC 1123), Slurm and Kubernetes accept, because they reach external commands
(`chipcheck quarantine`).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from ..results import Blame, ErrorKind, Oracle, ProbeResult, Verdict

MAX_RANK = 1 << 20
"""Ranks at or above this are not a real job's (a shard saying rank 10^30 is refused)."""
INT64 = 1 << 63
"""SQLite stores integers as signed 64-bit: a seed outside this range cannot be stored."""
MAX_NAME = 256
"""Longest run id, probe, case, device or fingerprint string accepted."""

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?"
_HOST = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_K8S_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_K8S_NODE = re.compile(rf"{_K8S_LABEL}(?:\.{_K8S_LABEL})*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_REQUIRED = ("run_id", "host", "rank", "device", "fingerprint", "probe", "case", "verdict", "seed")
_FIELDS = frozenset(ProbeResult.__dataclass_fields__)


class BadRecord(ValueError):
    """A record that is not a valid result; the message is the reason, one line."""


def host_problem(host: object) -> str | None:
    """Why `host` is not a usable host/node name (None when it is): labels of letters, digits and
    inner hyphens or underscores (RFC 1123, plus the underscores Slurm node names and /etc/hosts
    aliases carry), joined by dots, at most 253 characters. Such a name cannot start with `-` (no
    option injection) and holds no whitespace, quote or newline."""
    if not isinstance(host, str):
        return f"host must be a string, not {type(host).__name__}"
    if not host or len(host) > 253 or not _HOST.fullmatch(host):
        return f"host {_show(host)} is not a valid host name (letters, digits, inner '-' and '_', and '.')"
    return None


def k8s_node_problem(host: str) -> str | None:
    """Why `host`, lower-cased, is not a Kubernetes node name (an RFC 1123 subdomain: no underscores)."""
    why = host_problem(host)
    if why is None and not _K8S_NODE.fullmatch(host.lower()):
        why = f"host {_show(host)} is not a Kubernetes node name (RFC 1123: letters, digits, '-' and '.')"
    return why


def check_host(host: object) -> str:
    """`host` if it is a valid host name, else `BadRecord`."""
    why = host_problem(host)
    if why:
        raise BadRecord(why)
    assert isinstance(host, str)
    return host


def parse_line(text: str) -> ProbeResult:
    """One shard line -> a checked `ProbeResult` (`BadRecord` with the reason otherwise)."""
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise BadRecord(f"not JSON ({_first_line(e)})") from None
    return parse_result(obj)


def parse_result(d: object) -> ProbeResult:
    """A decoded JSON object -> a checked `ProbeResult` (`BadRecord` with the reason otherwise)."""
    if not isinstance(d, dict):
        raise BadRecord(f"a result must be a JSON object, not {_kind(d)}")
    unknown = sorted(k for k in d if k not in _FIELDS)
    if unknown:
        raise BadRecord(f"unknown field {_show(unknown[0])}")
    missing = [k for k in _REQUIRED if k not in d]
    if missing:
        raise BadRecord(f"missing field {missing[0]!r}")
    _name(d, "run_id", required=True)
    check_host(d["host"])
    _int(d, "rank", 0, MAX_RANK)
    for key in ("device", "fingerprint", "probe", "case"):
        _name(d, key, required=True)
    for key in ("output_hash", "device_uuid"):
        if key in d:
            _name(d, key)
    if "repeat_hashes" in d:
        if not isinstance(d["repeat_hashes"], list) or len(d["repeat_hashes"]) > 1000:
            raise BadRecord(f"repeat_hashes must be a list of hashes, not {_kind(d['repeat_hashes'])}")
        for h in d["repeat_hashes"]:
            _name({"repeat_hashes": h}, "repeat_hashes", required=True)
    if not _member(d["verdict"], Verdict):
        raise BadRecord(f"verdict {_show(d['verdict'])} is not one of {', '.join(Verdict)}")
    _int(d, "seed", -INT64, INT64)
    for key in ("repeats_bad", "repeats"):
        if key in d:
            _int(d, key, 0, INT64)
    for key in ("started", "ended"):
        if key in d:
            _finite(d, key)
    for key in ("params", "settings"):
        if key in d and not isinstance(d[key], dict):
            raise BadRecord(f"{key} must be an object, not {_kind(d[key])}")
    check_metrics(d.get("metrics", {}))
    _error(d.get("error"))
    _list_of_objects(d, "mismatches", _mismatch)
    _list_of_objects(d, "links", _link)
    try:
        r = ProbeResult.from_dict(d)
        r.to_json()  # everything stored must serialise back
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as e:
        raise BadRecord(f"not a result ({_first_line(e)})") from None
    return r


def _name(d: dict[str, Any], key: str, *, required: bool = False) -> None:
    v = d[key]
    if not isinstance(v, str):
        raise BadRecord(f"{key} must be a string, not {_kind(v)}")
    if (required and not v) or len(v) > MAX_NAME or _CONTROL.search(v):
        raise BadRecord(f"{key} {_show(v)} is empty, too long or holds control characters")


def _int(d: dict[str, Any], key: str, lo: int, hi: int) -> None:
    v = d[key]
    if not isinstance(v, int) or isinstance(v, bool):
        raise BadRecord(f"{key} must be an integer, not {_kind(v)}")
    if not lo <= v < hi:
        raise BadRecord(f"{key} {_show(v)} is out of range [{lo}, {hi})")


def _finite(d: dict[str, Any], key: str) -> None:
    v = d[key]
    if not isinstance(v, int | float) or isinstance(v, bool):
        raise BadRecord(f"{key} must be a number, not {_kind(v)}")
    if not math.isfinite(v):
        raise BadRecord(f"{key} must be finite, not {v}")


def _number_or_nan(v: object, what: str, *, optional: bool = False) -> None:
    if optional and v is None:
        return
    if not isinstance(v, int | float) or isinstance(v, bool):
        raise BadRecord(f"{what} must be a number, not {_kind(v)}")
    if math.isinf(v):
        raise BadRecord(f"{what} must be finite or NaN, not {v}")


def check_metrics(m: object) -> dict[str, float]:
    """`m` if it is an object of numbers (finite or NaN) keyed by name, else `BadRecord`."""
    if not isinstance(m, dict):
        raise BadRecord(f"metrics must be an object of numbers, not {_kind(m)}")
    for k, v in m.items():
        if not isinstance(k, str):
            raise BadRecord(f"metric name {_show(k)} is not a string")
        _number_or_nan(v, f"metric {_show(k)}")
    return m


def _error(e: object) -> None:
    if e is None:
        return
    if not isinstance(e, dict) or set(e) != {"kind", "message"}:
        raise BadRecord("error must be {\"kind\": ..., \"message\": ...} or null")
    if not _member(e["kind"], ErrorKind) or not isinstance(e["message"], str):
        raise BadRecord(f"error kind {_show(e['kind'])} is not one of {', '.join(ErrorKind)}")


def _list_of_objects(d: dict[str, Any], key: str, check: Any) -> None:
    items = d.get(key, [])
    if not isinstance(items, list) or not all(isinstance(x, dict) for x in items):
        raise BadRecord(f"{key} must be a list of objects")
    for x in items:
        check(x)


def _histogram(h: object, what: str) -> None:
    if not isinstance(h, dict):
        raise BadRecord(f"{what} bit_histogram must be an object")
    for k, v in h.items():
        if not (isinstance(k, str) and k.isascii() and k.isdigit() and len(k) < 4):
            raise BadRecord(f"{what} bit_histogram key {_show(k)} is not a bit index")
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < INT64:
            raise BadRecord(f"{what} bit_histogram count {_show(v)} is not a count")


def _mismatch(m: dict[str, Any]) -> None:
    if not _member(m.get("oracle"), Oracle) or not _member(m.get("blame", "own"), Blame):
        raise BadRecord(f"mismatch oracle {_show(m.get('oracle'))} or blame {_show(m.get('blame'))} is unknown")
    for key in ("first_indices", "tiles", "expected", "actual", "expected_bits", "actual_bits", "group"):
        if not isinstance(m.get(key, []), list):
            raise BadRecord(f"mismatch {key} must be a list, not {_kind(m[key])}")
    if not isinstance(m.get("note", ""), str):
        raise BadRecord("mismatch note must be a string")
    for key in ("bad_elements", "total_elements"):
        if key not in m:
            raise BadRecord(f"mismatch is missing {key!r}")
        _int(m, key, 0, INT64)
    if "max_abs_error" in m:
        _number_or_nan(m["max_abs_error"], "mismatch max_abs_error")
    _histogram(m.get("bit_histogram", {}), "mismatch")


def _link(x: dict[str, Any]) -> None:
    for key in ("src", "dst", "measured_by"):
        if key not in x:
            raise BadRecord(f"link is missing {key!r}")
        _int(x, key, 0, MAX_RANK)
    for key in ("latency_us", "gbps"):
        _number_or_nan(x.get(key), f"link {key}", optional=True)
    for key in ("bad_bytes", "total_bytes"):
        if key in x:
            _int(x, key, 0, INT64)
    if x.get("first_bad_offset") is not None:
        _int(x, "first_bad_offset", 0, INT64)
    if not isinstance(x.get("error", ""), str):
        raise BadRecord("link error must be a string")
    _histogram(x.get("bit_histogram", {}), "link")


def _member(v: object, enum_type: Any) -> bool:
    return isinstance(v, str) and v in enum_type._value2member_map_


def _kind(v: object) -> str:
    return "null" if v is None else {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(v), type(v).__name__)


def _show(v: object) -> str:
    """A value for a one-line message: repr (control characters escaped), cut short."""
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:120]
