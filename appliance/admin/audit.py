"""`qwen-appliance audit ...`: verify the chain, compute the HMAC of a known value, create a key."""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path
from typing import Any

from appliance.audit.log import Hmac, load_hmac_key, new_hmac_key
from appliance.audit.verify import Expect, parse_through, verify
from appliance.config.load import load_policy
from appliance.errors import SetupError
from appliance.files import write_secret


def register(sub: Any) -> None:
    """Add `audit verify|hmac|keygen` to the CLI."""
    audit = sub.add_parser("audit", help="the tamper-evident audit trail")
    asub = audit.add_subparsers(dest="audit_command", required=True)
    p = asub.add_parser("verify", help="check every record's MAC and the chain; exit 0 OK, 2 broken")
    p.add_argument("dir", type=Path, nargs="?", help="the audit directory (default: the policy's)")
    key = p.add_mutually_exclusive_group()
    key.add_argument("--policy", type=Path, help="take the key (and the directory) from this policy")
    key.add_argument("--key", type=Path, help="the audit key file ([audit] hmac_key_file)")
    key.add_argument(
        "--structure-only",
        action="store_true",
        help="no key: check links and seals only, which proves NOTHING against rewriting",
    )
    p.add_argument(
        "--expect-sealed",
        action="store_true",
        help="also fail when the newest file lacks its shutdown seal (daemon stopped)",
    )
    p.add_argument(
        "--expect-through",
        metavar="SEQ[:MAC]|TIME",
        help="fail when the trail ends before this known last point: SEQ:MAC as the daemon logs at each stop "
        "(also fails when that record was deleted and the seq written again), SEQ, or an ISO 8601 time",
    )
    p.add_argument(
        "--legacy-through",
        metavar="SEQ",
        type=int,
        default=0,
        help="accept records up to SEQ chained with plain SHA-256 (written before keyed MACs)",
    )
    p.set_defaults(handler=_verify)
    p = asub.add_parser("hmac", help="digest a value read on stdin, to search the trail for it")
    p.add_argument("--policy", type=Path, required=True)
    p.add_argument(
        "--image", action="store_true", help="stdin is an image file: digest its bytes as image_hmac does"
    )
    p.set_defaults(handler=_hmac)
    p = asub.add_parser("keygen", help="create a new HMAC key file (0600)")
    p.add_argument("file", type=Path)
    p.set_defaults(handler=_keygen)


def _verify(args: argparse.Namespace) -> int:
    directory, key = _verify_inputs(args)
    try:
        through_seq, through_time, through_mac = (
            parse_through(args.expect_through) if args.expect_through else (None, None, None)
        )
    except ValueError as exc:
        raise SetupError(
            str(exc),
            hint="e.g. --expect-through 4711:1a2b3c4d5e6f7a8b (from the daemon's stop line), 4711, "
            "or 2026-11-18T23:59:50Z",
        ) from None
    expect = Expect(
        sealed=args.expect_sealed,
        through_seq=through_seq,
        through_time=through_time,
        through_mac=through_mac,
        legacy_through=args.legacy_through,
    )
    result = verify(directory, key, expect=expect)
    for note in result.notes if not result.ok else ():
        print(f"  note: {note}", file=sys.stderr)
    if not result.ok:
        print(f"audit verify: BROKEN: {result.problem}", file=sys.stderr)
        return 2
    what = "MACs and chain intact" if result.keyed else "STRUCTURE ONLY (no MAC checked)"
    print(
        f"audit verify: OK: {result.records} records in {result.files} files, {what}; last seq "
        f"{result.last_seq} at {result.last_ts}"
    )
    for note in result.notes:
        print(f"  note: {note}")
    return 0


def _verify_inputs(args: argparse.Namespace) -> tuple[Path, bytes | None]:
    """The directory and the key: from --policy, --key, or none at all only with --structure-only."""
    if args.policy is not None:
        policy = load_policy(args.policy)
        return args.dir or policy.audit.dir, load_hmac_key(policy.audit.hmac_key_file)
    if args.dir is None:
        raise SetupError("audit verify: no audit directory given", hint="name DIR, or pass --policy FILE")
    if args.key is not None:
        return args.dir, load_hmac_key(args.key)
    if args.structure_only:
        return args.dir, None
    raise SetupError(
        "audit verify needs the audit key to check the records' MACs",
        hint="pass --policy FILE or --key FILE (the [audit] hmac_key_file); "
        "--structure-only checks without it and proves nothing against rewriting",
    )


def _hmac(args: argparse.Namespace) -> int:
    """Exactly the digest the daemon writes: prompt text as UTF-8, or an image file's SHA-256."""
    policy = load_policy(args.policy)
    digests = Hmac(load_hmac_key(policy.audit.hmac_key_file))
    data = sys.stdin.buffer.read()
    if args.image:
        print(digests.image(hashlib.sha256(data).hexdigest()))
    else:
        print(digests.text(data.decode("utf-8")))
    return 0


def _keygen(args: argparse.Namespace) -> int:
    if args.file.exists():
        raise SetupError(
            f"{args.file} already exists", hint="a new key makes old digests uncorrelatable; keep the old one"
        )
    write_secret(args.file, new_hmac_key().encode())
    print(f"wrote {args.file} (0600)")
    return 0
