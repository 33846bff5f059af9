"""Worker of tests/parallel/test_distributed.py, started on 2 CPU ranks (gloo) by torchrun.

    python -m torch.distributed.run --nproc_per_node 2 tests/support/dist_worker.py SCENARIO OUT_DIR

Scenarios: "train" (FSDP2 and DDP runs of a tiny Llama and of a small model of our own;
results in OUT_DIR/<case>.rank<r>.pt, adapters in OUT_DIR/adapter_<case>), "sharded_ops"
(`merged()`, `compile_actor` and a compiled training step on an FSDP2-sharded actor) and "fail"
(rank 1 raises while rank 0 saves). The test imports this module too, to run the same
steps in one process on the global batch.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record

from lora_runtime import parallel as distributed
from lora_runtime.adapters import (
    adapter_state_dict,
    apply_lora,
    group_siblings,
    iter_lora_layers,
    iter_merged_weights,
    load_adapter,
    mark_only_lora_trainable,
    save_adapter,
)
from lora_runtime.parallel.comm import CommCounter

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers is imported later, in build()
warnings.filterwarnings("ignore", message=".*returned a view tensor.*")  # FSDP2 on HF outputs

VOCAB, GLOBAL_BATCH, SEQ, STEPS, LR = 128, 4, 8, 3, 1e-2
CASES = ("llama-fsdp", "llama-ddp", "tiny-fsdp", "tiny-ddp")


class TinyBlock(nn.Module):
    """Pre-norm block: causal attention (q/k/v/o_proj) and a ReLU MLP (up/down_proj)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.o_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.up_proj, self.down_proj = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.norm1(x)
        q, k, v = (
            p(h).view(b, t, self.heads, -1).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.down_proj(F.relu(self.up_proj(self.norm2(x))))


class TinyActor(nn.Module):
    """A decoder of our own: no `_no_split_modules`, blocks in an `nn.ModuleList`."""

    def __init__(self, dim: int = 32, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.blocks = nn.ModuleList(TinyBlock(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, VOCAB, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)  # (B, T, D)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))  # (B, T, V)


def build(kind: str, grouped: bool = True) -> nn.Module:
    """The same patched model on every rank: seeded base, non-zero adapters, frozen base,
    siblings grouped (as `prepare_actor` does) unless `grouped` is False."""
    torch.manual_seed(0)
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=VOCAB,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(cfg)
    else:
        model = TinyActor()
    apply_lora(model, rank=4, alpha=8)
    mark_only_lora_trainable(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in iter_lora_layers(model):
            for p in (layer.lora_A.weight, layer.lora_B.weight):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    if grouped:
        assert group_siblings(model, input_ids=eval_ids()), "no sibling group found"
    return model


def batches() -> list[torch.Tensor]:
    """One global batch of token ids `[GLOBAL_BATCH, SEQ]` per optimizer step."""
    gen = torch.Generator().manual_seed(2)
    return [torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=gen) for _ in range(STEPS)]


def eval_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))


def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids)
    return getattr(out, "logits", out)  # (B, T, V)


def loss_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy, mean over this batch's tokens (equal on every rank)."""
    logits = logits_of(model, ids)[:, :-1]  # (B, T-1, V)
    return F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def train(wrapped: nn.Module, model: nn.Module, share: slice) -> dict:
    """STEPS AdamW steps on this rank's `share` of each global batch.

    Returns:
        loss (mean over ranks) and full adapter gradients of step 1, communication records
        per step, adapters / frozen parameters after training, eval logits.
    """
    opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=LR)
    out: dict = {"comm": []}
    for step, ids in enumerate(batches()):
        with CommCounter() as comm:
            loss = loss_of(wrapped, ids[share])
            loss.backward()
        out["comm"].append(comm.records)
        if step == 0:
            out["loss"] = distributed.reduce_metrics({"loss": loss.item()})["loss"]
            out["grads"] = {
                f"{path}.{kind}": distributed.full_tensor(getattr(layer, kind).weight.grad).clone()
                for path, layer in iter_lora_layers(model)
                for kind in ("lora_A", "lora_B")
            }
        opt.step()
        opt.zero_grad()
    out["adapters"] = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    out["frozen"] = {
        n: distributed.full_tensor(p.detach()).clone()
        for n, p in model.named_parameters()
        if not p.requires_grad
    }
    with CommCounter() as comm:
        out["merged"] = {k: v.clone() for k, v in iter_merged_weights(wrapped)}
    out["merge_comm"] = comm.records
    with torch.no_grad():
        out["logits"] = logits_of(wrapped, eval_ids())
    return out


def run_case(case: str, out_dir: str) -> None:
    kind, mode = case.split("-")
    model = build(kind)
    out = {"param_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    if distributed.get_rank() == 1:  # wrapping must start every rank from rank 0's weights
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
    wrapped = (
        distributed.shard_actor(model) if mode == "fsdp" else distributed.replicate_actor(model)
    )
    out.update(train(wrapped, model, distributed.rank_slice(GLOBAL_BATCH)))
    adapter_dir = os.path.join(out_dir, f"adapter_{case}")
    save_adapter(wrapped, adapter_dir)
    # Load back into the sharded / replicated model after scrambling its adapters.
    for _, layer in iter_lora_layers(model):
        for p in (layer.lora_A.weight, layer.lora_B.weight):
            distributed.copy_full_(p, torch.zeros(p.shape))
    with torch.no_grad():
        out["zeroed_logits"] = logits_of(wrapped, eval_ids())
    load_adapter(wrapped, adapter_dir)
    with torch.no_grad():
        out["reloaded_logits"] = logits_of(wrapped, eval_ids())
    torch.save(out, os.path.join(out_dir, f"{case}.rank{distributed.get_rank()}.pt"))


def sharded_ops(model: nn.Module, wrapped: nn.Module) -> dict:
    """`merged()`, `compile_actor` and one training step through the compiled actor, on
    `wrapped` (sharded, or the plain model in one process): logits, weights, gradients."""
    from lora_runtime.adapters import merged
    from lora_runtime.compile import compile_actor

    ids = eval_ids()
    out: dict = {}
    before = {n: distributed.full_tensor(p.detach()).clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        out["logits"] = logits_of(wrapped, ids)
        with merged(wrapped) as stats:
            out["merged_logits"] = logits_of(wrapped, ids)
            out["merged_weights"] = {
                path: distributed.full_tensor(layer.base_layer.weight.detach()).clone()
                for path, layer in iter_lora_layers(model)
            }
        out["merged_layers"] = stats.layers
    after = {n: distributed.full_tensor(p.detach()) for n, p in model.named_parameters()}
    out["restored_exactly"] = all(torch.equal(before[n], after[n]) for n in before)
    compiled = compile_actor(wrapped, backend="aot_eager")
    with torch.no_grad():
        out["compiled_logits"] = logits_of(compiled, ids)
    loss_of(compiled, batches()[0][distributed.rank_slice(GLOBAL_BATCH)]).backward()
    out["compiled_grads"] = {
        f"{path}.{kind}": distributed.full_tensor(getattr(layer, kind).weight.grad).clone()
        for path, layer in iter_lora_layers(model)
        for kind in ("lora_A", "lora_B")
    }
    return out


def run_sharded_ops(out_dir: str) -> None:
    model = build("tiny")
    out = sharded_ops(model, distributed.shard_actor(model))
    torch.save(out, os.path.join(out_dir, f"sharded_ops.rank{distributed.get_rank()}.pt"))


def run_fail(out_dir: str) -> None:
    model = build("tiny")
    wrapped = distributed.shard_actor(model)
    loss_of(wrapped, batches()[0][distributed.rank_slice(GLOBAL_BATCH)]).backward()
    if distributed.get_rank() == 1:
        raise RuntimeError("rank 1 fails on purpose before saving")
    save_adapter(wrapped, os.path.join(out_dir, "adapter_fail"))  # rank 0 waits to gather


@record  # torchrun's failure summary then shows the worker's exception
def main(argv: list[str]) -> None:
    scenario, out_dir = argv
    torch.set_num_threads(1)
    distributed.init_distributed(backend="gloo", timeout_s=60)
    try:
        if scenario == "train":
            for case in CASES:
                run_case(case, out_dir)
        elif scenario == "sharded_ops":
            run_sharded_ops(out_dir)
        elif scenario == "fail":
            run_fail(out_dir)
        else:
            raise ValueError(f"unknown scenario {scenario!r}; allowed 'train', 'sharded_ops', 'fail'")
    finally:
        distributed.shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
