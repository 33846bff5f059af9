"""Counts the bytes each collective moves, to measure communication per training step.

`CommCounter` is a `TorchDispatchMode`: every `c10d` collective dispatched while it is
active (FSDP2's all-gathers and reduce-scatters, DDP's bucket all-reduces, broadcasts) is
recorded as `(kind, bytes)`. Bytes are the size of the whole logical buffer of the
collective on one rank: the gathered output of an all-gather, the unreduced input of a
reduce-scatter, the tensor of an all-reduce or broadcast. (On the wire, a ring moves about
`(world - 1) / world` of that per rank for all-gather and reduce-scatter, twice that for
all-reduce.)
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["CommCounter"]

_c10d = torch.ops.c10d
_fn = torch.ops._c10d_functional  # what DTensor (full_tensor, redistribute) dispatches


def _nbytes(arg) -> int:
    if isinstance(arg, torch.Tensor):
        return arg.numel() * arg.element_size()
    if isinstance(arg, (list, tuple)):
        return sum(_nbytes(a) for a in arg)
    return 0


def _arg(i: int):
    return lambda args: _nbytes(args[i])


def _gathered(args) -> int:  # functional all-gather: input bytes x group_size
    return _nbytes(args[0]) * args[1]


# op -> (kind, bytes of the whole logical buffer from the op's arguments)
_OPS = {
    _c10d.allreduce_.default: ("all_reduce", _arg(0)),
    _c10d.allreduce_coalesced_.default: ("all_reduce", _arg(0)),
    _c10d.broadcast_.default: ("broadcast", _arg(0)),
    _c10d._allgather_base_.default: ("all_gather", _arg(0)),
    _c10d.allgather_.default: ("all_gather", _arg(0)),
    _c10d.allgather_into_tensor_coalesced_.default: ("all_gather", _arg(0)),
    _c10d._reduce_scatter_base_.default: ("reduce_scatter", _arg(1)),
    _c10d.reduce_scatter_.default: ("reduce_scatter", _arg(1)),
    _c10d.reduce_scatter_tensor_coalesced_.default: ("reduce_scatter", _arg(1)),
    _fn.all_reduce.default: ("all_reduce", _arg(0)),
    _fn.all_reduce_.default: ("all_reduce", _arg(0)),
    _fn.all_reduce_coalesced.default: ("all_reduce", _arg(0)),
    _fn.broadcast.default: ("broadcast", _arg(0)),
    _fn.all_gather_into_tensor.default: ("all_gather", _gathered),
    _fn.all_gather_into_tensor_out.default: ("all_gather", _gathered),
    _fn.all_gather_into_tensor_coalesced.default: ("all_gather", _gathered),
    _fn.reduce_scatter_tensor.default: ("reduce_scatter", _arg(0)),
    _fn.reduce_scatter_tensor_coalesced.default: ("reduce_scatter", _arg(0)),
}


class CommCounter(TorchDispatchMode):
    """Records collectives while active: `with CommCounter() as comm: step()`.

    Attributes:
        records: `(kind, bytes)` per collective call, in order; kind is "all_reduce",
            "all_gather", "reduce_scatter" or "broadcast".
    """

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        entry = _OPS.get(func)
        if entry is not None:
            kind, size = entry
            self.records.append((kind, size(args)))
        return func(*args, **(kwargs or {}))

    def bytes_by_kind(self) -> dict[str, int]:
        """Total bytes per kind of collective."""
        totals: Counter[str] = Counter()
        for kind, n in self.records:
            totals[kind] += n
        return dict(totals)

    def calls_by_kind(self) -> dict[str, int]:
        """Number of collective calls per kind."""
        return dict(Counter(kind for kind, _ in self.records))


# ----------------------------------------------------------------------------- measurement


def _build_llama(args, lora: bool) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_runtime.registry import apply_lora, mark_only_lora_trainable

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        vocab_size=args.vocab,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    if lora:
        apply_lora(
            model,
            rank=args.rank,
            target_modules=[
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ],
        )
        mark_only_lora_trainable(model)
    return model


def measure(args) -> list[dict]:
    """Collective bytes of one training step (the third) for DDP / FSDP2 x LoRA / full."""
    from lora_runtime import distributed

    rows = []
    ids = torch.randint(
        0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1)
    )
    share = ids[distributed.rank_slice(args.batch)]
    for mode in ("ddp", "fsdp"):
        for lora in (True, False):
            model = _build_llama(args, lora)
            params = sum(p.numel() * p.element_size() for p in model.parameters())
            trainable = sum(
                p.numel() * p.element_size() for p in model.parameters() if p.requires_grad
            )
            wrapped = (
                distributed.replicate_actor(model)
                if mode == "ddp"
                else distributed.shard_actor(model)
            )
            opt = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=1e-3)
            for _ in range(3):  # DDP rebuilds its buckets after step 1 (one small broadcast)
                with CommCounter() as comm:
                    wrapped(input_ids=share, labels=share).loss.backward()
                opt.step()
                opt.zero_grad()
            rows.append(
                {
                    "mode": mode,
                    "actor": "lora" if lora else "full",
                    "params": params,
                    "trainable": trainable,
                    **comm.bytes_by_kind(),
                }
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    """`torchrun --nproc_per_node 2 -m lora_runtime.distributed_comm [--hidden ...]`."""
    import argparse
    import warnings

    from lora_runtime import distributed

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (
        ("hidden", 512),
        ("intermediate", 1376),
        ("layers", 4),
        ("heads", 8),
        ("vocab", 4096),
        ("rank", 16),
        ("batch", 4),
        ("seq", 32),
    ):
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    ctx = distributed.init_distributed()
    try:
        rows = measure(args)
    finally:
        distributed.shutdown_distributed()
    if ctx.is_main:
        mib = 2**20
        print(f"world_size={ctx.world_size} {vars(args)}; MiB per step, whole-buffer sizes")
        print("| mode | actor | params | trainable | all-gather | reduce-scatter | all-reduce |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            cells = [
                r.get(k, 0) / mib
                for k in ("params", "trainable", "all_gather", "reduce_scatter", "all_reduce")
            ]
            print(f"| {r['mode']} | {r['actor']} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
