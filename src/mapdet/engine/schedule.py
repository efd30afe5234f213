"""The data order of training: a seeded permutation per epoch, addressable by position.

Image ``p`` of the run (``p = iteration * images_per_batch + j``) is image
``perm_e[p mod n]`` of epoch ``e = p // n``, where ``perm_e`` is a permutation drawn from a
generator seeded with ``(seed, e)``; its horizontal flip is drawn the same way. The order is
therefore a pure function of ``(seed, n, p)``: a resumed run only needs the iteration (the
checkpoint's ``data_position``) to continue exactly where it stopped, whatever the number of
loader workers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

__all__ = ["DataOrder"]


@dataclass(frozen=True)
class DataOrder:
    """Which images (and flips) make up each minibatch.

    Args:
        num_images: ``n``, images in the training set.
        images_per_batch: images per iteration.
        seed: the run's seed.
        flip: draw horizontal flips (probability 1/2), else never flip.
    """

    num_images: int
    images_per_batch: int
    seed: int
    flip: bool = True

    def __post_init__(self) -> None:
        if self.num_images <= 0:
            raise ValueError("the training set is empty: no images to train on")
        if self.images_per_batch <= 0:
            raise ValueError(f"images_per_batch must be > 0, got {self.images_per_batch}")

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        return _epoch_order(self.seed, self.num_images, epoch, self.flip)

    def position(self, iteration: int) -> int:
        """The data position (images consumed) at the start of ``iteration``."""
        return iteration * self.images_per_batch

    def item(self, position: int) -> tuple[int, bool]:
        """``(dataset index, flip)`` of the image at ``position``."""
        epoch, offset = divmod(position, self.num_images)
        perm, flips = self._epoch(epoch)
        return int(perm[offset]), bool(flips[offset])

    def batch(self, iteration: int) -> list[tuple[int, bool]]:
        """``(dataset index, flip)`` of the images of ``iteration``."""
        start = self.position(iteration)
        return [self.item(p) for p in range(start, start + self.images_per_batch)]


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, n: int, epoch: int, flip: bool) -> tuple[np.ndarray, np.ndarray]:
    """Permutation ``(n,)`` and flips ``(n,)`` of one epoch (pure function of its arguments)."""
    rng = np.random.default_rng([seed % 2**32, epoch, 0x6D617064])
    perm = rng.permutation(n)
    flips = rng.random(n) < 0.5 if flip else np.zeros(n, dtype=bool)
    return perm, flips
