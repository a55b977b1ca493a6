"""Device names -> ``torch.device``, failing loudly when an accelerator is asked for and absent.

``--device cuda`` on a machine without CUDA is an error, never a silent CPU fallback;
``auto`` picks CUDA when there is one.

    device = resolve_device("cuda:1")   # RuntimeError if there is no second GPU
"""

from __future__ import annotations

from typing import Any


def resolve_device(name: Any) -> Any:
    """A ``torch.device`` for ``name`` (``cpu``, ``cuda``, ``cuda:N``, ``mps``, ``auto``)."""
    import torch

    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {str(name)!r} requested but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"device {str(name)!r} requested but only {torch.cuda.device_count()} CUDA "
                "devices are visible"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError(f"device {str(name)!r} requested but MPS is not available here")
    return device
