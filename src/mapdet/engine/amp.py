"""Mixed precision for a training step: ``train.amp`` = ``none`` | ``bf16`` | ``fp16``.

``bf16`` and ``fp16`` run the step's forward passes (the network, and the scores handed to
the loss) under :func:`torch.autocast` on the run's device; the losses themselves see the
scores in the autocast dtype or in float32, as autocast's op lists decide (softmax and
cross-entropy run in float32; :class:`mapdet.MAPLoss` converts its detached scores to
float64 on the CPU either way). ``fp16`` also scales the loss with a
:class:`torch.amp.GradScaler` (float16's range is too narrow for small gradients; bfloat16
has float32's range and needs none): the scaler unscales before gradient clipping and skips
the optimizer step when a gradient overflowed. ``none`` is the plain float32 step, the same
operations as without this module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["AMP_MODES", "MixedPrecision"]

AMP_MODES = ("none", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class MixedPrecision:
    """One run's precision policy: :meth:`autocast` around the forward, :meth:`backward` and
    :meth:`step` in place of ``loss.backward()`` / ``optimizer.step()``.

    Args:
        mode: one of :data:`AMP_MODES`.
        device: the run's device (autocast and the scaler follow its type).
    """

    def __init__(self, mode: str, device: torch.device):
        if mode not in AMP_MODES:
            raise ValueError(f"train.amp must be one of {list(AMP_MODES)}, got {mode!r}")
        self.mode = mode
        self.device_type = torch.device(device).type
        self.scaler = (torch.amp.GradScaler(self.device_type) if mode == "fp16" else None)

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """The step's forward passes run inside this context."""
        if not self.enabled:
            yield
            return
        with torch.autocast(device_type=self.device_type, dtype=_DTYPES[self.mode]):
            yield

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, through the scaler for ``fp16``."""
        if self.scaler is None:
            loss.backward()
        else:
            self.scaler.scale(loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, parameters, clip_grad_norm: float
             ) -> float | None:
        """Clips the gradient's global norm to ``clip_grad_norm`` (> 0; returns the norm
        before clipping, else ``None``) and steps the optimizer; for ``fp16`` the gradients
        are unscaled first and the step is skipped when one of them is not finite."""
        norm = None
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        if clip_grad_norm > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(parameters, clip_grad_norm))
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()
        return norm

    def state_dict(self) -> dict | None:
        """The scaler's state (``fp16``); ``None`` otherwise. Checkpoints do not hold it yet:
        a resumed ``fp16`` run starts again from the default loss scale."""
        return None if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
