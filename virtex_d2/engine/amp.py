"""Mixed precision on CPUs: bf16 autocast where the CPU computes in bf16 natively.

``SOLVER.AMP.ENABLED`` on a GPU keeps Detectron2's ``AMPTrainer`` (fp16 autocast with a
``GradScaler``). On a CPU, Detectron2 has no AMP path; here it means
``torch.autocast("cpu", dtype=torch.bfloat16)`` around the forward pass when the CPU has native
bf16 arithmetic (x86 AVX512-BF16 or AMX, Arm's BF16 extension), and fp32 otherwise, said in the
log. bf16 has fp32's exponent range, so no loss scaling is needed. Without native support
oneDNN emulates bf16 with fp32 arithmetic plus conversions, which is slower than plain fp32, so
that is not done unless ``SOLVER.AMP.CPU_DTYPE`` asks for it.
"""

from __future__ import annotations

import logging
import time

import torch
from detectron2.engine import SimpleTrainer

__all__ = ["CPU_DTYPE_CHOICES", "cpu_bf16_support", "resolve_cpu_amp_dtype", "CPUAMPTrainer"]

CPU_DTYPE_CHOICES = ("auto", "bfloat16", "float32")
# /proc/cpuinfo flags of native bf16 arithmetic: x86 AVX512-BF16 and AMX-BF16; Arm "bf16".
_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")

logger = logging.getLogger(__name__)


def _cpu_flags(cpuinfo: str | None) -> set:
    """The flags of the first processor in ``/proc/cpuinfo``-formatted text."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:  # not Linux
            return set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):  # x86, Arm
            return set(value.split())
    return set()


def cpu_bf16_support(cpuinfo: str | None = None) -> tuple[bool, str]:
    """Whether this CPU does bf16 arithmetic natively, and why we think so.

    Args:
        cpuinfo: ``/proc/cpuinfo`` text (default: read it; tests pass their own).

    Returns:
        (supported, a sentence for the log naming the flags and torch's CPU capability).
    """
    capability = torch.backends.cpu.get_cpu_capability()
    flags = _cpu_flags(cpuinfo)
    found = [f for f in _BF16_FLAGS if f in flags]
    if found:
        return True, f"the CPU has {', '.join(found)} (torch CPU capability {capability})"
    if not flags:
        return False, (
            f"CPU flags unknown (no /proc/cpuinfo), torch CPU capability "
            f"{capability}: native bf16 not assumed"
        )
    return False, (
        f"the CPU has none of {', '.join(_BF16_FLAGS)} (torch CPU capability "
        f"{capability}), so bf16 would be emulated and slower than fp32"
    )


def resolve_cpu_amp_dtype(
    setting: str = "auto", cpuinfo: str | None = None, log: logging.Logger | None = None
) -> torch.dtype | None:
    """The autocast dtype for CPU training with ``SOLVER.AMP.ENABLED``, logged either way.

    Args:
        setting: ``SOLVER.AMP.CPU_DTYPE``: "auto" (bf16 where native, else fp32), "bfloat16"
            (always, emulated if need be), "float32" (no autocast).
        cpuinfo: see :func:`cpu_bf16_support`.
        log: where to say what was chosen (default: this module's logger).

    Returns:
        ``torch.bfloat16``, or None for fp32 training.
    """
    log = log or logger
    if setting not in CPU_DTYPE_CHOICES:
        raise ValueError(
            f"SOLVER.AMP.CPU_DTYPE must be one of {CPU_DTYPE_CHOICES}, got {setting!r}"
        )
    supported, why = cpu_bf16_support(cpuinfo)
    if setting == "float32":
        log.info("SOLVER.AMP.ENABLED on CPU with SOLVER.AMP.CPU_DTYPE float32: training in fp32")
        return None
    if setting == "bfloat16":
        if not supported:
            log.warning(
                f"CPU mixed precision: bf16 autocast forced by SOLVER.AMP.CPU_DTYPE, but {why}"
            )
        else:
            log.info(f"CPU mixed precision: bf16 autocast ({why})")
        return torch.bfloat16
    if supported:
        log.info(f"CPU mixed precision: bf16 autocast ({why})")
        return torch.bfloat16
    log.warning(
        f"SOLVER.AMP.ENABLED, but no CPU mixed precision: {why}. Training in fp32 "
        "(SOLVER.AMP.CPU_DTYPE bfloat16 forces emulated bf16)."
    )
    return None


class CPUAMPTrainer(SimpleTrainer):
    """``SimpleTrainer`` whose forward pass (model and loss) runs under CPU autocast.

    The backward pass follows the forward's dtypes, as autocast intends; the optimiser step
    (with VirTex's gradient clipping and Lookahead) sees the fp32 parameters and gradients, so
    no master copy or loss scaling is needed for bf16.
    """

    def __init__(
        self, model, data_loader, optimizer, dtype: torch.dtype = torch.bfloat16, **kwargs
    ):
        super().__init__(model, data_loader, optimizer, **kwargs)
        self.dtype = dtype

    def run_step(self) -> None:
        # SimpleTrainer.run_step of Detectron2 v0.6, with autocast around the forward; upstream
        # main's extra hook (after_backward) is called where it exists.
        assert self.model.training, "[CPUAMPTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        with torch.autocast("cpu", dtype=self.dtype):
            loss_dict = self.model(data)
            if isinstance(loss_dict, torch.Tensor):
                losses = loss_dict
                loss_dict = {"total_loss": loss_dict}
            else:
                losses = sum(loss_dict.values())
        self.optimizer.zero_grad()
        losses.backward()
        after_backward = getattr(self, "after_backward", None)
        if after_backward is not None:
            after_backward()
        self._write_metrics(loss_dict, data_time)
        self.optimizer.step()
