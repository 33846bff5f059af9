"""The built-in actor: a small vision-language-action policy that knows nothing of LoRA.

Layout (module names are the ones the default LoRA targets were written for):

    vision            ViT: patch_embed, blocks.{i}.attn.{qkv,proj}, blocks.{i}.mlp.{fc1,fc2},
                      head (attention pooling: latent, q, kv, proj, mlp.{fc1,fc2})
    projector         fc1, fc2, fc3 (vision width -> text width)
    language_model    Llama-style decoder: embed_tokens, layers.{i}.self_attn.{q,k,v,o}_proj,
                      layers.{i}.mlp.{gate,up,down}_proj, norm, lm_head

The decoder reads `[patch tokens ; pooled tokens ; text tokens]` and its logits at the text
positions predict the next token (the action tokens at the end of the vocabulary).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lora_runtime.config import BuiltinActorConfig

MODEL_TYPE = "lora_runtime_vla"


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU written out in elementwise ops.

    `F.gelu` on a float32 CPU tensor runs oneDNN's eltwise primitive, which is JIT-compiled and
    cached once per input shape (up to 1024 shapes per process). RL batches change shape every
    iteration (rollout rows shrink as episodes end, minibatches follow the episodes), so that
    cache grew resident memory by about 0.15 MiB an iteration (BENCHMARKS.md "Soak"). The same
    function in elementwise ops caches nothing and costs the same at these sizes.
    """
    return x * 0.5 * (1.0 + torch.erf(x * 0.7071067811865476))


class Mlp(nn.Module):
    """`fc1 -> GELU -> fc2` (ViT style)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu(self.fc1(x)))


class Attention(nn.Module):
    """Bidirectional multi-head self-attention with a fused `qkv` and an output `proj`."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.heads, d // self.heads)  # (B, N, 3, nh, hs)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, N, hs)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, N, hs)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class VitBlock(nn.Module):
    """Pre-norm transformer block: `x + attn(norm1(x))`, then `x + mlp(norm2(x))`."""

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class AttentionPool(nn.Module):
    """Attention pooling head (SigLIP / timm `AttentionPoolLatent`): learned latents attend
    to the patch tokens through `q`, `kv` and `proj`, then an MLP."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, latents: int) -> None:
        super().__init__()
        self.heads = heads
        self.latent = nn.Parameter(torch.zeros(1, latents, dim))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        hs = d // self.heads
        q = self.q(self.latent).expand(b, -1, -1)  # (B, L, D)
        q = q.reshape(b, -1, self.heads, hs).transpose(1, 2)  # (B, nh, L, hs)
        k, v = self.kv(x).view(b, n, 2, self.heads, hs).permute(2, 0, 3, 1, 4).unbind(0)  # (B, nh, N, hs)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, L, hs)
        y = self.proj(y.transpose(1, 2).reshape(b, -1, d))  # (B, L, D)
        return y + self.mlp(self.norm(y))


class VisionEncoder(nn.Module):
    """ViT over non-overlapping patches; returns patch tokens and pooled tokens."""

    def __init__(self, cfg: BuiltinActorConfig) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        num_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.patch_embed = nn.Linear(3 * cfg.patch_size**2, cfg.vision_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, cfg.vision_dim))
        self.blocks = nn.ModuleList(
            VitBlock(cfg.vision_dim, cfg.vision_heads, cfg.vision_mlp_dim) for _ in range(cfg.vision_layers)
        )
        self.norm = nn.LayerNorm(cfg.vision_dim)
        self.head = AttentionPool(cfg.vision_dim, cfg.vision_heads, cfg.vision_mlp_dim, cfg.pool_latents)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        patches = F.unfold(pixel_values, kernel_size=p, stride=p)  # (B, 3*p*p, P)
        x = self.patch_embed(patches.transpose(1, 2)) + self.pos_embed  # (B, P, Dv)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return torch.cat([x, self.head(x)], dim=1)  # (B, P + L, Dv)


class Projector(nn.Module):
    """Three-layer MLP from the vision width to the text width (OpenVLA's fused projector)."""

    def __init__(self, vision_dim: int, text_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, text_dim)
        self.fc2 = nn.Linear(text_dim, text_dim)
        self.fc3 = nn.Linear(text_dim, text_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(gelu(self.fc2(gelu(self.fc1(x)))))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class LlamaAttention(nn.Module):
    """Causal attention with rotary position embeddings and separate q/k/v/o projections."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        shape = (b, n, self.heads, d // self.heads)
        q = self.q_proj(x).view(shape).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(b, n, d))


class LlamaMlp(nn.Module):
    """SwiGLU: `down_proj(silu(gate_proj(x)) * up_proj(x))`."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(dim)
        self.self_attn = LlamaAttention(dim, heads)
        self.post_attention_layernorm = RMSNorm(dim)
        self.mlp = LlamaMlp(dim, mlp_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LanguageModel(nn.Module):
    """Llama-style decoder over pre-embedded prefix tokens followed by text tokens."""

    def __init__(self, cfg: BuiltinActorConfig, max_len: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.text_dim)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg.text_dim, cfg.text_heads, cfg.text_mlp_dim) for _ in range(cfg.text_layers)
        )
        self.norm = RMSNorm(cfg.text_dim)
        self.lm_head = nn.Linear(cfg.text_dim, cfg.vocab_size, bias=False)
        hs = cfg.text_dim // cfg.text_heads
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, hs, 2, dtype=torch.float32) / hs))  # (hs/2,)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (T, hs/2)
        angles = torch.cat([angles, angles], dim=-1)  # (T, hs)
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)

    def forward(self, prefix: torch.Tensor, input_ids: torch.Tensor, with_hidden: bool = False) -> torch.Tensor:
        text = self.embed_tokens(input_ids)  # (B, T, D)
        x = torch.cat([prefix, text], dim=1)  # (B, V + T, D)
        n = x.shape[1]
        cos, sin = self.rope_cos[:n].to(x.dtype), self.rope_sin[:n].to(x.dtype)  # (V + T, hs)
        for layer in self.layers:
            x = layer(x, cos, sin)
        x = self.norm(x[:, prefix.shape[1]:])  # (B, T, D): text positions only
        logits = self.lm_head(x)  # (B, T, vocab)
        if with_hidden:
            return torch.cat([logits, x.to(logits.dtype)], dim=-1)  # (B, T, vocab + D)
        return logits


class TinyVLA(nn.Module):
    """The built-in vision-language-action actor.

    Args:
        cfg: sizes (`actor.builtin`).
    """

    def __init__(self, cfg: BuiltinActorConfig) -> None:
        super().__init__()
        self.config = cfg
        self.num_visual_tokens = (cfg.image_size // cfg.patch_size) ** 2 + cfg.pool_latents
        self.vision = VisionEncoder(cfg)
        self.projector = Projector(cfg.vision_dim, cfg.text_dim)
        self.language_model = LanguageModel(cfg, self.num_visual_tokens + cfg.max_text_len)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`[B, 3, H, W]` images -> `[B, V, text_dim]` prefix tokens for the decoder."""
        return self.projector(self.vision(pixel_values))

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, image_repeats: int = 1, with_hidden: bool = False
    ) -> torch.Tensor:
        """Next-token logits at the text positions.

        Args:
            pixel_values: `[B, 3, image_size, image_size]`, values in [0, 1].
            input_ids: `[B * image_repeats, T]` with `T <= max_text_len`; rows
                `i * image_repeats ... (i + 1) * image_repeats - 1` see image `i` (a GRPO
                group shares one encoded image).
            image_repeats: how many consecutive token rows share each image.
            with_hidden: also return the decoder's last hidden state (the input of `lm_head`,
                what a value head reads), concatenated after the logits (one tensor keeps
                the forward scriptable and DDP's forward the only way in).

        Returns:
            `[B * image_repeats, T, vocab_size]` logits; position `t` predicts token `t + 1`;
            with `with_hidden`, `[B * image_repeats, T, vocab_size + text_dim]`.
        """
        prefix = self.encode_images(pixel_values)  # (B, V, D)
        if image_repeats != 1:
            prefix = prefix.repeat_interleave(image_repeats, dim=0)  # (B * G, V, D)
        return self.language_model(prefix, input_ids, with_hidden)


@torch.no_grad()
def init_weights(model: TinyVLA, seed: int) -> TinyVLA:
    """Deterministic base weights: linears N(0, 1/fan_in), embeddings, latents and position
    embeddings N(0, 1), zero biases, unit norm weights.

    Uses its own generator, so the global RNG is untouched and the result depends on `seed`
    and the sizes only.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.zero_()
        elif p.dim() == 1:  # norm weights
            p.fill_(1.0)
        elif p.dim() == 2 and "embed_tokens" not in name:  # linear weights [out, in]
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
        else:
            p.copy_(torch.randn(p.shape, generator=gen))
    return model


def build_tiny_vla(cfg: BuiltinActorConfig) -> TinyVLA:
    """The built-in actor with its deterministic initial weights (seed `cfg.seed`).

    The global RNG is left as it was (the constructors' default init runs on a fork of it).
    These are the weights before the warm start: the base a run trains from is built by
    `lora_runtime.rl.builtin_base.ensure_builtin_base`.
    """
    with torch.random.fork_rng(devices=[]):
        model = TinyVLA(cfg)
    return init_weights(model, cfg.seed)
