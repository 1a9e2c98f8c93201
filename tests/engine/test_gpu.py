"""GPU health: the real NVML degrade path on this GPU-less machine, and the populated path through a
pynvml-compatible fake (the one fake in the suite: no GPU exists here to read real values from)."""

from __future__ import annotations

import ctypes.util
import json
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest

from appliance.engine.gpu import GpuMonitor, critical_reasons

NOT_SUPPORTED, NO_PERMISSION, DRIVER_NOT_LOADED = 3, 4, 9
FUNCTION_NOT_FOUND, GPU_IS_LOST, UNKNOWN = 13, 15, 999
HAS_NVML = ctypes.util.find_library("nvidia-ml") is not None


class NVMLError(Exception):
    """Like pynvml.NVMLError: carries the NVML return code in `.value`."""

    TEXT: ClassVar[dict[int, str]] = {
        NOT_SUPPORTED: "Not Supported",
        NO_PERMISSION: "Insufficient Permissions",
        DRIVER_NOT_LOADED: "Driver Not Loaded",
        FUNCTION_NOT_FOUND: "Function Not Found",
        GPU_IS_LOST: "GPU is lost",
        UNKNOWN: "Unknown Error",
    }

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return self.TEXT[self.value]


class FakeNvml:
    """The pynvml calls GpuMonitor makes, over a list of per-device dicts; a value that is an int
    error code in `fail` raises NVMLError(code) instead."""

    NVMLError = NVMLError

    def __init__(self, devices: list[dict[str, Any]]) -> None:
        self.devices = devices
        self.init_error: int | None = None
        self.count_hook: Callable[[], None] = lambda: None
        self.calls = {"init": 0, "shutdown": 0, "count": 0}

    def nvmlInit(self) -> None:
        self.calls["init"] += 1
        if self.init_error is not None:
            raise NVMLError(self.init_error)

    def nvmlShutdown(self) -> None:
        self.calls["shutdown"] += 1

    def nvmlDeviceGetCount(self) -> int:
        self.calls["count"] += 1
        self.count_hook()
        return len(self.devices)

    def nvmlSystemGetDriverVersion(self) -> str:
        return "550.54.15"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return 12040

    def nvmlDeviceGetHandleByIndex(self, i: int) -> dict[str, Any]:
        return self._v(self.devices[i], "handle", self.devices[i])  # type: ignore[no-any-return]

    @staticmethod
    def _v(h: dict[str, Any], key: str, default: Any = None) -> Any:
        value = h.get("fail", {}).get(key)
        if value is not None:
            raise NVMLError(value)
        return h.get(key, default)

    def nvmlDeviceGetName(self, h: dict[str, Any]) -> Any:
        return self._v(h, "name")

    def nvmlDeviceGetUUID(self, h: dict[str, Any]) -> Any:
        return self._v(h, "uuid")

    def nvmlDeviceGetMemoryInfo(self, h: dict[str, Any]) -> Any:
        used, total = self._v(h, "memory")
        return SimpleNamespace(used=used, total=total, free=total - used)

    def nvmlDeviceGetUtilizationRates(self, h: dict[str, Any]) -> Any:
        return SimpleNamespace(gpu=self._v(h, "util"), memory=0)

    def nvmlDeviceGetTemperature(self, h: dict[str, Any], sensor: int) -> Any:
        assert sensor == 0
        return self._v(h, "temp")

    def nvmlDeviceGetTemperatureThreshold(self, h: dict[str, Any], kind: int) -> Any:
        assert kind == 1  # NVML_TEMPERATURE_THRESHOLD_SLOWDOWN
        return self._v(h, "slowdown")

    def nvmlDeviceGetPowerUsage(self, h: dict[str, Any]) -> Any:
        return self._v(h, "power_mw")

    def nvmlDeviceGetEnforcedPowerLimit(self, h: dict[str, Any]) -> Any:
        return self._v(h, "limit_mw")

    def nvmlDeviceGetCurrentClocksEventReasons(self, h: dict[str, Any]) -> Any:
        return self._v(h, "events")

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, h: dict[str, Any]) -> Any:
        return self._v(h, "throttle")

    def nvmlDeviceGetTotalEccErrors(self, h: dict[str, Any], kind: int, counter: int) -> Any:
        assert counter == 0  # volatile: since the driver loaded
        return self._v(h, "ecc_unc" if kind == 1 else "ecc_corr")

    def nvmlDeviceGetRetiredPagesPendingStatus(self, h: dict[str, Any]) -> Any:
        return self._v(h, "retired_pending")

    def nvmlDeviceGetRemappedRows(self, h: dict[str, Any]) -> Any:
        return self._v(h, "rows")


def h100(**over: Any) -> dict[str, Any]:
    """A healthy data-centre GPU: every field supported, no retired pages (row remapping instead)."""
    dev: dict[str, Any] = {
        "name": "NVIDIA H100 80GB HBM3",
        "uuid": "GPU-0c1f3f2e-aaaa-bbbb-cccc-1234567890ab",
        "memory": (5 * 1024**3, 80 * 1024**3),
        "util": 37,
        "temp": 41,
        "slowdown": 87,
        "power_mw": 123456,
        "limit_mw": 700000,
        "events": 0x1 | 0x4,
        "ecc_unc": 0,
        "ecc_corr": 2,
        "rows": (0, 0, 0, 0),
        "fail": {"retired_pending": NOT_SUPPORTED},
    }
    return dev | over


def geforce() -> dict[str, Any]:
    """A workstation card: bytes name (older pynvml), no ECC, no power reading, an old driver."""
    return {
        "name": b"NVIDIA RTX A2000",
        "uuid": b"GPU-2",
        "memory": (0, 6 * 1024**3),
        "util": 0,
        "temp": 30,
        "throttle": 0x40 | 0x400,
        "fail": {
            "slowdown": NOT_SUPPORTED,
            "power_mw": NOT_SUPPORTED,
            "limit_mw": NOT_SUPPORTED,
            "ecc_unc": NOT_SUPPORTED,
            "ecc_corr": NOT_SUPPORTED,
            "retired_pending": NOT_SUPPORTED,
            "rows": NOT_SUPPORTED,
            "events": FUNCTION_NOT_FOUND,
        },
    }


# --- the real library on this machine ----------------------------------------------------------------


@pytest.mark.skipif(HAS_NVML, reason="this machine has an NVIDIA driver")
def test_without_a_driver_the_snapshot_says_so_in_plain_words() -> None:
    mon = GpuMonitor()
    snap = mon.poll_once()
    assert snap["available"] is False
    assert snap["reason"] == "NVML library not found (no NVIDIA driver installed)"
    assert json.loads(json.dumps(snap)) == snap
    assert critical_reasons(snap, 85, True) == []
    assert critical_reasons(snap, 85, True, require_gpu=True) == [
        "no usable GPU: NVML library not found (no NVIDIA driver installed)"
    ]


@pytest.mark.skipif(not HAS_NVML, reason="no NVIDIA driver on this machine")
def test_with_a_driver_the_snapshot_lists_the_gpus() -> None:
    snap = GpuMonitor().poll_once()
    assert json.loads(json.dumps(snap)) == snap
    assert snap["available"] is True or "NVIDIA" in snap["reason"] or "GPU" in snap["reason"]


def test_real_monitor_thread_starts_and_stops_cleanly() -> None:
    mon = GpuMonitor()
    mon.start(0.01)
    time.sleep(0.1)
    snap = mon.snapshot()
    mon.stop()
    assert snap["polled_at"] is not None and isinstance(snap["available"], bool)


# --- the populated path, through the fake ------------------------------------------------------------


def test_snapshot_of_two_gpus_with_unsupported_fields_as_none() -> None:
    snap = GpuMonitor(nvml=FakeNvml([h100(), geforce()])).poll_once()
    assert json.loads(json.dumps(snap)) == snap
    assert snap["available"] is True and snap["driver_version"] == "550.54.15"
    assert snap["cuda_version"] == "12.4" and snap["polled_at"].endswith("+00:00")
    first, second = snap["devices"]
    assert first == {
        "index": 0,
        "name": "NVIDIA H100 80GB HBM3",
        "uuid": "GPU-0c1f3f2e-aaaa-bbbb-cccc-1234567890ab",
        "memory_used_mb": 5120,
        "memory_total_mb": 81920,
        "utilization_gpu_pct": 37,
        "temperature_c": 41,
        "temperature_slowdown_c": 87,
        "power_w": 123.5,
        "power_limit_w": 700.0,
        "clocks_throttle_reasons": ["gpu_idle", "sw_power_cap"],
        "ecc_uncorrected_volatile": 0,
        "ecc_corrected_volatile": 2,
        "retired_pages_pending": None,
        "remapped_rows_pending": False,
        "remapped_rows_failure": False,
        "gpu_lost": False,
        "errors": {},
    }
    assert second["name"] == "NVIDIA RTX A2000" and second["uuid"] == "GPU-2"
    for field in (
        "temperature_slowdown_c",
        "power_w",
        "power_limit_w",
        "ecc_uncorrected_volatile",
        "ecc_corrected_volatile",
        "retired_pages_pending",
        "remapped_rows_pending",
        "remapped_rows_failure",
    ):
        assert second[field] is None, field
    # An old driver lacks the "clocks event" call: the older "throttle reasons" call answers instead.
    assert second["clocks_throttle_reasons"] == ["hw_thermal_slowdown", "other_0x400"]
    assert second["errors"] == {}  # NotSupported is normal, not an error


def test_other_field_errors_are_none_and_noted() -> None:
    snap = GpuMonitor(nvml=FakeNvml([h100(fail={"util": UNKNOWN, "temp": NO_PERMISSION})])).poll_once()
    dev = snap["devices"][0]
    assert dev["utilization_gpu_pct"] is None and dev["temperature_c"] is None
    assert dev["errors"] == {
        "utilization_gpu_pct": "Unknown Error",
        "temperature_c": "Insufficient Permissions",
    }
    assert dev["memory_total_mb"] == 81920  # the rest is still read


def test_a_lost_gpu_is_critical() -> None:
    snap = GpuMonitor(nvml=FakeNvml([h100(fail={"temp": GPU_IS_LOST, "util": GPU_IS_LOST})])).poll_once()
    assert snap["devices"][0]["gpu_lost"] is True
    assert critical_reasons(snap, None, False) == [
        "GPU 0 (NVIDIA H100 80GB HBM3): GPU is lost (fell off the bus); reset the GPU or reboot"
    ]


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (DRIVER_NOT_LOADED, "NVIDIA driver not loaded (is the nvidia kernel module installed?)"),
        (
            NO_PERMISSION,
            "no permission to open the NVIDIA devices (check /dev/nvidia* and the unit's DeviceAllow=)",
        ),
        (UNKNOWN, "NVML error: Unknown Error"),
    ],
)
def test_init_failures_have_plain_reasons(code: int, reason: str) -> None:
    fake = FakeNvml([h100()])
    fake.init_error = code
    snap = GpuMonitor(nvml=fake).poll_once()
    assert snap.pop("polled_at") and snap == {"available": False, "reason": reason}


def test_driver_with_no_gpus() -> None:
    snap = GpuMonitor(nvml=FakeNvml([])).poll_once()
    assert snap["available"] is False and snap["reason"].startswith("no NVIDIA GPU found")


def test_critical_reasons_temperature_and_memory_errors() -> None:
    sick = h100(temp=91, ecc_unc=3, rows=(0, 1, 1, 1))
    snap = GpuMonitor(nvml=FakeNvml([sick, h100()])).poll_once()
    label = "GPU 0 (NVIDIA H100 80GB HBM3)"
    assert critical_reasons(snap, 85, True) == [
        f"{label}: temperature 91 °C above the limit of 85 °C",
        f"{label}: 3 uncorrected ECC memory errors since the driver loaded; reset the GPU",
        f"{label}: memory rows are waiting to be remapped; reset the GPU",
        f"{label}: memory row remapping failed; the GPU needs service",
    ]
    assert critical_reasons(snap, None, False) == []
    assert critical_reasons(snap, 91, False) == []  # at the limit is not above it


def test_retired_pages_pending_is_critical_on_older_gpus() -> None:
    snap = GpuMonitor(nvml=FakeNvml([h100(retired_pending=1, fail={})])).poll_once()
    assert snap["devices"][0]["retired_pages_pending"] is True
    assert critical_reasons(snap, None, True) == [
        "GPU 0 (NVIDIA H100 80GB HBM3): memory pages are waiting to be retired; reset the GPU"
    ]


def test_snapshot_is_a_copy() -> None:
    mon = GpuMonitor(nvml=FakeNvml([h100()]))
    mon.poll_once()
    mon.snapshot()["devices"][0]["temperature_c"] = 999
    assert mon.snapshot()["devices"][0]["temperature_c"] == 41


# --- the polling thread ------------------------------------------------------------------------------


def _wait_for(cond: Callable[[], bool], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def test_thread_polls_and_follows_changes() -> None:
    dev = h100()
    fake = FakeNvml([dev])
    mon = GpuMonitor(nvml=fake)
    mon.start(0.01)
    try:
        assert mon.snapshot()["devices"][0]["temperature_c"] == 41  # start() polled once already
        dev["temp"] = 77
        _wait_for(lambda: mon.snapshot()["devices"][0]["temperature_c"] == 77)
        assert fake.calls["count"] >= 2
    finally:
        mon.stop()
    assert fake.calls["shutdown"] == 1
    polls = fake.calls["count"]
    time.sleep(0.05)
    assert fake.calls["count"] == polls  # stopped means stopped


def test_a_failing_poll_never_kills_the_thread_and_nvml_is_reinitialised() -> None:
    fake = FakeNvml([h100()])
    failing = threading.Event()

    def hook() -> None:
        if failing.is_set():
            raise RuntimeError("driver hiccup")

    fake.count_hook = hook
    mon = GpuMonitor(nvml=fake)
    mon.start(0.01)
    try:
        failing.set()
        _wait_for(lambda: mon.snapshot()["available"] is False)
        assert mon.snapshot()["reason"] == "GPU poll failed: RuntimeError: driver hiccup"
        failing.clear()
        _wait_for(lambda: mon.snapshot()["available"] is True)
        assert fake.calls["init"] >= 2 and fake.calls["shutdown"] >= 1
    finally:
        mon.stop()


def test_snapshot_does_not_wait_for_a_stuck_poll() -> None:
    """A hung driver call blocks only the polling thread; the event loop's snapshot() returns at once."""
    fake = FakeNvml([h100()])
    mon = GpuMonitor(nvml=fake)
    mon.start(0.01)
    stuck, entered = threading.Event(), threading.Event()

    def hang() -> None:
        entered.set()
        stuck.wait(10)

    fake.count_hook = hang
    try:
        assert entered.wait(5)
        t0 = time.perf_counter()
        snap = mon.snapshot()
        assert time.perf_counter() - t0 < 0.05
        assert snap["available"] is True and snap["devices"][0]["temperature_c"] == 41  # the last poll
    finally:
        fake.count_hook = lambda: None
        stuck.set()
        mon.stop()


def test_a_value_of_the_wrong_shape_is_none_and_noted() -> None:
    """A library returning something unexpected (a newer struct, a bug) costs that field only."""
    snap = GpuMonitor(nvml=FakeNvml([h100(temp="hot", rows=(1,))])).poll_once()
    dev = snap["devices"][0]
    assert dev["temperature_c"] is None and dev["remapped_rows_pending"] is None
    assert dev["errors"] == {
        "temperature_c": "unexpected value from NVML (ValueError)",
        "remapped_rows": "unexpected value from NVML (IndexError)",
    }
    assert json.loads(json.dumps(snap)) == snap and dev["utilization_gpu_pct"] == 37
