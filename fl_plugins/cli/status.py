"""`fl-plugins status ADDRESS [--kit kits/admin]`: what the aggregator is doing, as its operator sees it.

One Status call (aggregator/status.py's operator view): the job, its phase, round and attempt, each site with its
state and last contact, and the uploads in flight with their progress. With `--kit` (the operator's kit, or the
aggregator's own) it speaks mTLS; without, plaintext to a loopback address only (the local demo), where the
aggregator shows everything to a caller that names no site. The call does not wait for a connection: an
aggregator that is not there is reported at once (exit 1), a refused call (a kit of another project, a revoked
certificate, plaintext against mTLS) in one line too (exit 2), each with what to check.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from fl_plugins.cli.levels import add_log_level
from fl_plugins.errors import ConfigError

UNREACHABLE, REFUSED = 1, 2  # the exit codes


def add(sub: Any) -> None:
    s = sub.add_parser(
        "status",
        help="show a running aggregator's job, sites and transfers (the operator's view)",
        description="Ask the aggregator at ADDRESS what it is doing: job, phase, round, attempt, each site's state "
        "and last contact, uploads in flight. With --kit (kits/admin from `fl-plugins provision`, or kits/server) "
        "over mTLS; without, plaintext to a loopback address. Exit 1: the aggregator did not answer; exit 2: it "
        "refused the call, or an argument is wrong.",
    )
    s.add_argument("address", nargs="?", help="HOST:PORT of the aggregator (default: the kit's)")
    s.add_argument("--kit", type=Path, help="the operator's kit (kits/admin) or the aggregator's (kits/server)")
    s.add_argument("--json", action="store_true", help="print the aggregator's answer as JSON (one line per call)")
    s.add_argument("--watch", type=float, metavar="SECONDS", help="ask again every SECONDS until the job is done")
    s.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how long one call may take before the aggregator counts as unreachable (default %(default)s)",
    )
    add_log_level(s, "warning")


def command(args: argparse.Namespace) -> int:
    import os

    if "grpc" not in sys.modules:  # a process of its own: the one line below says what failed, not gRPC's log
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    import grpc

    from fl_plugins.wire import rpc
    from fl_plugins.wire.proto import fl_pb2 as pb

    for flag, v in (("--watch", args.watch), ("--timeout", args.timeout)):
        if v is not None and not 0 < v < 86400:
            raise ConfigError(f"{flag} {v:g}: must be a number of seconds above 0 (e.g. {flag} 5)")
    address, credentials = target(args.address, args.kit)
    channel = rpc.secure_channel(address, credentials) if credentials else rpc.insecure_channel(address)
    stub: Any = rpc.Stub(channel)  # its methods are set at run time (rpc.METHODS)
    try:
        while True:
            try:
                reply = stub.Status(pb.StatusRequest(), timeout=args.timeout)
            except grpc.RpcError as e:
                code, line = failure(e, address, args.kit, args.timeout)
                print(f"fl-plugins status: {line}", file=sys.stderr, flush=True)
                return code
            st = json.loads(reply.status_json)
            if args.json:
                print(json.dumps(st, sort_keys=True), flush=True)
            else:
                if args.watch and sys.stdout.isatty():
                    print("\x1b[2J\x1b[H", end="")
                print(render(st, address), flush=True)
            if not args.watch or st.get("done"):
                return 0
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0
    finally:
        channel.close()


def target(address: str | None, kit_path: Path | None) -> tuple[str, Any]:
    """The address to call and the channel credentials (None: plaintext); ConfigError for what cannot work."""
    from fl_plugins.security.tls import is_local_target, load_operator_kit

    if kit_path is None:
        if not address:
            raise ConfigError("name the aggregator: fl-plugins status HOST:PORT [--kit kits/admin]")
        if not is_local_target(address):
            raise ConfigError(
                f"{address} is not a loopback address: without --kit the status call would be plaintext, which "
                "the aggregator answers with the operator's view only on this machine; pass --kit kits/admin (the "
                "operator's kit from `fl-plugins provision`)"
            )
        return address, None
    kit = load_operator_kit(kit_path)
    address = address or kit.server
    if not address:
        raise ConfigError(f"the kit {kit.path} names no aggregator address: fl-plugins status HOST:PORT --kit ...")
    return address, kit.credentials()


def failure(e: Any, address: str, kit: Path | None, timeout: float) -> tuple[int, str]:
    """(exit code, one line) for a Status call that failed: unreachable (1) or refused (2), and what to check."""
    import grpc

    code, details = e.code(), e.details() or ""
    low = details.lower()
    said = f"the aggregator at {address}"
    if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        from fl_plugins.wire import rpc

        return REFUSED, f"{said} {rpc.error_from_rpc(e, 'refused the call')}"  # without the error's class name
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return UNREACHABLE, f"{said} did not answer within {timeout:g} s (--timeout): is it running, is it reachable?"
    if code != grpc.StatusCode.UNAVAILABLE:
        return UNREACHABLE, f"{said} answered {code.name}: {details} (is it an fl-plugins aggregator?)"
    if "wrong_version_number" in low:
        return REFUSED, f"{said} does not speak TLS (started without --kit?): call it without --kit ({details})"
    if "handshake" in low or "certificate" in low or "ssl" in low:
        return REFUSED, (
            f"the TLS handshake with {said} failed: a kit of another project, an expired certificate, or a host "
            f"that is not in the aggregator's certificate ({details})"
        )
    if "socket closed" in low or "connection reset" in low:
        fix = "ask the project's admin for a current admin kit" if kit else "pass --kit kits/admin"
        return REFUSED, f"{said} closed the connection: it serves mTLS and refused this caller; {fix} ({details})"
    return UNREACHABLE, f"{said} is not reachable ({details}): check that `fl-plugins server` runs there"


def render(st: dict[str, Any], address: str) -> str:
    """The operator's view as text: a header, one line per site, one per upload in flight, the totals."""
    lines = [f"aggregator {address}  job {st.get('job_id', '?')}  {progress(st)}"]
    states = st.get("site_states", {})
    if "sites" in st:
        timeout = st.get("site_timeout")
        silent = f", silent after {timeout:g} s without a call" if timeout else ""
        lines.append(f"sites ({len(st['sites'])}{silent}):" if st["sites"] else "sites: none connected yet")
        width = max((len(n) for n in st["sites"]), default=0)
        for name in st["sites"]:
            s = states.get(name, {})
            contact = s.get("last_contact_s")
            ago = f"last contact {ago_text(contact)}" if contact is not None else ""
            lines.append(f"  {name:<{width}}  {s.get('state', '?'):<12}  {ago}".rstrip())
    flight = [u for u in st.get("uploads", {}).values() if not u.get("committed")]
    lines.append("uploads in flight:" if flight else "uploads in flight: none")
    lines += [f"  {upload_text(u)}" for u in sorted(flight, key=lambda u: u["site"])]
    if "updates_accepted" in st:
        from fl_plugins._text import human_bytes

        lines.append(
            f"updates: {st['updates_accepted']} accepted, {st.get('updates_refused', 0)} refused, "
            f"{st.get('updates_lost', 0)} lost; received {human_bytes(st.get('bytes_received', 0))}, "
            f"sent {human_bytes(st.get('bytes_sent', 0))}"
        )
    return "\n".join(lines)


def progress(st: dict[str, Any]) -> str:
    """ "training, round 2 (the 3rd of 5), attempt 0", or where the job is when it trains no more."""
    r, total, phase = st.get("round", 0), st.get("total_rounds", 0), st.get("phase") or ""
    if st.get("done"):
        return f"done ({total} rounds)"
    where = f"round {r} (the {ordinal(r + 1)} of {total}), attempt {st.get('attempt', 0)}" if r < total else ""
    where = where or f"after the last round ({total} rounds)"
    return f"{phase}, {where}" if phase else f"waiting, {where}"


def ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def ago_text(seconds: float) -> str:
    """12 -> "12 s ago", 150 -> "2 min 30 s ago", 7300 -> "2 h 1 min ago"."""
    s = int(seconds)
    if s < 120:
        return f"{s} s ago"
    if s < 7200:
        return f"{s // 60} min {s % 60} s ago"
    return f"{s // 3600} h {s % 3600 // 60} min ago"


def upload_text(u: dict[str, Any]) -> str:
    """ "site-2  round 3 update: 12.3 MB of 40.0 MB (31%), 4.1 MB/s, 3 s"."""
    from fl_plugins._text import human_bytes

    what = "initial model" if u.get("initial") else "update"
    done, planned, secs = u.get("bytes_verified", 0), u.get("bytes_planned"), u.get("seconds") or 0.0
    size = f"{human_bytes(done)} of {human_bytes(planned)} ({100 * done / planned:.0f}%)" if planned else ""
    size = size or human_bytes(done)
    rate = f", {human_bytes(u.get('bytes_received', 0) / secs)}/s" if secs > 0 else ""
    return f"{u['site']}  round {u['round']} {what}: {size}{rate}, {secs:.0f} s"
