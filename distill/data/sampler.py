"""Which rows each step trains on: endless shuffled batches, deterministic from (seed, epoch), so a resumed
run and several processes see exactly the rows one uninterrupted process sees."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..errors import DataError


class EpochBatchSampler(torch.utils.data.Sampler):
    """Endless shuffled batches, deterministic from (seed, epoch); starts at ``start_batch``.

    Yields indices ``epoch * n + i`` so the dataset knows the epoch without shared state. With
    ``lengths`` (each row's token count) batches hold rows of similar length, as transformers'
    ``group_by_length``: each run of ``group`` shuffled batches is sorted by length and cut again,
    then the epoch's batches are shuffled, so text students pad far less.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, start_batch: int = 0, drop_last: bool = True,
                 lengths: Sequence[int] | None = None, group: int = 32):
        if n == 0:
            raise DataError("no usable rows to train on")
        if lengths is not None and len(lengths) != n:
            raise ValueError(f"lengths: {len(lengths)} values for {n} rows")
        self.n, self.batch_size, self.seed, self.start_batch = n, batch_size, seed, start_batch
        self.drop_last = drop_last and n >= batch_size
        self.per_epoch = n // batch_size if self.drop_last else -(-n // batch_size)
        self.lengths = None if lengths is None else np.asarray(lengths)
        self.group = max(1, int(group))

    def _epoch(self, epoch: int) -> list[np.ndarray]:
        perm = np.random.default_rng([self.seed, 10_007, epoch]).permutation(self.n)
        if self.lengths is None:
            return [perm[k * self.batch_size:(k + 1) * self.batch_size] for k in range(self.per_epoch)]
        perm = perm[:self.per_epoch * self.batch_size] if self.drop_last else perm
        chunk, batches = self.group * self.batch_size, []
        for start in range(0, len(perm), chunk):
            part = perm[start:start + chunk]
            part = part[np.argsort(-self.lengths[part], kind="stable")]
            batches += [part[k:k + self.batch_size] for k in range(0, len(part), self.batch_size)]
        order = np.random.default_rng([self.seed, 10_007, epoch, 1]).permutation(len(batches))
        return [batches[k] for k in order]

    def __iter__(self):
        epoch, b = divmod(self.start_batch, self.per_epoch)
        while True:
            batches = self._epoch(epoch)
            for k in range(b, self.per_epoch):
                yield [int(epoch * self.n + i) for i in batches[k]]
            epoch, b = epoch + 1, 0

    def __len__(self) -> int:  # endless; accelerate asks for a length
        return 1 << 40
