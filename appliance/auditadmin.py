"""`qwen-appliance audit ...`: verify the chain, compute the HMAC of a known value, create a key."""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path
from typing import Any

from .audit import Hmac, load_hmac_key, new_hmac_key
from .audit_verify import verify
from .errors import SetupError
from .pki import write_secret
from .policy import load_policy


def register(sub: Any) -> None:
    """Add `audit verify|hmac|keygen` to the CLI."""
    audit = sub.add_parser("audit", help="the tamper-evident audit trail")
    asub = audit.add_subparsers(dest="audit_command", required=True)
    p = asub.add_parser("verify", help="check every record and the hash chain; exit 0 OK, 2 broken")
    p.add_argument("dir", type=Path)
    p.add_argument("--expect-sealed", action="store_true",
                   help="also fail when the newest file lacks its shutdown seal (daemon stopped)")
    p.set_defaults(handler=_verify)
    p = asub.add_parser("hmac", help="digest a value read on stdin, to search the trail for it")
    p.add_argument("--policy", type=Path, required=True)
    p.add_argument("--image", action="store_true",
                   help="stdin is an image file: digest its bytes as image_hmac does")
    p.set_defaults(handler=_hmac)
    p = asub.add_parser("keygen", help="create a new HMAC key file (0600)")
    p.add_argument("file", type=Path)
    p.set_defaults(handler=_keygen)


def _verify(args: argparse.Namespace) -> int:
    result = verify(args.dir, expect_sealed=args.expect_sealed)
    if not result.ok:
        print(f"audit verify: BROKEN: {result.problem}", file=sys.stderr)
        return 2
    print(f"audit verify: OK: {result.records} records in {result.files} files, chain intact")
    for note in result.notes:
        print(f"  note: {note}")
    return 0


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
        raise SetupError(f"{args.file} already exists",
                         hint="a new key makes old digests uncorrelatable; keep the old one")
    write_secret(args.file, new_hmac_key().encode())
    print(f"wrote {args.file} (0600)")
    return 0
