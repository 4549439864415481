"""The paper's comparisons as adaptations of the same frozen ViT (MODEL.TRANSFER_TYPE).

Every method is a `VQT` whose backbone is adapted: VPT's transfer types (`linear`, `end2end`, `partial-1`,
`tinytl-bias`, `prompt`, `adapter`), AdaptFormer, LoRA, and VQT on top of the last three (`vqt+prompt`,
`vqt+adaptformer`, `vqt+lora`). A method without query tokens is a `VQT` with Q = 0 and unnormalised
features: a linear head on the backbone's final feature, as in VPT. `adapt` copies the backbone, inserts
the method's modules and leaves exactly the method's tensors trainable.

- `prompt` (VPT): T prompt vectors enter after the prefix tokens (no position embedding, after the embedding
  dropout); deep prompts replace them before every later layer. The backbone runs in eval mode.
- `adapter` (VPT's Pfeiffer adapter): m + Up(GELU(Down(m))) on each block's MLP output.
- `adaptformer`: a parallel bottleneck s * Up(dropout(ReLU(Down(x)))) added to each block's MLP branch.
- `lora`: W_q + (alpha / r) B_q A_q and W_v + (alpha / r) B_v A_v in every block's qkv projection.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn
from yacs.config import CfgNode

from src.configs.transfer import FROZEN_PATH, QUERY_METHODS, adaptation
from src.models.vit import VisionTransformer

END2END_DROPOUT = 0.1  # the original's dropout on the embeddings and in the MLPs when the whole ViT trains


@dataclass(frozen=True)
class Method:
    """A transfer type and its settings (MODEL.TRANSFER_TYPE, MODEL.PROMPT / ADAPTER / ADAPTFORMER / LORA)."""

    name: str = "h2t-prompt"
    prompt_tokens: int = 5
    prompt_deep: bool = False
    prompt_dropout: float = 0.0
    prompt_project: int = -1
    adapter_reduction: int = 8
    adapter_zero_init: bool = False
    adaptformer_bottleneck: int = 64
    adaptformer_scale: float = 0.1
    adaptformer_dropout: float = 0.1
    lora_rank: int = 8
    lora_alpha: float = 8.0

    @classmethod
    def from_cfg(cls, cfg: CfgNode) -> Method:
        m = cfg.MODEL
        p, a, af, lo = m.PROMPT, m.ADAPTER, m.ADAPTFORMER, m.LORA
        return cls(m.TRANSFER_TYPE, p.NUM_TOKENS, p.DEEP, p.DROPOUT, p.PROJECT, a.REDUCATION_FACTOR, a.ZERO_INIT,
                   af.BOTTLENECK, af.SCALE, af.DROPOUT, lo.RANK, lo.ALPHA)

    @property
    def queries(self) -> bool:
        """Whether the method trains VQT's query tokens."""
        return self.name in QUERY_METHODS

    @property
    def base(self) -> str:
        """The adaptation of the backbone (`src.configs.transfer.adaptation`)."""
        return adaptation(self.name)

    @property
    def frozen_path(self) -> bool:
        """Whether the backbone's own path stays frozen (then its outputs can be cached and runs stacked)."""
        return self.base in FROZEN_PATH


VQT_METHOD = Method()


def token_init_bound(patch_size: int, width: int) -> float:
    """v of VPT's U(-v, v) token init, for query tokens and prompts alike: sqrt(6 / (3 P^2 + width))."""
    return math.sqrt(6.0 / (3 * patch_size ** 2 + width))


def init_uniform_(t: torch.Tensor, v: float, generator: torch.Generator) -> None:
    """Fill `t` from U(-v, v), drawn from `generator`."""
    t.copy_(torch.rand(t.shape, generator=generator) * 2 * v - v)


def init_tokens_(tokens: torch.Tensor, patch_size: int, generator: torch.Generator) -> None:
    """Fill tokens (..., width) from U(-v, v), v = `token_init_bound(patch_size, width)`."""
    init_uniform_(tokens, token_init_bound(patch_size, tokens.shape[-1]), generator)


def init_fan_out_(weight: torch.Tensor, generator: torch.Generator) -> None:
    """Kaiming-normal (fan_out) weight (out, in): N(0, 2 / out), drawn from `generator`."""
    weight.copy_(torch.randn(weight.shape, generator=generator) * math.sqrt(2.0 / weight.shape[0]))


class Prompts(nn.Module):
    """VPT's prompts: T vectors of width p (p = `project` if > -1, else D) entering after the prefix tokens,
    `deep`: fresh prompts replacing them before every later layer. Projected (Linear(p, D)) and dropped out."""

    def __init__(self, backbone: VisionTransformer, tokens: int, deep: bool, dropout: float, project: int):
        super().__init__()
        dim, self.start = backbone.embed_dim, backbone.num_prefix_tokens
        width = project if project > -1 else dim
        self.embeddings = nn.Parameter(torch.zeros(backbone.depth if deep else 1, tokens, width))
        self.proj = nn.Linear(width, dim) if project > -1 else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.patch_size = backbone.arch.patch_size

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """Tokens as `init_tokens_`; the projection's weight as `init_fan_out_`, its bias as torch's Linear default
        U(-1/sqrt(p), 1/sqrt(p)) (as the original, which leaves it untouched)."""
        init_tokens_(self.embeddings, self.patch_size, generator)
        if isinstance(self.proj, nn.Linear):
            init_fan_out_(self.proj.weight, generator)
            init_uniform_(self.proj.bias, 1.0 / math.sqrt(self.proj.in_features), generator)

    def forward(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Tokens entering block `layer` (B, N, D) -> with this layer's prompts at positions start..start+T."""
        if layer >= len(self.embeddings):
            return x
        p = self.dropout(self.proj(self.embeddings[layer]).expand(len(x), -1, -1))
        rest = x[:, self.start + (p.shape[1] if layer else 0):]
        return torch.cat([x[:, :self.start], p, rest], dim=1)


class SequentialAdapter(nn.Module):
    """VPT's adapter around a block's MLP: m + Up(GELU(Down(m))), m = MLP(x); Down: D -> D // r."""

    def __init__(self, mlp: nn.Module, dim: int, reduction: int, zero_init: bool):
        super().__init__()
        self.mlp = mlp
        self.down, self.up = nn.Linear(dim, dim // reduction), nn.Linear(dim // reduction, dim)
        self.zero_init = zero_init

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """Weights N(0, 0.01^2) and biases 0 (Houlsby et al.: near identity), or all zero as the original
        code (`MODEL.ADAPTER.ZERO_INIT`: then only Up's bias ever learns)."""
        for lin in (self.down, self.up):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=generator) * (0.0 if self.zero_init else 1e-2))
            lin.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mlp(x)
        return m + self.up(nn.functional.gelu(self.down(m)))


class ParallelAdapter(nn.Module):
    """AdaptFormer: s * Up(dropout(ReLU(Down(x)))) on the MLP branch's input x, added to its output."""

    def __init__(self, dim: int, bottleneck: int, scale: float, dropout: float):
        super().__init__()
        self.down, self.up = nn.Linear(dim, bottleneck), nn.Linear(bottleneck, dim)
        self.dropout, self.scale = nn.Dropout(dropout), scale

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """AdaptFormer's init: Down Kaiming-uniform (a = sqrt(5)), Up and both biases zero."""
        init_uniform_(self.down.weight, 1.0 / math.sqrt(self.down.in_features), generator)
        for t in (self.down.bias, self.up.weight, self.up.bias):
            t.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(self.dropout(torch.relu(self.down(x))))


class LoRAQKV(nn.Module):
    """A qkv projection whose query and value rows get rank-r updates: W + (alpha / r) [B_q A_q; 0; B_v A_v].
    `weight` is that merged matrix, so every user of `qkv.weight` sees the adapted projection; `forward` applies it
    unmerged, as LoRA trains: W x + (alpha / r) B (A x), never forming (or back-propagating into) a 3D x D matrix."""

    def __init__(self, qkv: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base, self.scale = qkv, alpha / rank
        dim = qkv.in_features
        self.a = nn.Parameter(torch.zeros(2, rank, dim))
        self.b = nn.Parameter(torch.zeros(2, dim, rank))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """LoRA's init: A Kaiming-uniform (a = sqrt(5)), B zero (the update starts at 0)."""
        init_uniform_(self.a, 1.0 / math.sqrt(self.a.shape[-1]), generator)
        self.b.zero_()

    @property
    def weight(self) -> torch.Tensor:
        dq, dv = (self.b @ self.a * self.scale).unbind(0)
        return self.base.weight + torch.cat([dq, torch.zeros_like(dq), dv])

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dq, dv = (nn.functional.linear(nn.functional.linear(x, a), b) * self.scale for a, b in zip(self.a, self.b))
        return self.base(x) + torch.cat([dq, torch.zeros_like(dq), dv], dim=-1)


def _trainable_names(backbone: VisionTransformer, base: str) -> list[str]:
    """The backbone's own tensors a method trains (VPT's substring rules on our names)."""
    names = [n for n, _ in backbone.named_parameters()]
    if base == "end2end":
        return names
    if base == "partial-1":
        last = f"blocks.{backbone.depth - 1}."
        return [n for n in names if n.startswith((last, "norm.", "fc_norm."))]
    if base == "tinytl-bias":
        return [n for n in names if n.endswith("bias")]
    return []


def adapt(backbone: VisionTransformer, method: Method) -> tuple[VisionTransformer, Prompts | None]:
    """A copy of `backbone` adapted by `method` (adapters / LoRA inserted, the method's own tensors trainable,
    everything else frozen) and its prompts (VPT), or the backbone itself when the method adapts nothing."""
    if method.frozen_path:
        return backbone, None
    bb = copy.deepcopy(backbone).requires_grad_(False)
    base, dim = method.base, bb.embed_dim
    if base == "end2end":
        for drop in [bb.pos_drop] + [m for blk in bb.blocks for m in blk.mlp.modules() if isinstance(m, nn.Dropout)]:
            drop.p = END2END_DROPOUT
    elif not method.queries:  # the original keeps a partly trained or prompted backbone in eval mode
        bb.pos_drop.p = 0.0
    for blk in bb.blocks:
        if base == "adapter":
            blk.mlp = SequentialAdapter(blk.mlp, dim, method.adapter_reduction, method.adapter_zero_init)
        elif base == "adaptformer":
            blk.adapter = ParallelAdapter(dim, method.adaptformer_bottleneck, method.adaptformer_scale,
                                          method.adaptformer_dropout)
        elif base == "lora":
            blk.attn.qkv = LoRAQKV(blk.attn.qkv, method.lora_rank, method.lora_alpha)
    for name in _trainable_names(bb, base):
        bb.get_parameter(name).requires_grad_(True)
    for module in bb.modules():
        if isinstance(module, SequentialAdapter | ParallelAdapter | LoRAQKV):
            for name, p in module.named_parameters():
                p.requires_grad_(not name.startswith(("mlp.", "base.")))
    prompts = None
    if base == "prompt":
        prompts = Prompts(bb, method.prompt_tokens, method.prompt_deep, method.prompt_dropout, method.prompt_project)
    return bb, prompts


@torch.no_grad()
def reset_adaptation(backbone: VisionTransformer, prompts: Prompts | None, generator: torch.Generator) -> None:
    """Draw the inserted modules' initial values from `generator` (module order)."""
    for module in backbone.modules():
        if isinstance(module, SequentialAdapter | ParallelAdapter | LoRAQKV):
            module.reset_parameters(generator)
    if prompts is not None:
        prompts.reset_parameters(generator)
