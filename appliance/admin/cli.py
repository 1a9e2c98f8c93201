"""`qwen-appliance`: the one admin command (init, serve, check, settings)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from appliance import __version__
from appliance.admin import audit as auditadmin
from appliance.admin import cert as certadmin
from appliance.admin import model as modeladmin
from appliance.admin import token as tokenadmin
from appliance.client import ask as client
from appliance.config.load import load_policy
from appliance.config.settings import describe, markdown
from appliance.config.trusted import check_file_modes
from appliance.errors import ApplianceError


def _listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError("expected HOST:PORT, e.g. 127.0.0.1:8443")
    return host.strip("[]"), int(port)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="qwen-appliance", description=__doc__)
    ap.add_argument("--version", action="version", version=f"qwen-appliance {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="create CA, certificates, a client and policy.toml in DIR")
    p.add_argument("dir", type=Path)
    p.add_argument("--listen", default="127.0.0.1:8443", help="HOST:PORT (default %(default)s)")
    p.add_argument("--model", type=Path, help="Qwen3-VL text GGUF")
    p.add_argument("--mmproj", type=Path, help="its vision projector GGUF")
    p.add_argument("--client", default="client-01", help="name of the first client")
    p.add_argument(
        "--allow",
        action="append",
        metavar="CIDR",
        help="address range allowed to connect besides loopback (repeatable), e.g. 192.168.10.0/24",
    )
    p.add_argument(
        "--token-file",
        type=Path,
        help="also write the client's token to this file (0600), e.g. for a dev box",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing set-up")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("serve", help="run the daemon")
    p.add_argument("--policy", type=Path, required=True)
    p.add_argument("--listen", type=_listen, help="override [server] listen")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    p = sub.add_parser("policy", help="work with policy files")
    psub = p.add_subparsers(dest="policy_command", required=True)
    p = psub.add_parser("check", help="validate a policy file and the files it names; exit 2 if not")
    p.add_argument("file", type=Path)
    p.set_defaults(handler=_check)

    p = sub.add_parser("doctor", help="check the whole box: policy, files, certificates, model, GPU, audit")
    p.add_argument(
        "--policy",
        type=Path,
        help="the policy to check (default /etc/qwen-appliance/policy.toml when it exists)",
    )
    p.add_argument("--no-hash", action="store_true", help="skip re-hashing the model files (fast)")
    p.set_defaults(handler=_doctor)

    p = sub.add_parser("settings", help="list every policy key with its default and purpose")
    p.add_argument("--markdown", action="store_true", help="print docs/policy.md")
    for name, handler in (("init", _init), ("serve", _serve), ("settings", _settings)):
        sub.choices[name].set_defaults(handler=handler)
    tokenadmin.register(sub)
    auditadmin.register(sub)
    certadmin.register(sub)
    modeladmin.register(sub)
    client.register(sub)
    return ap


def _init(args: argparse.Namespace) -> int:
    from appliance.admin.init import init

    listen = ":".join(map(str, _listen(args.listen)))
    result = init(
        args.dir,
        listen=listen,
        model=args.model,
        mmproj=args.mmproj,
        client=args.client,
        force=args.force,
        token_file=args.token_file,
        allow=args.allow,
    )
    if args.json:
        print(json.dumps(result.as_json()))
        return 0
    print(
        f"Created {result.policy}\n  URL          {result.url}\n  CA           {result.ca_cert}"
        f"\n  client cert  {result.client_cert}\n  client key   {result.client_key}\n"
        f"  token        {result.token}\n"
        "The token is shown only this once; only its SHA-256 is stored. Hand it, the client "
        "certificate, key and CA to the client."
    )
    return 0


def _serve(args: argparse.Namespace) -> int:
    from appliance.daemon.serve import serve, setup_logging

    setup_logging(args.log_level)
    return serve(args.policy, args.listen)


def _check(args: argparse.Namespace) -> int:
    """Everything `serve` checks before loading the model, so an admin can test an edit first."""
    from appliance.security.tls import server_context

    policy = load_policy(args.file)
    check_file_modes(policy)
    server_context(policy.server)
    missing = [
        (k, p)
        for k, p in (("model.path", policy.model.path), ("model.mmproj", policy.model.mmproj))
        if p and not p.is_file()
    ]
    for key, path in missing:
        print(
            f"{args.file}: [{key}]: file not found: {path} (hint: copy the GGUF there or fix the path)",
            file=sys.stderr,
        )
    if missing:
        return 2
    print(f"{args.file}: OK ({len(policy.clients)} clients, digest {policy.digest[:16]})")
    return 0


def _doctor(args: argparse.Namespace) -> int:
    """Exit 0 when nothing fails (warnings are allowed), 2 otherwise."""
    import logging

    from appliance.admin.doctor import FAIL, render, run_checks

    logging.disable(logging.WARNING)  # findings go in the table, not as stray log lines

    policy = args.policy
    if policy is None and Path("/etc/qwen-appliance/policy.toml").exists():
        policy = Path("/etc/qwen-appliance/policy.toml")
    results = run_checks(policy, hash_models=not args.no_hash)
    print(render(results))
    return 2 if any(c.status == FAIL for c in results) else 0


def _settings(args: argparse.Namespace) -> int:
    print(markdown() if args.markdown else describe(), end="\n" if not args.markdown else "")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; a reader that goes away (`| head`) ends it quietly, as SIGPIPE ends other tools."""
    try:
        try:
            args = _parser().parse_args(argv)  # --help and --version print, then exit
        finally:
            sys.stdout.flush()
        code = _run(args)
        sys.stdout.flush()  # a closed pipe shows up here, not in Python's own flush at exit
        return code
    except BrokenPipeError:
        return _reader_gone()


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.handler(args))
    except ApplianceError as exc:
        print(f"qwen-appliance: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def _reader_gone() -> int:
    """Point stdout at /dev/null, so the interpreter's final flush cannot fail again; exit 128 + SIGPIPE."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is not a file descriptor (captured in tests): nothing to flush
        pass
    return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
