"""The design as tests: import rules between the packages, and the size limits, read from the source with
`ast` (nothing is imported, so a forbidden import fails here even where it would not run)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "appliance"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
# Top-level modules every package may use: no policy, no daemon, no I/O beyond files (they import only
# each other, which test_leaves_import_only_leaves checks).
LEAVES = frozenset({"appliance", "appliance.errors", "appliance.files", "appliance.text"})
# Known imports of the engine's serving front door by the web layer: the request queue (Scheduler, Job)
# and the NVML monitor. Listed so that no other one appears; remove a row once its import is gone.
ENGINE_FRONT_DOOR = frozenset(
    {
        ("appliance.web.chat", "appliance.engine.scheduler"),
        ("appliance.web.chat", "appliance.engine.job"),
        ("appliance.web.runtime", "appliance.engine.scheduler"),
        ("appliance.web.runtime", "appliance.engine.gpu"),
        ("appliance.web.health", "appliance.engine.gpu"),
    }
)


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    tree: ast.Module

    @property
    def is_package(self) -> bool:
        return self.path.name == "__init__.py"


def _name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "__pycache__" not in path.parts:
            out[_name(path)] = Module(_name(path), path, ast.parse(path.read_text(), str(path)))
    return out


MODULES = _modules()


def _resolve(module: Module, node: ast.ImportFrom) -> str:
    """The absolute module a `from ... import` names (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = module.name.split(".")
    base = base[: len(base) - node.level + (1 if module.is_package else 0)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imports(module: Module) -> Iterator[str]:
    """Every module `module` imports, at any depth (functions and TYPE_CHECKING blocks included);
    `from package import submodule` counts as the submodule."""
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, node)
            subs = [f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in MODULES]
            yield from subs if len(subs) == len(node.names) else [source, *subs]


def _in(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _ours(module: Module) -> set[str]:
    return {i for i in imports(module) if _in(i, "appliance")}


def _closure(start: str) -> set[str]:
    """Every module of ours loaded by importing `start` (package __init__ files included)."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        name = todo.pop()
        if name in seen or name not in MODULES:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parents run their __init__
        todo += _ours(MODULES[name])
    return seen


def _under(package: str) -> list[Module]:
    return [m for name, m in MODULES.items() if _in(name, package)]


def test_the_tree_is_parsed() -> None:
    assert {"appliance.web.app", "appliance.engine.types", "appliance.client.ask"} <= set(MODULES)


def test_only_the_engine_imports_llama_cpp() -> None:
    """And inside the engine, one module: engine.bindings is the single door to the native library."""
    found = sorted(m.name for m in MODULES.values() if any(_in(i, "llama_cpp") for i in imports(m)))
    assert found == ["appliance.engine.bindings"]


def test_web_security_and_audit_use_only_the_engines_data_types() -> None:
    found = sorted(
        (m.name, i)
        for pkg in ("appliance.web", "appliance.security", "appliance.audit")
        for m in _under(pkg)
        for i in _ours(m)
        if _in(i, "appliance.engine") and i != "appliance.engine.types"
    )
    assert [f for f in found if f not in ENGINE_FRONT_DOOR] == []
    assert set(found) == ENGINE_FRONT_DOOR, "an import listed in ENGINE_FRONT_DOOR is gone: drop its row"


def test_the_daemon_never_loads_admin_code() -> None:
    found = sorted(
        (m.name, i) for m in _under("appliance.daemon") for i in _closure(m.name) if _in(i, "appliance.admin")
    )
    assert found == []


def test_the_staff_client_loads_nothing_of_the_daemon() -> None:
    allowed = LEAVES | {"appliance.security", "appliance.security.pki"}
    found = sorted(
        (m.name, i)
        for m in _under("appliance.client")
        for i in _closure(m.name)
        if i not in allowed and not _in(i, "appliance.client")
    )
    assert found == []


def test_models_never_import_admin_or_daemon_code() -> None:
    found = sorted(
        (m.name, i)
        for m in _under("appliance.models")
        for i in _closure(m.name)
        if _in(i, "appliance.admin") or _in(i, "appliance.daemon")
    )
    assert found == []


def test_leaves_import_only_leaves() -> None:
    found = sorted((name, i) for name in LEAVES for i in _ours(MODULES[name]) if i not in LEAVES)
    assert found == []


def test_every_package_says_what_it_owns_and_never_imports() -> None:
    """Each package's __init__ docstring: what it owns, and what it must never import."""
    vague = sorted(
        m.name
        for m in MODULES.values()
        if m.is_package and m.name != "appliance" and "never" not in (ast.get_docstring(m.tree) or "").lower()
    )
    assert vague == []


def test_no_module_over_400_lines() -> None:
    long = sorted(
        (m.name, n)
        for m in MODULES.values()
        if (n := len(m.path.read_text().splitlines())) > MAX_MODULE_LINES
    )
    assert long == []


def test_no_function_over_60_lines() -> None:
    long = sorted(
        (m.name, f.name, n)
        for m in MODULES.values()
        for f in ast.walk(m.tree)
        if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
        and (n := (f.end_lineno or f.lineno) - f.lineno + 1) > MAX_FUNCTION_LINES
    )
    assert long == []
