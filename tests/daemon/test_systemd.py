"""The systemd units, checked by systemd's own tools (252 here), and `make install` into a staging root.

`systemd-analyze verify` insists that ExecStart= exists. `verify --root=DIR` would look it up inside DIR,
but in systemd 252 it then also needs every unit the service depends on (sysinit.target, ...) and /bin/kill
inside DIR, i.e. a whole OS tree; so the test verifies a temporary copy whose ExecStart= points at this
checkout's own `qwen-appliance` script instead.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT

UNITS = ROOT / "systemd"
SERVICE, SOCKET = UNITS / "qwen-appliance.service", UNITS / "qwen-appliance.socket"
MAX_EXPOSURE = 1.5
needs = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze absent")


def _run(*cmd: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120, check=False)


def _directives(unit: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


@needs
def test_service_exposure_is_low() -> None:
    proc = _run("systemd-analyze", "security", "--offline=yes", SERVICE)
    found = re.search(r"Overall exposure level for qwen-appliance\.service: (\d+\.\d)", proc.stdout)
    assert found, proc.stdout + proc.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE, proc.stdout


@needs
def test_units_verify_cleanly(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "qwen-appliance"
    assert script.is_file(), "the checkout's venv has no qwen-appliance script (pip install -e .)"
    text = SERVICE.read_text()
    assert "ExecStart=/opt/qwen-appliance/.venv/bin/qwen-appliance " in text
    (tmp_path / SERVICE.name).write_text(text.replace("/opt/qwen-appliance/.venv/bin/", f"{script.parent}/"))
    shutil.copy(SOCKET, tmp_path / SOCKET.name)
    proc = _run("systemd-analyze", "verify", tmp_path / SERVICE.name, tmp_path / SOCKET.name)
    ours = [line for line in proc.stderr.splitlines() if "qwen-appliance" in line]
    assert proc.returncode == 0 and ours == [], proc.stderr


@needs
def test_verify_does_check_execstart() -> None:
    """The rewrite above is needed, and it is the only thing verify has to say about the originals."""
    proc = _run("systemd-analyze", "verify", SERVICE, SOCKET)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "qwen-appliance.service: Command /opt/qwen-appliance/.venv/bin/qwen-appliance is not executable: "
        "No such file or directory"
    ]


def test_service_keeps_the_agreed_contract() -> None:
    d = _directives(SERVICE)
    for key, value in {
        "Type": "notify",
        "NotifyAccess": "main",
        "User": "qwen-appliance",
        "WatchdogSec": "30",
        "TimeoutStopSec": "60",
        "KillSignal": "SIGTERM",
        "Restart": "on-failure",
        "LimitCORE": "0",
        "UMask": "0077",
        "Environment": "OMP_WAIT_POLICY=PASSIVE",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "ExecStart": "/opt/qwen-appliance/.venv/bin/qwen-appliance serve "
        "--policy /etc/qwen-appliance/policy.toml",
        "PrivateNetwork": "yes",
        "RestrictAddressFamilies": "AF_UNIX",
        "DevicePolicy": "closed",
        "NoNewPrivileges": "yes",
        "ProcSubset": "all",
        "PrivateDevices": "no",
    }.items():
        assert d.get(key) == [value], key
    assert set(d["DeviceAllow"]) == {
        "/dev/nvidiactl rw",
        "char-nvidia-frontend rw",
        "/dev/nvidia-uvm rw",
        "/dev/nvidia-uvm-tools rw",
    }
    assert d["Requires"] == ["qwen-appliance.socket"]


def test_socket_unit_is_the_second_network_gate() -> None:
    d = _directives(SOCKET)
    assert d["ListenStream"] == ["0.0.0.0:8443"] and d["Accept"] == ["no"]
    assert d["IPAddressDeny"] == ["any"] and d["IPAddressAllow"] == ["localhost"]


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    (tmp_path / "etc").mkdir()
    return tmp_path


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers absent")
def test_sysusers_creates_the_service_user(image_root: Path) -> None:
    conf = UNITS / "qwen-appliance.sysusers"
    assert _run("systemd-sysusers", "--dry-run", conf).returncode == 0
    proc = _run("systemd-sysusers", f"--root={image_root}", conf)
    assert proc.returncode == 0, proc.stderr
    entry = _passwd(image_root)["qwen-appliance"]
    assert entry[4:] == ["qwen-appliance daemon", "/var/lib/qwen-appliance", "/usr/sbin/nologin"]
    assert 0 < int(entry[2]) < 1000  # a system user


def _passwd(root: Path) -> dict[str, list[str]]:
    rows = (line.split(":") for line in (root / "etc/passwd").read_text().splitlines())
    return {row[0]: row for row in rows}


@pytest.mark.skipif(
    shutil.which("systemd-tmpfiles") is None or shutil.which("systemd-sysusers") is None,
    reason="systemd-tmpfiles or systemd-sysusers absent",
)
def test_tmpfiles_lays_out_private_directories(image_root: Path) -> None:
    """No --dry-run in 252: create the tree for real under a throw-away root, the user from sysusers."""
    assert _run("systemd-sysusers", f"--root={image_root}", UNITS / "qwen-appliance.sysusers").returncode == 0
    proc = _run("systemd-tmpfiles", "--create", f"--root={image_root}", UNITS / "qwen-appliance.tmpfiles")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    uid = int(_passwd(image_root)["qwen-appliance"][2])
    expect = {
        "var/lib/qwen-appliance": (0o750, uid, uid),
        "var/lib/qwen-appliance/models": (0o750, 0, uid),
        "var/log/qwen-appliance": (0o700, uid, uid),
        "run/qwen-appliance": (0o750, uid, uid),
    }
    for rel, (mode, owner, group) in expect.items():
        st = (image_root / rel).stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (mode, owner, group), rel


# --- make install DESTDIR=... ------------------------------------------------------------------------


def _system_python() -> str | None:
    """A base interpreter outside /root and /home, like the branch server's /usr/bin/python3."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if Path(candidate).exists() and _run(candidate, "-c", "import ensurepip, venv").returncode == 0:
            return candidate
    return None


@dataclass(frozen=True)
class Staged:
    root: Path
    uid: int | None  # the service user's uid where make install could chown, else None
    prefix: tuple[str, ...] = ()  # runs a command where that user exists (as on the branch box)


def _namespace_with_user(work: Path) -> tuple[list[str], int | None]:
    """As root: run make in a private mount namespace whose /etc/passwd and /etc/group (copies, plus the
    user from our sysusers file) let chown work, without adding a user to this host."""
    if os.geteuid() != 0 or not all(shutil.which(t) for t in ("unshare", "systemd-sysusers")):
        return [], None
    if _run("unshare", "-m", "true").returncode != 0:
        return [], None  # e.g. a container without CAP_SYS_ADMIN
    (work / "etc").mkdir()
    for name in ("passwd", "group", "shadow", "gshadow"):
        if Path("/etc", name).exists():
            shutil.copy2(Path("/etc", name), work / "etc" / name)
    assert _run("systemd-sysusers", f"--root={work}", UNITS / "qwen-appliance.sysusers").returncode == 0
    binds = " && ".join(f"mount --bind {work}/etc/{n} /etc/{n}" for n in ("passwd", "group"))
    uid = int(_passwd(work)["qwen-appliance"][2])
    return ["unshare", "-m", "sh", "-c", f'{binds} && exec "$@"', "sh"], uid


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Staged]:
    if shutil.which("make") is None:
        pytest.skip("make absent")
    dest = tmp_path_factory.mktemp("destdir")
    prefix, uid = _namespace_with_user(tmp_path_factory.mktemp("etc-copy"))
    python = _system_python()
    cmd = [
        *prefix,
        "make",
        "-C",
        str(ROOT),
        "install",
        f"DESTDIR={dest}",
        *([f"PYTHON={python}"] if python else []),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    yield Staged(dest, uid, tuple(prefix))


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_install_lays_out_the_tree(staged: Staged) -> None:
    venv = staged.root / "opt/qwen-appliance/.venv"
    shebang = (venv / "bin/qwen-appliance").read_text().splitlines()[0]
    assert shebang == "#!/opt/qwen-appliance/.venv/bin/python"  # where it will run, not the staging root
    assert str(staged.root) not in (venv / "pyvenv.cfg").read_text()
    for rel in (
        "etc/systemd/system/qwen-appliance.service",
        "etc/systemd/system/qwen-appliance.socket",
        "etc/sysusers.d/qwen-appliance.conf",
        "etc/tmpfiles.d/qwen-appliance.conf",
    ):
        assert _mode(staged.root / rel) == 0o644, rel
    assert (staged.root / "etc/systemd/system/qwen-appliance.service").read_text() == SERVICE.read_text()
    assert _mode(staged.root / "opt/qwen-appliance") == 0o755 and _mode(venv / "bin/python") == 0o755


def test_install_runs_the_installed_code(staged: Staged) -> None:
    venv_python = staged.root / "opt/qwen-appliance/.venv/bin/python"
    code = (
        "import appliance.daemon.sdnotify, appliance.engine.gpu, appliance.daemon.harden, llama_cpp; "
        "print(llama_cpp.__file__)"
    )
    proc = _run(venv_python, "-c", code)
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr


CONF_MODES = {
    ".": 0o750,
    "policy.toml": 0o640,
    "tls": 0o750,
    "tls/server.crt": 0o640,
    "tls/ca.crt": 0o640,
    "tls/server.key": 0o600,
    "tls/ca.key": 0o600,
    "audit.key": 0o600,
    "clients": 0o700,
    "data": 0o750,
}


def test_install_config_modes_pass_the_daemons_own_checks(staged: Staged) -> None:
    conf = staged.root / "etc/qwen-appliance"
    for rel, mode in CONF_MODES.items():
        assert _mode(conf / rel) == mode, rel
    assert 'dir = "/var/log/qwen-appliance"' in (conf / "policy.toml").read_text()
    # `policy check` runs every start-up check but the model load: only the absent model files may fail.
    python = staged.root / "opt/qwen-appliance/.venv/bin/python"
    proc = _run(*staged.prefix, python, "-m", "appliance", "policy", "check", conf / "policy.toml")
    problems = proc.stdout.strip().splitlines() + proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and problems, problems
    assert all(
        "[model.path]: file not found" in p or "[model.mmproj]: file not found" in p for p in problems
    ), problems


def test_install_owners_let_the_daemon_read_only_what_it_needs(staged: Staged) -> None:
    if staged.uid is None:
        pytest.skip("not root, or no private mount namespace: make install DESTDIR= skipped chown")
    svc = staged.uid  # sysusers gives the group the same number
    conf = staged.root / "etc/qwen-appliance"
    owners = {
        ".": (0, svc),
        "policy.toml": (0, svc),
        "tls": (0, svc),
        "tls/server.crt": (0, svc),
        "tls/ca.crt": (0, svc),
        "data": (0, svc),
        "tls/server.key": (svc, svc),
        "audit.key": (svc, svc),
        "tls/ca.key": (0, 0),
        "clients": (0, 0),
    }  # the CA key and client bundles stay root's
    for rel, (uid, gid) in owners.items():
        st = (conf / rel).stat()
        assert (st.st_uid, st.st_gid) == (uid, gid), rel
