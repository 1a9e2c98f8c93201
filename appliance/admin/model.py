"""`qwen-appliance model ...`: install, pin and check the GGUF files the daemon serves.

The work is done in appliance.models (manifest, pins, GGUF header reader, Hub, install); this module is the
command group: its arguments and what it prints. It never imports llama_cpp.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from appliance.config.load import load_policy
from appliance.models import install
from appliance.models.gguf import describe_gguf, read_gguf_header
from appliance.models.install import DEFAULT_MODELS_DIR, MODELS_ENV, models_dir_of
from appliance.models.manifest import MANIFEST_ENV, load_manifest
from appliance.models.pins import expected_for, load_pins
from appliance.text import escape_unprintable


def policy_lines(model: tuple[Path, str] | None, mmproj: tuple[Path, str] | None) -> str:
    """The [model] keys that make the daemon load exactly these files, as TOML to paste."""
    lines = ["# paste into policy.toml (replace the same keys in its [model] table)", "[model]"]
    if model:
        lines.append(f"path = {json.dumps(str(model[0]))}")
    if mmproj:
        lines.append(f"mmproj = {json.dumps(str(mmproj[0]))}")
    if model:
        lines.append(f'sha256 = "{model[1]}"')
    if mmproj:
        lines.append(f'mmproj_sha256 = "{mmproj[1]}"')
    return "\n".join(lines)


def _list(args: argparse.Namespace) -> int:
    """Each manifest entry, its size, whether it is installed and how its digests are known."""
    manifest = load_manifest(args.manifest)
    models_dir = models_dir_of(args.models_dir)
    pins = load_pins(models_dir) if models_dir.is_dir() else {}
    print(f"{'NAME':<32} {'SIZE':>9}  {'INSTALLED':<11} DIGESTS")
    for e in manifest.entries:
        present = [(models_dir / s.file).is_file() for s in e.files]
        installed = (
            "yes" if all(present) else "model only" if present[0] else "mmproj only" if present[1] else "no"
        )
        origins = {expected_for(manifest, pins, s.file).origin for s in e.files}
        digests = "published" if origins == {"manifest"} else "pin on install" if "" in origins else "pinned"
        sizes = [s.size for s in e.files if s.size is not None]
        size = f"{sum(sizes) / 1e9:.2f} GB" if len(sizes) == 2 else "?"
        print(f"{e.name + (' *' if e.default else ''):<32} {size:>9}  {installed:<11} {digests}")
        print(f"    {e.repo}@{e.revision[:12] or 'main'}: {e.model.file} + {e.mmproj.file}")
    for file in sorted(set(pins) - {s.file for e in manifest.entries for s in e.files}):
        print(f"{'(unlisted) ' + file:<44} {'yes' if (models_dir / file).is_file() else 'no':<11} pinned")
    print(f"* default (`model pull` without a name); models dir {models_dir}")
    return 0


def _pull(args: argparse.Namespace) -> int:
    """Download an entry's two files, verify each before installing it read-only, print the policy lines."""
    manifest = load_manifest(args.manifest)
    entry = manifest.entry(args.name)
    models_dir = models_dir_of(args.models_dir)
    digests = install.pull(manifest, entry, models_dir, args.revision or entry.revision or "main")
    print(
        policy_lines(
            (models_dir / entry.model.file, digests["model"]),
            (models_dir / entry.mmproj.file, digests["mmproj"]),
        )
    )
    return 0


def _import(args: argparse.Namespace) -> int:
    """Install files from removable media after verifying them; print the policy lines."""
    manifest = load_manifest(args.manifest)
    entry = manifest.entry(args.name) if args.name else None
    done = install.import_files(
        manifest, entry, [Path(f) for f in args.files], models_dir_of(args.models_dir), args.unlisted
    )
    print(policy_lines(done.get("model"), done.get("mmproj")))
    return 0


def _verify(args: argparse.Namespace) -> int:
    """Re-hash installed files against the manifest and pins (or the policy's); exit 2 naming failures."""
    manifest = load_manifest(args.manifest)
    if args.policy:
        model = load_policy(args.policy).model
        checks = install.policy_checks(
            [(model.path, model.sha256), (model.mmproj, model.mmproj_sha256)], manifest
        )
    else:
        checks = install.dir_checks(models_dir_of(args.models_dir), manifest)
    failed = []
    for check in checks:
        verdict, note = install.verify_one(check)
        print(f"{verdict:<9} {check.path}{note}")
        if verdict != "OK":
            failed.append(check.path)
    if failed:
        print(
            f"qwen-appliance: error: {len(failed)} of {len(checks)} model files failed verification: "
            f"{', '.join(map(str, failed))} (hint: a changed file must not be served: restore it with "
            "`model pull` or `model import`)",
            file=sys.stderr,
        )
        return 2
    print(f"OK: {len(checks)} model files verified")
    return 0


def _info(args: argparse.Namespace) -> int:
    """GGUF metadata read without llama.cpp, so an untrusted file can be inspected safely."""
    info = describe_gguf(args.file, read_gguf_header(args.file))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    keys = (
        "file",
        "bytes",
        "gguf_version",
        "tensors",
        "metadata_keys",
        "architecture",
        "name",
        "file_type",
        "context_length",
        "parameter_count",
        "size_label",
        "projector_type",
        "description",
    )
    for key in keys:
        if info[key] is not None:
            print(f"{key.replace('_', ' '):<16} {escape_unprintable(str(info[key]), 500)}")
    template = info["chat_template"]
    print(
        f"chat template    ({len(template)} characters)\n{escape_unprintable(template)}"
        if template
        else "chat template    (none)"
    )
    return 0


def register(sub: Any) -> None:
    """Add `model list|pull|import|verify|info` to the CLI (each sets `handler`)."""
    model = sub.add_parser("model", help="install, pin and check GGUF model files")
    msub = model.add_subparsers(dest="model_command", required=True)
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument(
        "--models-dir", type=Path, help=f"install folder (default ${MODELS_ENV}, else {DEFAULT_MODELS_DIR})"
    )
    where.add_argument(
        "--manifest",
        type=Path,
        help=f"known-good models (default ${MANIFEST_ENV}, else models/manifest.toml)",
    )

    p = msub.add_parser("list", parents=[where], help="known-good models and which are installed")
    p.set_defaults(handler=_list)

    p = msub.add_parser("pull", parents=[where], help="download from Hugging Face, verify, install read-only")
    p.add_argument("name", nargs="?", help="manifest entry (default: the one marked default)")
    p.add_argument("--revision", help="repository commit or branch instead of the manifest's")
    p.set_defaults(handler=_pull)

    p = msub.add_parser("import", parents=[where], help="install files copied from removable media")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--name", help="manifest entry these files are (when they were renamed)")
    p.add_argument(
        "--unlisted",
        action="store_true",
        help="allow files the manifest does not know; their SHA-256 is pinned",
    )
    p.set_defaults(handler=_import)

    p = msub.add_parser("verify", parents=[where], help="re-hash installed files; exit 2 on any mismatch")
    p.add_argument("--policy", type=Path, help="check the policy's [model] files against its sha256 keys")
    p.set_defaults(handler=_verify)

    p = msub.add_parser("info", help="GGUF metadata and chat template, read without llama.cpp")
    p.add_argument("file", type=Path)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=_info)
