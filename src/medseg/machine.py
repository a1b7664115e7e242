"""What this machine has: CPU cores, bf16 units, GPUs. One owner, so that training and inference pick
devices, precisions and loader workers by the same rules.

    device = resolve_device("auto")     # "cuda" when PyTorch sees a GPU, else "cpu"
    workers = loader_workers("auto", "gpu")
"""
from __future__ import annotations

import os

from medseg.errors import MedsegError


def cpu_cores() -> int:
    """The cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def available_memory() -> int:
    """Bytes this machine can still give without swapping (MemAvailable; the total where that is unknown)."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def check_memory(nbytes: float, what: str, where: str | None = None) -> None:
    """Refuse, with the figure, an allocation larger than the memory available, before making it (a
    mistyped spacing asked for tebibytes)."""
    have = available_memory()
    if nbytes > have:
        raise MedsegError(f"{what} needs {_gib(nbytes)} of memory; this machine has {_gib(have)} available", where)


def _gib(n: float) -> str:
    return f"{n / 2**40:.1f} TiB" if n >= 2**40 else f"{n / 2**30:.1f} GiB" if n >= 2**28 else f"{n / 2**20:.0f} MiB"


def cpu_has_bf16_units() -> bool:
    """True on CPUs with AMX tiles (Intel Xeon 4th generation and later), where oneDNN's bf16 convolutions
    train the LGG U-Net about 1.6x faster than fp32 (``benchmarks/models.py --precision 32,bf16``);
    elsewhere bf16 autocast is emulated, 10-40x slower."""
    try:
        import torch

        return bool(torch.cpu._is_amx_tile_supported())
    except Exception:  # a private torch API: absent means no
        return False


def resolve_device(device: str = "cpu") -> str:
    """``auto`` -> ``cuda`` when PyTorch sees a GPU, else ``cpu``; ``cuda[:N]`` checked to exist."""
    if device == "cpu":
        return "cpu"
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not device.startswith("cuda"):
        raise MedsegError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise MedsegError(f"device {device!r} asked for, but PyTorch sees no CUDA GPU here (use --device cpu)")
    index = device.partition(":")[2]
    if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
        raise MedsegError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def check_gpus(devices: int | str) -> None:
    """Training on GPUs: there must be one, and ``devices`` (a count, or auto) of them."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        raise MedsegError("train.accelerator gpu asked for, but PyTorch sees no CUDA GPU here "
                          "(use --set train.accelerator=auto or cpu)")
    if devices != "auto" and int(devices) > n:
        raise MedsegError(f"train.devices {devices} asked for, but this machine has {n} GPU(s)")


def gpu_free_bytes(device: str = "cuda") -> int:
    """Free memory on a CUDA device (0 on the CPU)."""
    if not device.startswith("cuda"):
        return 0
    import torch

    return int(torch.cuda.mem_get_info(torch.device(device))[0])


def to_device(t, device):
    """A small host tensor copied to ``device`` without making the host wait for the device's queued work:
    from pinned memory and non-blocking on CUDA (a plain copy synchronises the stream, so every training
    step would wait for the last one to finish before it could be queued)."""
    if getattr(device, "type", str(device).partition(":")[0]) != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def loader_workers(workers: int | str, accelerator: str) -> int:
    """``auto``: no worker processes on a CPU (the training step and the loader share its cores; measured
    fastest on 2 cores, docs/training.md), and on a GPU one per core left over, up to 12."""
    if workers != "auto":
        return int(workers)
    return 0 if accelerator == "cpu" else max(0, min(12, cpu_cores() - 1))


__all__ = ["available_memory", "check_memory", "cpu_cores", "cpu_has_bf16_units", "resolve_device", "check_gpus",
           "gpu_free_bytes", "to_device", "loader_workers", "die_with"]


def die_with(parent: int) -> None:
    """End this process as soon as ``parent`` is gone, even killed with SIGKILL (prepare's workers, whose own
    parent is a forkserver; a training run's member processes): a thread watches it through a pidfd where
    the kernel has them, else a 1 s poll."""
    import threading

    def watch() -> None:
        import select
        import time

        try:
            fd = os.pidfd_open(parent)
        except (AttributeError, OSError):
            fd = None
        if fd is not None:
            select.select([fd], [], [])  # readable once the process has exited
        else:
            while True:
                try:
                    os.kill(parent, 0)
                except ProcessLookupError:
                    break
                time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="medseg-parent-watch").start()
