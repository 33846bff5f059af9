"""Every random draw of a run, derived from one seed: `runner.seed` (and `actor.builtin.seed`
for the built-in base).

torch starts each process from a random default seed (`torch.initial_seed()` differs between
two `python` calls), so nothing in a run may draw from an unseeded stream. Each consumer asks
this module for its own stream by name; a stream's seed is a hash of (seed, name, rank), so
streams are independent of one another and adding a stream leaves the others unchanged.

Streams of a run (`RunSeeds`):

- "adapter_init": the new adapters' `lora_A` (the same on every rank);
- "sampling": scenes and sampled actions (one stream per rank: each rank samples its share);
- "environment": environment / episode seeds (per rank), for tasks that reset environments;
- "global": `torch.manual_seed` of the process (dropout and anything else on the default
  generator; per rank).

The built-in base (`base_seeds`) keeps its own two seeds, the init and the warm start.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

__all__ = ["STREAMS", "RunSeeds", "base_seeds", "derive_seed"]

STREAMS = ("adapter_init", "value_head_init", "sampling", "environment", "global")
_PER_RANK = ("sampling", "environment", "global")


def derive_seed(seed: int, stream: str, rank: int = 0) -> int:
    """A 63-bit seed for `stream` of `rank`, a pure function of its arguments."""
    digest = hashlib.sha256(f"lora-runtime/{stream}/{seed}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass(frozen=True)
class RunSeeds:
    """The streams of one run on one rank, all from `runner.seed`.

    Args:
        seed: `runner.seed`.
        rank: this process's rank (0 in a single process).
    """

    seed: int
    rank: int = 0

    def generator(self, stream: str) -> torch.Generator:
        """A fresh CPU generator for `stream` (one of `STREAMS`).

        Raises:
            ValueError: an unknown stream name.
        """
        if stream not in STREAMS:
            raise ValueError(f"RunSeeds.generator: stream={stream!r}; allowed {list(STREAMS)}")
        rank = self.rank if stream in _PER_RANK else 0
        return torch.Generator().manual_seed(derive_seed(self.seed, stream, rank))

    def seed_global(self) -> None:
        """Seeds the process's default generators (CPU and CUDA) with the "global" stream."""
        torch.manual_seed(derive_seed(self.seed, "global", self.rank))


def base_seeds(builtin_seed: int) -> tuple[int, int]:
    """`(init, warm_start)` seeds of the built-in base from `actor.builtin.seed`.

    Kept as they were when the base recipe was fixed (`init = seed`, `warm_start = 10000 +
    seed`), so bases cached on disk stay valid.
    """
    return builtin_seed, 10_000 + builtin_seed
