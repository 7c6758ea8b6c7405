"""Optimisers and schedules. Pretraining: SGD with two learning rates, selective weight decay,
global gradient-norm clipping and Lookahead, as one ``torch.optim.Optimizer``. Classification:
Detectron2's SGD over the trainable parameters, checked against the linear-probe setting.

Keeping Lookahead's slow weights and step counter inside the optimiser's own ``state`` and
``param_groups`` means Detectron2's checkpointer saves and restores them with no extra code, and
``GradScaler.step`` (AMP) unscales gradients before the clipping inside ``step`` sees them.
"""

from __future__ import annotations

import inspect
import logging
import re

import torch
from detectron2.solver import build_optimizer
from detectron2.utils import comm
from torch import nn
from torch.profiler import record_function

logger = logging.getLogger(__name__)


class LookaheadSGD(torch.optim.SGD):
    """SGD whose ``step`` first clips the global gradient norm, then every ``k`` steps moves
    slow weights ``alpha`` of the way to the fast ones and resets the fast weights to them.

    ``fused`` / ``foreach``: as ``torch.optim.SGD``; either also makes the clipping and the
    Lookahead update multi-tensor (``torch._foreach_*``) instead of one loop per tensor.
    """

    def __init__(
        self,
        params,
        *,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        clip_grad_norm: float = 0.0,
        lookahead_alpha: float = 0.5,
        lookahead_steps: int = 0,
        foreach: bool | None = None,
        fused: bool | None = None,
    ):
        # ``fused`` only when asked for: PyTorch before 2.3 has no such argument.
        kernel = {"foreach": foreach} if fused is None else {"foreach": foreach, "fused": fused}
        super().__init__(
            params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, **kernel
        )
        # A fused SGD would let GradScaler hand it the loss scale instead of unscaling the
        # gradients first, and the clipping below would then see scaled gradients.
        self._step_supports_amp_scaling = False
        if lookahead_steps < 0 or not 0.0 < lookahead_alpha <= 1.0:
            raise ValueError(
                f"bad Lookahead settings: alpha={lookahead_alpha}, k={lookahead_steps}"
            )
        self.multi_tensor = bool(foreach or fused)
        self.clip_grad_norm = clip_grad_norm
        self.lookahead_alpha = lookahead_alpha
        self.lookahead_steps = lookahead_steps
        for group in self.param_groups:
            group.setdefault("lookahead_counter", 0)
            if lookahead_steps:
                for p in group["params"]:
                    # Slow weights start at the initial weights.
                    self.state[p]["lookahead_slow"] = p.detach().clone()
        self.last_grad_norm: float | None = None

    def load_state_dict(self, state_dict: dict) -> None:
        # Which kernel runs the update is this process's choice, not part of the training
        # state: a checkpoint written with another setting (or none) must not switch it.
        keys = ("fused", "foreach")
        kernels = [{k: g[k] for k in keys if k in g} for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, kernel in zip(self.param_groups, kernels):
            group.update(kernel)

    @torch.no_grad()
    def step(self, closure=None):
        if self.clip_grad_norm > 0:
            with record_function("virtex.clip_grad_norm"):
                self._clip()
        with record_function("virtex.sgd_step"):
            loss = super().step(closure)
        if self.lookahead_steps:
            with record_function("virtex.lookahead"):
                self._lookahead()
        return loss

    def _clip(self) -> None:
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not self.multi_tensor:
            self.last_grad_norm = float(nn.utils.clip_grad_norm_(params, self.clip_grad_norm))
            return
        grads = [p.grad for p in params]
        if not grads:
            return
        # clip_grad_norm_'s arithmetic, in float32 like it, with one kernel per step.
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        self.last_grad_norm = float(norm)
        # Below the threshold clip_grad_norm_ multiplies every gradient by exactly 1.0: a full
        # read and write of all gradients that changes nothing, so it is skipped.
        if self.last_grad_norm > self.clip_grad_norm:
            torch._foreach_mul_(grads, float(self.clip_grad_norm / (norm + 1e-6)))

    def _lookahead(self) -> None:
        fast, slow = [], []
        for group in self.param_groups:
            group["lookahead_counter"] += 1
            if group["lookahead_counter"] % self.lookahead_steps:
                continue
            for p in group["params"]:
                fast.append(p)
                slow.append(self.state[p]["lookahead_slow"])
        if not fast:
            return
        if self.multi_tensor:
            # slow + alpha * (fast - slow) without materialising the difference.
            torch._foreach_lerp_(slow, fast, self.lookahead_alpha)
        else:
            for p, s in zip(fast, slow):
                s.add_(p - s, alpha=self.lookahead_alpha)
        for p, s in zip(fast, slow):
            p.copy_(s)


def virtex_param_groups(
    model: nn.Module, base_lr: float, textual_lr: float, weight_decay: float, no_decay_pattern: str
) -> list[dict]:
    """Backbone parameters at ``base_lr``; every other parameter (textual head, projections,
    classifiers) at ``textual_lr``; no weight decay where the name matches ``no_decay_pattern``.
    Tied parameters appear once."""
    no_decay = re.compile(no_decay_pattern) if no_decay_pattern else None
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr = base_lr if name.startswith("backbone.") else textual_lr
        wd = 0.0 if no_decay is not None and no_decay.search(name) else weight_decay
        groups.setdefault((lr, wd), []).append(p)
    return [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]


def build_virtex_optimizer(cfg, model: nn.Module) -> LookaheadSGD:
    s = cfg.SOLVER
    v = s.VIRTEX
    groups = virtex_param_groups(model, s.BASE_LR, v.TEXTUAL_LR, s.WEIGHT_DECAY, v.NO_DECAY_PATTERN)
    return LookaheadSGD(
        groups,
        lr=s.BASE_LR,
        momentum=s.MOMENTUM,
        nesterov=s.NESTEROV,
        clip_grad_norm=v.CLIP_GRAD_NORM,
        lookahead_alpha=v.LOOKAHEAD.ALPHA,
        lookahead_steps=v.LOOKAHEAD.STEPS if v.LOOKAHEAD.ENABLED else 0,
        **multi_tensor_kwargs(model, v.FOREACH),
    )


def multi_tensor_kwargs(model: nn.Module, enabled: bool) -> dict:
    """``fused=True`` where PyTorch has a fused SGD kernel for the parameters' device (one pass
    over weights, gradients and momentum: on a CPU several times faster than ``foreach``),
    else ``foreach=True``; ``{}`` (a loop per tensor) when ``enabled`` is False."""
    if not enabled:
        return {}
    try:  # PyTorch >= 2.4 has fused SGD on CPUs; setup.py allows older releases
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        supported = set(_get_fused_kernels_supported_devices())
    except ImportError:
        supported = set()
    if "fused" not in inspect.signature(torch.optim.SGD).parameters:
        supported = set()
    params = list(model.parameters())
    fusable = {p.device.type for p in params} <= supported and all(
        p.dtype.is_floating_point for p in params
    )
    return {"fused": True} if fusable else {"foreach": True}


def build_classification_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """Detectron2's SGD (``SOLVER.*``) over the trainable parameters.

    Detectron2 skips parameters with ``requires_grad=False``, so a linear probe optimises the
    classifier only; this checks that, rather than trusting it silently.
    """
    params = dict(model.named_parameters())
    trainable = [n for n, p in params.items() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameter")
    if cfg.MODEL.CLASSIFIER.FREEZE_BACKBONE:
        leaked = [n for n in trainable if ".backbone." in f".{n}"]
        if leaked:
            raise RuntimeError(f"linear probe, but backbone parameters are trainable: {leaked[:3]}")
    if comm.is_main_process():
        logger.info(f"Optimising {len(trainable)} of {len(params)} parameter tensors")
    return build_optimizer(cfg, model)


def build_lr_scheduler(
    cfg, optimizer: torch.optim.Optimizer
) -> torch.optim.lr_scheduler._LRScheduler:
    """Detectron2's scheduler, except ``WarmupCosineLR`` with ``SOLVER.VIRTEX.COSINE_AFTER_WARMUP``:
    linear (or constant) warm-up to 1 over ``WARMUP_ITERS``, then a cosine from 1 to 0 over the
    remaining iterations, as the reference implementation schedules pretraining.

    Raises ValueError for a schedule that cannot train: warm-up as long as the whole run, which
    would keep the learning rate below its target (at 0 with WARMUP_FACTOR 0) throughout.
    """
    from detectron2.solver import build_lr_scheduler as d2_build_lr_scheduler
    from detectron2.solver.lr_scheduler import LRMultiplier
    from fvcore.common.param_scheduler import (
        CompositeParamScheduler,
        ConstantParamScheduler,
        CosineParamScheduler,
        LinearParamScheduler,
    )

    s = cfg.SOLVER
    if s.WARMUP_ITERS >= s.MAX_ITER > 0 and s.WARMUP_FACTOR == 0.0:
        raise ValueError(
            f"SOLVER.WARMUP_ITERS ({s.WARMUP_ITERS}) >= SOLVER.MAX_ITER ({s.MAX_ITER}): the "
            "learning rate would never leave warm-up (it stays near "
            f"{s.WARMUP_FACTOR} x BASE_LR for the whole run); lower SOLVER.WARMUP_ITERS "
            f"below {s.MAX_ITER}, e.g. {max(s.MAX_ITER // 10, 0)}"
        )
    after_warmup = s.LR_SCHEDULER_NAME == "WarmupCosineLR" and s.VIRTEX.COSINE_AFTER_WARMUP
    if not after_warmup or s.WARMUP_ITERS == 0:
        return d2_build_lr_scheduler(cfg, optimizer)
    if s.WARMUP_METHOD == "linear":
        warmup = LinearParamScheduler(s.WARMUP_FACTOR, 1.0)
    elif s.WARMUP_METHOD == "constant":
        warmup = ConstantParamScheduler(s.WARMUP_FACTOR)
    else:
        raise ValueError(f"SOLVER.WARMUP_METHOD must be linear or constant, got {s.WARMUP_METHOD}")
    end = s.BASE_LR_END / s.BASE_LR if "BASE_LR_END" in s and s.BASE_LR else 0.0
    fraction = s.WARMUP_ITERS / s.MAX_ITER
    schedule = CompositeParamScheduler(
        [warmup, CosineParamScheduler(1.0, end)],
        lengths=[fraction, 1.0 - fraction],
        interval_scaling=["rescaled", "rescaled"],
    )
    return LRMultiplier(optimizer, multiplier=schedule, max_iter=s.MAX_ITER)
