"""Which rows each step trains on: endless shuffled batches, deterministic from (seed, epoch), so a resumed
run and several processes see exactly the rows one uninterrupted process sees."""
from __future__ import annotations

from typing import Iterator, Sequence

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


def make_loader_factory(dataset, collate, batch_size: int, seed: int, num_workers: int, pin: bool,
                        lengths: Sequence[int] | None = None):
    """Factory the loop calls with (batches already consumed, rank, world) -> batch iterator;
    ``lengths``: each row's token count, to batch rows of similar length (``data.group_by_length``)."""

    def make(consumed: int, rank: int, world: int) -> Iterator:
        batches = EpochBatchSampler(len(dataset), batch_size * world, seed, lengths=lengths)
        sampler = _RankSampler(batches, consumed, rank, world)
        # its own generator: a DataLoader iterator otherwise draws its workers' base seed from the global
        # one, which a resumed run has just restored, and every dropout mask after the resume would shift
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
            pin_memory=pin, persistent_workers=False, generator=torch.Generator().manual_seed(seed),
        )
        return iter(loader)

    return make


class _RankSampler(torch.utils.data.Sampler):
    """Process ``rank`` of ``world`` takes its slice of each global batch (``world`` x the micro-batch),
    starting after ``consumed`` batches: N processes at micro-batch B see, step by step, exactly the
    rows one process sees at N*B. Batches grouped by length are sorted longest first, so each process takes
    every ``world``-th row of them instead of a block: no process always gets the longest rows."""

    def __init__(self, base: EpochBatchSampler, consumed: int, rank: int, world: int):
        self.base, self.consumed, self.rank, self.world = base, consumed, rank, world

    def __iter__(self):
        self.base.start_batch = self.consumed
        for batch in self.base:
            if self.base.lengths is not None:
                yield batch[self.rank::self.world]
                continue
            per = -(-len(batch) // self.world)
            yield batch[self.rank * per:(self.rank + 1) * per]

    def __len__(self) -> int:
        return len(self.base)
