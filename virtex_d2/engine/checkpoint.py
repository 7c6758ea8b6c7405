"""``VirtexCheckpointer``: Detectron2's checkpointer with crash-safe writes and safe, checked loads.

- **Atomic writes** (local directories). A checkpoint is written to a temporary file in the same
  directory, flushed, ``fsync``-ed and renamed over the final name (``os.replace``);
  ``last_checkpoint`` is updated the same way and only afterwards, so it never names a partial
  file. A failed write (e.g. a full disk) removes the temporary file and raises
  :class:`CheckpointWriteError`; the previous checkpoint and ``last_checkpoint`` stay as they
  were. Remote ``OUTPUT_DIR`` URIs are written through Detectron2's PathManager, not atomically.
- **Finite weights only.** A model whose weights contain NaN/inf is not written
  (``FloatingPointError`` naming the tensors), so the last checkpoint stays a good one.
- **No pickle by default.** Files are read with ``torch.load(weights_only=True)``. Detectron2's
  legacy ``.pkl`` files, and ``.pth`` files holding arbitrary Python objects, need unpickling,
  which can run any code the file contains: they are refused (:class:`UnsafeCheckpointError`)
  unless ``MODEL.ALLOW_PICKLE_WEIGHTS`` is True.
- **Checked loads.** Detectron2 only warns when a parameter is missing from a checkpoint or has
  another shape. Here parameters that must be loaded (``MODEL.WEIGHTS_REQUIRED``; everything when
  resuming) raise :class:`WeightsMismatchError` naming the keys, before the first iteration.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
from collections.abc import Iterator
from typing import IO, Any, Callable

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.layers import CNNBlockBase
from torch import nn

from .. import io
from ..checkpoint.convert import (
    IncompleteBackboneError,
    convert_state_dict,
    detect_source,
    extract_state_dict,
)

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "last_checkpoint"
_SHOW = 12  # keys named in an error message


class CheckpointWriteError(io.AtomicWriteError):
    """A checkpoint could not be written; nothing already on disk was changed."""


class UnsafeCheckpointError(RuntimeError):
    """A weight file needs unpickling and ``MODEL.ALLOW_PICKLE_WEIGHTS`` is False."""


class WeightsMismatchError(RuntimeError):
    """Required parameters were missing from a checkpoint or had another shape."""


def atomic_write(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Checkpoint files go through the package's one atomic writer (``virtex_d2.io``).

    Raises:
        CheckpointWriteError: with the errno of the failure; ``path`` is untouched.
    """
    directory = os.path.dirname(os.path.abspath(path))
    io.atomic_write(
        path,
        write,
        error=CheckpointWriteError,
        advice=f"The previous checkpoint and {LAST_CHECKPOINT} are intact. Free space in "
        f"{directory} or point OUTPUT_DIR elsewhere, then continue with --resume",
    )


def nonfinite_tensors(state: dict[str, Any]) -> list[str]:
    """Names of floating-point tensors in ``state`` with a NaN or infinite value."""
    return [
        k
        for k, v in state.items()
        if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]


def required_keys(model: nn.Module, mode: str) -> set[str] | None:
    """State-dict keys a weight file must provide under ``mode`` (None: no check)."""
    if mode == "none":
        return None
    if mode == "all":
        return set(model.state_dict())
    if mode == "resnet":
        keys = set()
        for name, module in model.named_modules():
            if isinstance(module, CNNBlockBase):
                keys.update(f"{name}.{k}" if name else k for k in module.state_dict())
        return keys
    raise ValueError(
        f"MODEL.WEIGHTS_REQUIRED must be 'auto', 'all', 'resnet' or 'none', not {mode!r}"
    )


def _tied_aliases(model: nn.Module) -> dict[str, set[str]]:
    """Key -> other keys naming the same tensor (tied weights load through any of them)."""
    by_ptr: dict[tuple[int, int], set[str]] = {}
    for k, v in model.state_dict(keep_vars=True).items():
        if torch.is_tensor(v) and v.numel():
            by_ptr.setdefault((v.data_ptr(), v.numel()), set()).add(k)
    return {k: names - {k} for names in by_ptr.values() for k in names}


class VirtexCheckpointer(DetectionCheckpointer):
    """See the module docstring. ``weights_required`` is "all", "resnet" or "none"."""

    def __init__(
        self,
        model: nn.Module,
        save_dir: str = "",
        *,
        allow_pickle: bool = False,
        weights_required: str = "all",
        save_to_disk: bool | None = None,
        **checkpointables: Any,
    ):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.allow_pickle = allow_pickle
        required_keys(self.model, weights_required)  # validates the mode early
        self.weights_required = weights_required
        self._loading = ""

    # ------------------------------------------------------------------------------ saving
    def save(self, name: str, **kwargs: Any) -> None:
        """Like ``Checkpointer.save``, but atomic, and refusing non-finite weights."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        bad = nonfinite_tensors(data["model"])
        if bad:
            last = self.get_checkpoint_file() if self.has_checkpoint() else "(none yet)"
            raise FloatingPointError(
                f"not writing checkpoint {name}: {len(bad)} weight tensor(s) contain NaN or inf "
                f"(e.g. {bad[:_SHOW]}). The last good checkpoint stays {last}."
            )
        if "://" in self.save_dir:
            # Remote storage (an iopath handler): no same-directory rename to rely on.
            self.logger.warning(
                f"{self.save_dir} is not a local path: writing without atomic replace"
            )
            return super().save(name, **kwargs)
        os.makedirs(self.save_dir, exist_ok=True)
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {path}")
        atomic_write(path, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """Point ``last_checkpoint`` at a complete file, atomically."""
        path = os.path.join(self.save_dir, LAST_CHECKPOINT)
        atomic_write(path, lambda f: f.write(last_filename_basename.encode()))

    # ----------------------------------------------------------------------------- loading
    @contextlib.contextmanager
    def _requiring(self, mode: str) -> Iterator[None]:
        previous, self.weights_required = self.weights_required, mode
        try:
            yield
        finally:
            self.weights_required = previous

    def load(self, path: str, checkpointables: list[str] | None = None) -> dict[str, Any]:
        self._loading = path
        return super().load(path, checkpointables=checkpointables)

    def resume_or_load(self, path: str, *, resume: bool = True) -> dict[str, Any]:
        """As Detectron2's; resuming requires every parameter (our own checkpoint)."""
        if resume and self.has_checkpoint():
            with self._requiring("all"):
                return super().resume_or_load(path, resume=True)
        return super().resume_or_load(path, resume=resume)

    def _load_file(self, filename: str) -> dict[str, Any]:
        if filename.endswith(".pkl"):
            if not self.allow_pickle:
                raise UnsafeCheckpointError(
                    f"{filename} is a pickle file (Detectron2's legacy format). Unpickling runs "
                    "any code the file contains, so it is refused by default. If you trust its "
                    "source, set MODEL.ALLOW_PICKLE_WEIGHTS True; better, convert it once to a "
                    ".pth state dict (tools/convert_to_d2.py) and load that."
                )
            return super()._load_file(filename)
        try:
            loaded = torch.load(filename, map_location="cpu", weights_only=not self.allow_pickle)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UnsafeCheckpointError(
                f"{filename} holds Python objects that torch.load(weights_only=True) refuses "
                f"({first}). Loading it would unpickle them, which can run arbitrary code; set "
                "MODEL.ALLOW_PICKLE_WEIGHTS True only if you trust its source."
            ) from e
        if filename.endswith(".pyth"):  # pycls, as in Detectron2's DetectionCheckpointer
            state = {
                k: v
                for k, v in loaded["model_state"].items()
                if not k.endswith("num_batches_tracked")
            }
            return {"model": state, "__author__": "pycls", "matching_heuristics": True}
        if not isinstance(loaded, dict):
            raise WeightsMismatchError(f"{filename} holds a {type(loaded).__name__}, not a dict")
        return self._translate(filename, loaded if "model" in loaded else {"model": loaded})

    def _translate(self, filename: str, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """torchvision and reference VirTex checkpoints load like a converted backbone: their
        ResNet gets Detectron2's names and is matched by suffix (``matching_heuristics``), so
        ``MODEL.WEIGHTS`` takes them without a conversion step."""
        state = checkpoint.get("model")
        if not isinstance(state, dict):
            return checkpoint
        try:
            source, _ = detect_source(state)
        except IncompleteBackboneError:
            return checkpoint  # not a ResNet checkpoint we know; loaded (and checked) as is
        if source not in ("torchvision", "virtex"):
            return checkpoint
        result = convert_state_dict(extract_state_dict(checkpoint), source)
        self.logger.info(
            f"{filename}: a {source} checkpoint; its ResNet-{result.depth} is "
            "loaded under Detectron2's names"
        )
        self._loading = f"{filename} ({source} layout: only its ResNet is read; a whole "
        self._loading += "reference model is imported with tools/import_reference.py)"
        return {
            "model": dict(result.d2_state),
            "__author__": f"virtex_d2 <- {source}",
            "matching_heuristics": True,
        }

    def _load_model(self, checkpoint: Any) -> Any:
        incompatible = super()._load_model(checkpoint)
        required = required_keys(self.model, self.weights_required)
        if not required:
            return incompatible
        problems = {k: "missing from the checkpoint" for k in incompatible.missing_keys}
        for k, shape_ckpt, shape_model in incompatible.incorrect_shapes:
            problems[k] = (
                f"shape {tuple(shape_ckpt)} in the checkpoint, {tuple(shape_model)} in the model"
            )
        aliases = _tied_aliases(self.model)
        problems = {
            k: why
            for k, why in problems.items()
            if k in required
            and not k.endswith("num_batches_tracked")
            and not any(a not in problems for a in aliases.get(k, ()))  # loaded through a twin
        }
        if problems:
            raise WeightsMismatchError(self._mismatch_message(problems, incompatible))
        return incompatible

    def _mismatch_message(self, problems: dict[str, str], incompatible: Any) -> str:
        modules: dict[str, int] = {}
        for k in sorted(problems):
            parts = k.split(".")
            depth = 3 if len(parts) > 3 and parts[1] == "bottom_up" else 2  # FPN's ResNet
            group = ".".join(parts[: min(depth, len(parts) - 1)])
            modules[group] = modules.get(group, 0) + 1
        lines = ["  by module: " + ", ".join(f"{m} ({n})" for m, n in modules.items())]
        lines += [f"  {k}: {why}" for k, why in sorted(problems.items())[:_SHOW]]
        if len(problems) > _SHOW:
            lines.append(f"  ... and {len(problems) - _SHOW} more")
        unexpected = list(incompatible.unexpected_keys)
        tops = sorted({k.split(".")[0] + "." for k in unexpected})
        extra = (
            f"\nThe checkpoint also has {len(unexpected)} key(s) this model does not have, under "
            f"{', '.join(tops)}"
            if unexpected
            else ""
        )
        return (
            f"{self._loading} does not fit this model: {len(problems)} parameter(s) that must be "
            f"loaded (MODEL.WEIGHTS_REQUIRED = {self.weights_required!r}) were not:\n"
            + "\n".join(lines)
            + extra
            + "\nIs it a checkpoint of another architecture or size? "
            "Pretraining checkpoints must be converted for detection (tools/convert_to_d2.py); "
            "set MODEL.WEIGHTS_REQUIRED 'none' to accept a partial load on purpose."
        )


def weights_required_mode(cfg, eval_only: bool = False) -> str:
    """Resolve ``MODEL.WEIGHTS_REQUIRED`` ("auto" -> "all" or "resnet")."""
    mode = cfg.MODEL.WEIGHTS_REQUIRED
    if mode != "auto":
        return mode
    return "all" if eval_only or cfg.MODEL.META_ARCHITECTURE == "VirTex" else "resnet"


def build_checkpointer(
    cfg, model: nn.Module, save_dir: str = "", *, eval_only: bool = False, **checkpointables: Any
) -> VirtexCheckpointer:
    """A :class:`VirtexCheckpointer` configured by ``cfg``."""
    return VirtexCheckpointer(
        model,
        save_dir,
        allow_pickle=cfg.MODEL.ALLOW_PICKLE_WEIGHTS,
        weights_required=weights_required_mode(cfg, eval_only),
        **checkpointables,
    )
