"""The process-wide kernel settings a run chooses (trainer.tf32, trainer.sdpa_backend), applied in
one place and restored on the way out, so that no caller finds them changed behind its back."""

from __future__ import annotations

from contextlib import contextmanager

import torch

# the CUDA SDPA kernels trainer.sdpa_backend can single out (math is always on: the fallback)
SDPA_SWITCHES = {
    "flash": (torch.backends.cuda.flash_sdp_enabled, torch.backends.cuda.enable_flash_sdp),
    "cudnn": (torch.backends.cuda.cudnn_sdp_enabled, torch.backends.cuda.enable_cudnn_sdp),
    "efficient": (
        torch.backends.cuda.mem_efficient_sdp_enabled,
        torch.backends.cuda.enable_mem_efficient_sdp,
    ),
    "math": (torch.backends.cuda.math_sdp_enabled, torch.backends.cuda.enable_math_sdp),
}


def current_settings() -> dict:
    """The settings kernel_settings changes, as they are now."""
    return {
        "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_tf32": torch.backends.cudnn.allow_tf32,
        **{f"sdpa_{name}": enabled() for name, (enabled, _) in SDPA_SWITCHES.items()},
    }


def _apply(settings: dict) -> None:
    torch.backends.cuda.matmul.allow_tf32 = settings["matmul_tf32"]
    torch.backends.cudnn.allow_tf32 = settings["cudnn_tf32"]
    for name, (_, enable) in SDPA_SWITCHES.items():
        enable(settings[f"sdpa_{name}"])


@contextmanager
def kernel_settings(tf32: bool, sdpa_backend: str = "auto"):
    """Within: TF32 matmuls (and cuDNN convolutions) allowed iff `tf32`; the CUDA SDPA kernel
    `sdpa_backend` plus math, the fallback for inputs the chosen kernel cannot take (auto: all
    enabled, PyTorch chooses; no effect on CPU). On exit the settings found on entry are back."""
    before = current_settings()
    _apply(
        {
            "matmul_tf32": bool(tf32),
            "cudnn_tf32": bool(tf32),
            **{
                f"sdpa_{name}": name == "math" or sdpa_backend in ("auto", name)
                for name in SDPA_SWITCHES
            },
        }
    )
    try:
        yield
    finally:
        _apply(before)
