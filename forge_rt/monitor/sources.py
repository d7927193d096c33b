"""Where memory numbers come from: /proc, CUDA, tegrastats, a paging object.

Each source is probed once when the monitor starts; one that is absent (no CUDA, no tegrastats, no
paging object) is reported with the reason instead of failing, and one that breaks mid-run is
switched off with the error recorded. Reading must stay cheap: it runs ten times a second.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading

MIB = 1 << 20

# Pools a sample can carry, in display order: key -> label. Values are bytes.
POOLS = {
    "rss": "process RSS",
    "cuda_allocated": "CUDA allocated",
    "cuda_reserved": "CUDA reserved",
    "page_raw": "paged, raw size",
    "page_compressed": "paged, in memory",
    "page_spilled": "paged, on disk",
    "sys_used": "system used",
    "swap_used": "swap used",
    "tegra_ram_used": "tegrastats RAM",
}


class SourceMissing(Exception):
    """Raised by a source's constructor when it cannot work on this machine; the message says why."""


def _read_fd(fd: int) -> bytes:
    # procfs regenerates the file on every read from offset 0, so one open fd serves for the whole run.
    return os.pread(fd, 8192, 0)


def _status_bytes(status: bytes, key: bytes) -> int | None:
    """A `Key:  N kB` field of /proc/<pid>/status, in bytes."""
    i = status.find(key + b":")
    if i < 0:
        return None
    return int(status[i + len(key) + 1:status.index(b"kB", i)]) * 1024


def process_rss() -> tuple[int, int]:
    """(current, peak) resident bytes of this process (VmRSS, VmHWM); (0, 0) where /proc is missing."""
    try:
        with open("/proc/self/status", "rb") as fh:
            status = fh.read()
    except OSError:
        return 0, 0
    return _status_bytes(status, b"VmRSS") or 0, _status_bytes(status, b"VmHWM") or 0


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM, so a later peak covers only what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


class ProcSource:
    """Process RSS (statm) and peak RSS (VmHWM), system total/available and swap (/proc/meminfo)."""
    name = "proc"

    def __init__(self):
        try:
            self._statm = os.open("/proc/self/statm", os.O_RDONLY)
            self._status = os.open("/proc/self/status", os.O_RDONLY)
            self._meminfo = os.open("/proc/meminfo", os.O_RDONLY)
        except OSError as exc:
            raise SourceMissing(f"/proc not readable ({exc}); not Linux?") from exc
        self._page = os.sysconf("SC_PAGE_SIZE")

    def read(self, out: dict) -> None:
        out["rss"] = int(_read_fd(self._statm).split()[1]) * self._page
        peak = _status_bytes(_read_fd(self._status), b"VmHWM")
        if peak is not None:
            out["rss_peak"] = peak
        info = {}
        for line in _read_fd(self._meminfo).splitlines():
            key, _, rest = line.partition(b":")
            if key in (b"MemTotal", b"MemAvailable", b"SwapTotal", b"SwapFree"):
                info[key] = int(rest.split()[0]) * 1024
        out["mem_total"] = info[b"MemTotal"]
        out["mem_available"] = info[b"MemAvailable"]
        out["sys_used"] = info[b"MemTotal"] - info[b"MemAvailable"]
        out["swap_total"] = info.get(b"SwapTotal", 0)
        out["swap_used"] = info.get(b"SwapTotal", 0) - info.get(b"SwapFree", 0)

    def close(self) -> None:
        for fd in (self._statm, self._status, self._meminfo):
            os.close(fd)


class CudaSource:
    """torch's caching allocator on the current device. Never creates a CUDA context itself."""
    name = "cuda"

    def __init__(self):
        torch = sys.modules.get("torch")
        if torch is None:
            try:
                import torch
            except ImportError as exc:
                raise SourceMissing("torch is not installed") from exc
        if not torch.cuda.is_available():
            raise SourceMissing("torch.cuda.is_available() is False")
        self._cuda = torch.cuda
        self._total = None

    def read(self, out: dict) -> None:
        cuda = self._cuda
        if not cuda.is_initialized():
            return  # the program has not touched the GPU yet: nothing allocated
        dev = cuda.current_device()
        out["cuda_allocated"] = cuda.memory_allocated(dev)
        out["cuda_reserved"] = cuda.memory_reserved(dev)
        out["cuda_peak"] = cuda.max_memory_allocated(dev)
        if self._total is None:
            self._total = cuda.get_device_properties(dev).total_memory
        out["cuda_total"] = self._total

    def close(self) -> None:
        pass


class PagingSource:
    """The paging tiers from any object with `.stats()`.

    A forge_rt Pager reports what it holds now (`resident_bytes` in memory, `spilled_now_bytes` on disk,
    `raw_now_bytes` their uncompressed size) next to running totals (`bytes_*`); the pools are the
    current values. An object without `resident_bytes` is read as dict(bytes_raw, bytes_compressed,
    bytes_spilled, ratio) of current values.
    """
    name = "paging"
    _NOW = {"raw_now_bytes": "page_raw", "resident_bytes": "page_compressed", "spilled_now_bytes": "page_spilled",
            "ratio": "page_ratio"}
    _PLAIN = {"bytes_raw": "page_raw", "bytes_compressed": "page_compressed", "bytes_spilled": "page_spilled",
              "ratio": "page_ratio", "budget_bytes": "page_budget"}

    def __init__(self, paging):
        if paging is None:
            raise SourceMissing("no paging object given")
        if not callable(getattr(paging, "stats", None)):
            raise SourceMissing(f"{type(paging).__name__} has no stats() method")
        self._paging = paging

    def read(self, out: dict) -> None:
        stats = self._paging.stats()
        for key, name in (self._NOW if "resident_bytes" in stats else self._PLAIN).items():
            value = stats.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[name] = value

    def close(self) -> None:
        pass


_TEGRA_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_TEGRA_SWAP = re.compile(r"\bSWAP (\d+)/(\d+)MB")
_TEGRA_GPU = re.compile(r"\bGR3D_FREQ (\d+)%")


def parse_tegrastats(line: str) -> dict:
    """One tegrastats line -> bytes of RAM/swap used and total, GPU (GR3D) load in percent.

    tegrastats prints e.g. `RAM 5071/30536MB (lfb 5281x4MB) SWAP 0/15268MB (cached 0MB) ... GR3D_FREQ 0%@[305] ...`
    (newer JetPacks prefix a timestamp). Fields that are absent are left out; no field at all -> {}.
    """
    out = {}
    if m := _TEGRA_RAM.search(line):
        out["tegra_ram_used"], out["tegra_ram_total"] = int(m[1]) * MIB, int(m[2]) * MIB
    if m := _TEGRA_SWAP.search(line):
        out["tegra_swap_used"], out["tegra_swap_total"] = int(m[1]) * MIB, int(m[2]) * MIB
    if m := _TEGRA_GPU.search(line):
        out["tegra_gpu_load"] = int(m[1])
    return out


class TegrastatsSource:
    """Jetson's tegrastats, run as a child process; a reader thread keeps the last parsed line."""
    name = "tegrastats"

    def __init__(self, interval_ms: int = 500, binary: str = "tegrastats"):
        path = shutil.which(binary)
        if path is None:
            raise SourceMissing(f"{binary} not on PATH (Jetson only)")
        self._proc = subprocess.Popen([path, "--interval", str(interval_ms)], stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, text=True)
        self._last: dict = {}
        self._thread = threading.Thread(target=self._follow, name="forge_rt-tegrastats", daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        for line in self._proc.stdout:
            parsed = parse_tegrastats(line)
            if parsed:
                self._last = parsed

    def read(self, out: dict) -> None:
        out.update(self._last)

    def close(self) -> None:
        self._proc.terminate()
        self._proc.wait(timeout=5)
        self._thread.join(timeout=5)


def unified_memory() -> bool:
    """True on a Jetson-style board where CPU and GPU share one physical memory."""
    try:
        with open("/proc/device-tree/compatible", "rb") as fh:
            return b"nvidia,tegra" in fh.read()
    except OSError:
        return os.path.exists("/etc/nv_tegra_release")


def open_sources(paging=None, tegrastats: bool = True) -> tuple[list, dict[str, str]]:
    """Probe every source -> (working sources, {name: "ok" | "missing: why"})."""
    makers = [("proc", ProcSource), ("cuda", CudaSource), ("paging", lambda: PagingSource(paging))]
    if tegrastats:
        makers.append(("tegrastats", TegrastatsSource))
    live, status = [], {}
    for name, make in makers:
        try:
            live.append(make())
            status[name] = "ok"
        except SourceMissing as exc:
            status[name] = f"missing: {exc}"
    return live, status
