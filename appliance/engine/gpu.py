"""GPU health through NVML, polled in a background thread so requests never wait on the driver.

A hot, throttled or memory-corrupting GPU gives slow or wrong answers without any error from llama.cpp;
NVML sees it. With no driver or no GPU the snapshot says so in plain words instead of failing.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

log = logging.getLogger("appliance.engine.gpu")

MIB = 1024 * 1024
# NVML return codes (nvml.h); the fake in the tests uses the same numbers.
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_NOT_SUPPORTED = 3
NVML_TEMPERATURE_GPU = 0
NVML_TEMPERATURE_THRESHOLD_SLOWDOWN = 1
NVML_MEMORY_ERROR_TYPE_CORRECTED, NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 0, 1
NVML_VOLATILE_ECC = 0

_REASONS = {
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML library not found (no NVIDIA driver installed)",
    NVML_ERROR_DRIVER_NOT_LOADED: "NVIDIA driver not loaded (is the nvidia kernel module installed?)",
    NVML_ERROR_NO_PERMISSION: "no permission to open the NVIDIA devices (check /dev/nvidia* and the "
    "unit's DeviceAllow=)",
    NVML_ERROR_GPU_IS_LOST: "the GPU has fallen off the bus (GPU is lost); the host needs attention",
}

# nvmlClocksEventReason* bits (formerly "throttle reasons").
THROTTLE_REASONS = (
    (0x1, "gpu_idle"),
    (0x2, "applications_clocks_setting"),
    (0x4, "sw_power_cap"),
    (0x8, "hw_slowdown"),
    (0x10, "sync_boost"),
    (0x20, "sw_thermal_slowdown"),
    (0x40, "hw_thermal_slowdown"),
    (0x80, "hw_power_brake_slowdown"),
    (0x100, "display_clock_setting"),
)

Snapshot = dict[str, Any]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _unavailable(reason: str) -> Snapshot:
    return {"available": False, "reason": reason, "polled_at": _now()}


def _import_pynvml() -> tuple[Any, str | None]:
    try:
        import pynvml  # provided by nvidia-ml-py
    except ImportError:
        return None, "pynvml module not installed (pip install nvidia-ml-py)"
    return pynvml, None


def _message(exc: BaseException) -> str:
    """str() of an NVMLError asks the library for the text; never let that fail."""
    try:
        return str(exc) or type(exc).__name__
    except Exception:
        return type(exc).__name__


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _reasons(mask: Any) -> list[str]:
    bits = int(mask)
    names = [name for bit, name in THROTTLE_REASONS if bits & bit]
    known = sum(bit for bit, _ in THROTTLE_REASONS)
    return names + ([f"other_{bits & ~known:#x}"] if bits & ~known else [])


def _cuda(version: Any) -> str:
    v = int(version)  # e.g. 12040 -> "12.4"
    return f"{v // 1000}.{v % 1000 // 10}"


class _Reader:
    """Calls NVML getters one at a time: NotSupported gives None; other failures give None and a note."""

    def __init__(self, nvml: Any) -> None:
        self.nvml = nvml
        self.errors: dict[str, str] = {}
        self.lost = False

    def get(
        self,
        field: str,
        names: str | tuple[str, ...],
        *args: Any,
        convert: Callable[[Any], Any] = lambda v: v,
    ) -> Any:
        """The first of `names` this library and driver provide, called with args, then converted."""
        for name in (names,) if isinstance(names, str) else names:
            fn = getattr(self.nvml, name, None)
            if fn is None:
                continue  # an older nvidia-ml-py
            try:
                raw = fn(*args)
            except Exception as exc:
                code = getattr(exc, "value", None)
                if code == NVML_ERROR_FUNCTION_NOT_FOUND:
                    continue  # an older driver: try the next name
                self._note(field, exc, code)
                return None
            return self._convert(field, raw, convert)
        self.errors[field] = "not provided by this NVML version"
        return None

    def _convert(self, field: str, raw: Any, convert: Callable[[Any], Any]) -> Any:
        try:
            return convert(raw)
        except (TypeError, ValueError, AttributeError, IndexError) as exc:
            self.errors[field] = f"unexpected value from NVML ({type(exc).__name__})"
            return None

    def _note(self, field: str, exc: Exception, code: Any) -> None:
        self.lost = self.lost or code == NVML_ERROR_GPU_IS_LOST
        if code != NVML_ERROR_NOT_SUPPORTED:
            self.errors[field] = _message(exc)


def read_device(nvml: Any, index: int) -> dict[str, Any]:
    """Every health field of one GPU; a field the GPU or driver cannot report is None."""
    r = _Reader(nvml)
    h = r.get("handle", "nvmlDeviceGetHandleByIndex", index)
    if h is None:
        return {"index": index, "gpu_lost": r.lost, "errors": r.errors}
    mem = r.get("memory", "nvmlDeviceGetMemoryInfo", h, convert=lambda m: (int(m.used), int(m.total)))
    rows = r.get("remapped_rows", "nvmlDeviceGetRemappedRows", h, convert=lambda t: (bool(t[2]), bool(t[3])))
    ecc = "nvmlDeviceGetTotalEccErrors"
    device: dict[str, Any] = {
        "index": index,
        "name": r.get("name", "nvmlDeviceGetName", h, convert=_text),
        "uuid": r.get("uuid", "nvmlDeviceGetUUID", h, convert=_text),
        "memory_used_mb": mem[0] // MIB if mem else None,
        "memory_total_mb": mem[1] // MIB if mem else None,
        "utilization_gpu_pct": r.get(
            "utilization_gpu_pct", "nvmlDeviceGetUtilizationRates", h, convert=lambda u: int(u.gpu)
        ),
        "temperature_c": r.get(
            "temperature_c", "nvmlDeviceGetTemperature", h, NVML_TEMPERATURE_GPU, convert=int
        ),
        "temperature_slowdown_c": r.get(
            "temperature_slowdown_c",
            "nvmlDeviceGetTemperatureThreshold",
            h,
            NVML_TEMPERATURE_THRESHOLD_SLOWDOWN,
            convert=int,
        ),
        "power_w": r.get("power_w", "nvmlDeviceGetPowerUsage", h, convert=lambda mw: round(mw / 1000, 1)),
        "power_limit_w": r.get(
            "power_limit_w", "nvmlDeviceGetEnforcedPowerLimit", h, convert=lambda mw: round(mw / 1000, 1)
        ),
        "clocks_throttle_reasons": r.get(
            "clocks_throttle_reasons",
            ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"),
            h,
            convert=_reasons,
        ),
        "ecc_uncorrected_volatile": r.get(
            "ecc_uncorrected_volatile",
            ecc,
            h,
            NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
            NVML_VOLATILE_ECC,
            convert=int,
        ),
        "ecc_corrected_volatile": r.get(
            "ecc_corrected_volatile", ecc, h, NVML_MEMORY_ERROR_TYPE_CORRECTED, NVML_VOLATILE_ECC, convert=int
        ),
        "retired_pages_pending": r.get(
            "retired_pages_pending", "nvmlDeviceGetRetiredPagesPendingStatus", h, convert=bool
        ),
        "remapped_rows_pending": rows[0] if rows else None,
        "remapped_rows_failure": rows[1] if rows else None,
    }
    return device | {"gpu_lost": r.lost, "errors": r.errors}


class GpuMonitor:
    """Polls NVML every interval in a daemon thread; snapshot() returns the last result without waiting."""

    def __init__(self, nvml: Any = None) -> None:
        """`nvml`: a pynvml-compatible module; None imports the real one (from nvidia-ml-py)."""
        self._nvml, self._import_error = (nvml, None) if nvml is not None else _import_pynvml()
        self._initialized = False
        self._snapshot: Snapshot = {"available": False, "reason": "GPU not polled yet", "polled_at": None}
        self._stop = threading.Event()
        self._poll_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self, interval_s: float = 10.0) -> None:
        """Poll once now (so the first snapshot is real), then every interval_s; call it outside the loop."""
        if self._thread is not None:
            return
        self.poll_once()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), name="gpu-monitor", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop polling and release NVML (unless a poll is stuck in the driver; the thread is a daemon)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive():
                log.warning("GPU poll still running after %.0f s; leaving NVML initialised", timeout_s)
                return
        with self._poll_lock:
            self._shutdown()

    def snapshot(self) -> Snapshot:
        """The last poll's result (a copy, JSON-safe); never touches NVML, so it never blocks."""
        return copy.deepcopy(self._snapshot)

    def poll_once(self) -> Snapshot:
        """Poll now (blocking, in the caller's thread) and cache the result."""
        with self._poll_lock:
            snap = self._poll()
            self._log_change(self._snapshot, snap)
            self._snapshot = snap  # one reference swap: readers see the old or the new dict, whole
        return copy.deepcopy(snap)

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.poll_once()
            except Exception:  # _poll already catches NVML's failures; this guards the thread itself
                log.exception("GPU monitor: poll failed")

    def _poll(self) -> Snapshot:
        if self._nvml is None:
            return _unavailable(self._import_error or "NVML unavailable")
        try:
            if not self._initialized:
                self._nvml.nvmlInit()
                self._initialized = True
            return self._read_all()
        except Exception as exc:  # never raise out of the polling thread
            self._shutdown()  # initialise afresh next time (driver reloaded, GPU back)
            return _unavailable(self._reason(exc))

    def _read_all(self) -> Snapshot:
        n = self._nvml
        count = int(n.nvmlDeviceGetCount())
        if count == 0:
            return _unavailable("no NVIDIA GPU found (the driver is loaded but reports 0 devices)")
        r = _Reader(n)
        return {
            "available": True,
            "driver_version": r.get("driver_version", "nvmlSystemGetDriverVersion", convert=_text),
            "cuda_version": r.get("cuda_version", "nvmlSystemGetCudaDriverVersion", convert=_cuda),
            "devices": [read_device(n, i) for i in range(count)],
            "polled_at": _now(),
        }

    def _reason(self, exc: Exception) -> str:
        code = getattr(exc, "value", None)
        if isinstance(code, int) and code in _REASONS:
            return _REASONS[code]
        if isinstance(exc, self._nvml.NVMLError):
            return f"NVML error: {_message(exc)}"
        return f"GPU poll failed: {type(exc).__name__}: {_message(exc)}"

    def _shutdown(self) -> None:
        if self._initialized:
            self._initialized = False
            try:
                self._nvml.nvmlShutdown()
            except Exception as exc:
                log.debug("nvmlShutdown: %s", _message(exc))

    @staticmethod
    def _log_change(old: Snapshot, new: Snapshot) -> None:
        """One log line when the GPU appears or goes away, not one per poll."""
        if (old["available"], old.get("reason")) == (new["available"], new.get("reason")):
            return
        if new["available"]:
            names = ", ".join(str(d.get("name")) for d in new["devices"])
            log.info(
                "GPU: %d device(s): %s; driver %s, CUDA %s",
                len(new["devices"]),
                names,
                new["driver_version"],
                new["cuda_version"],
            )
        else:
            log.warning("GPU unavailable: %s", new["reason"])


def critical_reasons(
    snapshot: Snapshot, max_temp_c: int | None, fail_on_ecc_uncorrected: bool, *, require_gpu: bool = False
) -> list[str]:
    """Why the appliance should report not-ready because of its GPU; [] when healthy (or no GPU is fine)."""
    if not snapshot.get("available"):
        return [f"no usable GPU: {snapshot.get('reason')}"] if require_gpu else []
    out: list[str] = []
    for d in snapshot.get("devices", []):
        label = f"GPU {d.get('index')} ({d.get('name') or 'unknown'})"
        if d.get("gpu_lost"):
            out.append(f"{label}: GPU is lost (fell off the bus); reset the GPU or reboot")
        temp = d.get("temperature_c")
        if max_temp_c is not None and isinstance(temp, int) and temp > max_temp_c:
            out.append(f"{label}: temperature {temp} °C above the limit of {max_temp_c} °C")
        if fail_on_ecc_uncorrected:
            out += _memory_reasons(label, d)
    return out


def _memory_reasons(label: str, d: dict[str, Any]) -> list[str]:
    """Uncorrected ECC errors and pending retirements mean answers may be silently corrupt."""
    out = []
    if d.get("ecc_uncorrected_volatile"):
        out.append(
            f"{label}: {d['ecc_uncorrected_volatile']} uncorrected ECC memory errors since the "
            "driver loaded; reset the GPU"
        )
    if d.get("retired_pages_pending"):
        out.append(f"{label}: memory pages are waiting to be retired; reset the GPU")
    if d.get("remapped_rows_pending"):
        out.append(f"{label}: memory rows are waiting to be remapped; reset the GPU")
    if d.get("remapped_rows_failure"):
        out.append(f"{label}: memory row remapping failed; the GPU needs service")
    return out
