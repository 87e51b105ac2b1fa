"""Fixed-shape batches: the trainer's windows from a token stream, and padded chunks of rows.

* :class:`TokenBatcher` cuts (B, T + 1) windows from one 1-D token stream in an order fixed by
  the seed; its position is two integers (:meth:`TokenBatcher.take` is a pure function of it),
  saved with every checkpoint.
* :func:`padded_batches` walks rows ``batch_size`` at a time and pads the last chunk, so one
  compiled shape serves every chunk (evaluation, held-out SFT metrics, a teacher's top-k).

Needs only numpy.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from .train_config import TrainError, check_int

__all__ = ["TokenBatcher", "padded_batches"]

Position = dict[str, int]  # {"epoch", "index"}: where the next batch starts


class TokenBatcher:
    """Deterministic (B, T + 1) windows from a 1-D token stream.

    Each epoch starts at a random offset in [0, T) (so window boundaries move between epochs)
    and visits the non-overlapping windows ``stream[o + i*T : o + (i+1)*T + 1]`` in a random
    order; both come from ``numpy.random.default_rng([seed, epoch])``. A batch may span two
    epochs. The position is ``{"epoch", "index"}``: :meth:`take` maps a position to its batch
    and the next position; :meth:`state` / :meth:`set_state` save and restore the batcher's
    own, so a resumed run sees exactly the batches an uninterrupted one would.
    """

    def __init__(self, tokens: Any, batch_size: int, seq_len: int, seed: int = 0):
        check_int(batch_size, "batch_size")
        check_int(seq_len, "seq_len")
        if check_int(seed, "seed", low=0) >= 2**32:
            raise TrainError(f"seed must be in [0, 2**32), got {seed}")
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise TrainError(
                f"tokens must be a 1-D integer array of token ids, got "
                f"{tokens.dtype} {tokens.shape}"
            )
        if tokens.size < 2 * seq_len + 1:
            raise TrainError(
                f"{tokens.size} tokens are too few for windows of seq_len + 1 = "
                f"{seq_len + 1} (need at least {2 * seq_len + 1})"
            )
        self.tokens = tokens.astype(np.int32)
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.epoch, self.index = 0, 0
        self._order_cache: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        """Window start offsets of ``epoch``, in visiting order."""
        if self._order_cache is None or self._order_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            offset = int(rng.integers(self.seq_len))
            count = (self.tokens.size - 1 - offset) // self.seq_len
            starts = offset + self.seq_len * np.arange(count)
            self._order_cache = (epoch, starts[rng.permutation(count)])
        return self._order_cache[1]

    @property
    def windows_per_epoch(self) -> int:
        return len(self._order(self.epoch))

    def take(self, position: Mapping[str, int]) -> tuple[np.ndarray, Position]:
        """The batch at ``position`` and the position after it: int32 (B, T + 1) (inputs are
        [:, :-1], targets [:, 1:]). Leaves the batcher's own position alone."""
        epoch, index = int(position["epoch"]), int(position["index"])
        rows: list[np.ndarray] = []
        while len(rows) < self.batch_size:
            order = self._order(epoch)
            if index >= len(order):
                epoch, index = epoch + 1, 0
                continue
            start = int(order[index])
            rows.append(self.tokens[start : start + self.seq_len + 1])
            index += 1
        return np.stack(rows), {"epoch": epoch, "index": index}

    def next(self) -> np.ndarray:
        """The next batch: int32 (B, T + 1); the batcher moves past it."""
        batch, position = self.take({"epoch": self.epoch, "index": self.index})
        self.epoch, self.index = position["epoch"], position["index"]
        return batch

    __next__ = next

    def __iter__(self) -> TokenBatcher:
        return self

    def identity(self) -> dict[str, int]:
        """What a saved position is only valid for: seed, sizes and the stream's length."""
        return {
            "seed": self.seed,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "num_tokens": int(self.tokens.size),
        }

    def state(self, position: Mapping[str, int] | None = None) -> dict[str, int]:
        """``position`` (default: the batcher's own) with :meth:`identity`, as JSON-ready ints."""
        position = {"epoch": self.epoch, "index": self.index} if position is None else position
        return {"epoch": int(position["epoch"]), "index": int(position["index"]), **self.identity()}

    def check_state(self, state: Mapping[str, int]) -> Position:
        """The position saved in ``state``, after checking it belongs to this batcher (keys of
        :meth:`identity` left out of ``state`` are not checked)."""
        mine = self.identity()
        for key in mine:
            if key in state and int(state[key]) != mine[key]:
                raise TrainError(
                    f"data state was saved with {key}={state[key]}, this batcher has "
                    f"{key}={mine[key]}: the checkpoint belongs to a different data "
                    "setup"
                )
        position: dict[str, Any] = {key: state.get(key) for key in ("epoch", "index")}
        if not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0
            for v in position.values()
        ):
            raise TrainError(
                f"data state must hold non-negative integers 'epoch' and 'index', got {position}"
            )
        return {key: int(v) for key, v in position.items()}

    def set_state(self, state: Mapping[str, int]) -> None:
        position = self.check_state(state)
        self.epoch, self.index = position["epoch"], position["index"]


def padded_batches(
    arrays: Sequence[np.ndarray], batch_size: int, fill: Sequence[Any]
) -> Iterator[tuple[tuple[np.ndarray, ...], int]]:
    """``batch_size`` rows at a time of arrays sharing their first axis (R rows each).

    Yields ``(chunks, n)``: each chunk holds exactly ``batch_size`` rows, the first ``n`` real
    and the rest (the last chunk only) filled with ``fill[i]`` for ``arrays[i]``, so one
    compiled shape serves every chunk; callers keep results of the first ``n`` rows (or give the
    padding a zero weight). Slicing a view (e.g. ``sliding_window_view``) copies only a chunk.
    Raises ``ValueError`` for no rows at all or arrays of different lengths.
    """
    check_int(batch_size, "batch_size")
    if len(arrays) != len(fill):
        raise ValueError(f"{len(arrays)} arrays but {len(fill)} fill values")
    rows = len(arrays[0])
    if any(len(a) != rows for a in arrays):
        raise ValueError(
            f"arrays must have the same number of rows, got {[len(a) for a in arrays]}"
        )
    if rows == 0:
        raise ValueError("there are no rows to batch (the input is empty)")
    for start in range(0, rows, batch_size):
        chunks = tuple(np.asarray(a[start : start + batch_size]) for a in arrays)
        n = len(chunks[0])
        if n < batch_size:
            chunks = tuple(
                np.concatenate([c, np.full((batch_size - n, *c.shape[1:]), v, c.dtype)])
                for c, v in zip(chunks, fill)
            )
        yield chunks, n
