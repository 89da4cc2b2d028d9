"""Device and dtype policy: what a device or dtype name means, decided here for every front end.

The CLI, the pipeline, the registry's pyfunc, Serve, evaluation and training all take names
(``"auto"``, ``"cuda:1"``, ``"bf16"``, ``"bfloat16"``, ...) and turn them into torch objects here, so
the same spelling works everywhere and a bad one fails the same way: a ``ValueError`` whose message
starts with the argument's name. torch is imported inside the functions, so a command line can offer
:data:`DTYPE_CHOICES` without importing it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

AUTO = "auto"
# Every accepted spelling -> torch's attribute name.
DTYPE_NAMES = {
    "fp32": "float32", "float32": "float32",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp16": "float16", "float16": "float16", "half": "float16",
}
DTYPE_CHOICES = (AUTO, *sorted(DTYPE_NAMES))
DEVICE_HELP = "auto (CUDA where there is one, else the CPU), cpu, cuda or cuda:N"


def device_name(name: str | torch.device, argument: str = "device") -> str:
    """``name`` checked as a device name (``"auto"``, a CPU or a CUDA device) without asking whether the
    device is there: for settings checked on one machine and used on another (a Serve replica)."""
    import torch

    if name == AUTO:
        return AUTO
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{argument}: unknown device {name!r} ({e}); use {DEVICE_HELP}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{argument}: unsupported device {str(device)!r}; use {DEVICE_HELP}")
    return str(device)


def resolve_device(name: str | torch.device = AUTO, argument: str = "device") -> torch.device:
    """A usable torch device: ``"auto"`` is CUDA where there is one, else the CPU.

    Raises a ``ValueError`` naming ``argument`` for an unknown name, a CUDA device where there is no
    CUDA, or a CUDA index beyond the devices present.
    """
    import torch

    if name == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device_name(name, argument))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{argument}: {str(device)!r} requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{argument}: {str(device)!r}, but there are only {torch.cuda.device_count()} "
                             "CUDA device(s)")
    return device


def dtype_name(name: str | torch.dtype, argument: str = "dtype") -> str:
    """The canonical name (``"bfloat16"``, ...) of any accepted spelling or torch dtype; ``"auto"`` stays."""
    import torch

    if isinstance(name, torch.dtype):
        canonical = str(name).removeprefix("torch.")
        if canonical in DTYPE_NAMES.values():
            return canonical
    elif isinstance(name, str) and (name == AUTO or name.lower() in DTYPE_NAMES):
        return AUTO if name == AUTO else DTYPE_NAMES[name.lower()]
    raise ValueError(f"{argument}: unknown dtype {name!r}; use one of {', '.join(DTYPE_CHOICES)}")


def resolve_dtype(name: str | torch.dtype = AUTO, device: str | torch.device | None = None,
                  argument: str = "dtype") -> torch.dtype:
    """A torch dtype: ``"auto"`` is bfloat16 on CUDA and float32 elsewhere (``device`` decides; None: the CPU)."""
    import torch

    canonical = dtype_name(name, argument)
    if canonical == AUTO:
        on_cuda = device is not None and torch.device(device).type == "cuda"
        return torch.bfloat16 if on_cuda else torch.float32
    return getattr(torch, canonical)
