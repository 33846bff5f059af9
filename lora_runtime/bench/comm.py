"""Communication per training step under DDP and FSDP2, LoRA against full fine-tuning.

Run under torchrun: `torchrun --nproc_per_node 2 -m lora_runtime.bench.comm [--hidden ...]`.
Every collective of the third step is counted by `parallel.comm.CommCounter`.
"""

from __future__ import annotations

import argparse
import warnings

import torch

from lora_runtime import parallel as distributed
from lora_runtime.adapters import apply_lora, mark_only_lora_trainable
from lora_runtime.bench.specs import LLAMA_BLOCK_TARGETS, build_tiny_llama
from lora_runtime.parallel.comm import CommCounter


def _build_llama(args, lora: bool) -> torch.nn.Module:
    model = build_tiny_llama(args.hidden, args.intermediate, args.layers, args.heads, args.vocab)
    if lora:
        apply_lora(model, rank=args.rank, target_modules=LLAMA_BLOCK_TARGETS)
        mark_only_lora_trainable(model)
    return model


def measure(args) -> list[dict]:
    """Collective bytes of one training step (the third) for DDP / FSDP2 x LoRA / full."""
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
    """`torchrun --nproc_per_node 2 -m lora_runtime.parallel.comm [--hidden ...]`."""
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
