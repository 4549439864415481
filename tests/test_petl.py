"""The paper's comparison methods (src/models/petl.py): trainable sets against the original code's counts,
forward passes against timm's own blocks, and VQT on an adapted backbone against plain VQT."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer as TimmViT

from src.configs.vit_configs import VIT_B16, ViTArch
from src.models.petl import Method
from src.models.vit import VisionTransformer, classic_timm_vit
from src.models.vqt import VQT, QuerySpec

IMG = 32
ARCH = ViTArch(patch_size=8, embed_dim=32, depth=3, num_heads=4, mlp_dim=64, embed_dropout=0.0)
HEAD = {"head.last_layer.weight", "head.last_layer.bias"}


def _pair(arch: ViTArch = ARCH, seed: int = 0) -> tuple[VisionTransformer, TimmViT]:
    """Our backbone and an independent timm ViT holding the same (random) weights."""
    torch.manual_seed(seed)
    peer = classic_timm_vit(arch, IMG)
    for p in peer.parameters():
        p.data.normal_(0, 0.2)
    return VisionTransformer(arch, IMG, model=copy.deepcopy(peer)).eval(), peer.eval()


def _model(backbone: VisionTransformer, name: str, q: int = 0, classes: int = 5, **kw) -> VQT:
    method = Method(name, **kw)
    spec = QuerySpec(q, classes) if method.queries else QuerySpec(0, classes, normalize=False)
    model = VQT(backbone, spec, method=method)
    model.reset_parameters(torch.Generator().manual_seed(1))
    return model


def _trainable(model: VQT) -> dict[str, int]:
    return {n: p.numel() for n, p in model.named_trained().items() if p.requires_grad}


@pytest.mark.parametrize(("name", "kw", "expected"), [
    ("linear", {}, 0),
    ("partial-1", {}, 7_089_408),
    ("tinytl-bias", {}, 102_912),
    ("adapter", {"adapter_reduction": 8}, 1_779_840),
    ("adapter", {"adapter_reduction": 64}, 230_544),
    ("end2end", {}, 85_798_656),
    ("prompt", {"prompt_tokens": 10}, 768 * 10),
    ("prompt", {"prompt_tokens": 10, "prompt_deep": True}, 12 * 768 * 10),
    ("adaptformer", {}, 12 * (768 * 64 + 64 + 64 * 768 + 768)),
    ("lora", {}, 12 * 2 * 2 * 8 * 768),
])
def test_trainable_counts_at_vit_b16_are_the_original_codes(name, kw, expected):
    """Encoder tensors each type trains at ViT-B/16 (reference-spec §13.3 and §13.5's counts); the head always."""
    backbone = VisionTransformer(VIT_B16, 224)
    counts = _trainable(_model(backbone, name, classes=10, **kw))
    assert sum(v for n, v in counts.items() if n not in HEAD) == expected
    assert HEAD <= set(counts)
    assert not any(p.requires_grad for p in backbone.parameters())  # the shared backbone stays frozen


@pytest.mark.parametrize("name", ["partial-1", "tinytl-bias", "prompt", "adapter", "adaptformer", "lora", "end2end",
                                  "vqt+prompt", "vqt+adaptformer", "vqt+lora"])
def test_one_step_moves_exactly_the_trainable_tensors(name):
    backbone, _ = _pair()
    model = _model(backbone, name, q=2, prompt_deep=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x, y = torch.rand(4, 3, IMG, IMG), torch.tensor([0, 1, 2, 3])
    for _ in range(2):  # two steps: zero-initialised halves (LoRA's B, adapters' Up) move the other half next
        opt.zero_grad()
        F.cross_entropy(model.train()(x), y).backward()
        opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == trained
    assert any(not n.startswith("head.") for n in moved)
    assert not any(p.requires_grad for p in backbone.parameters())


def _timm_logits(peer: TimmViT, x: torch.Tensor, head: torch.nn.Linear, insert=None, block=None) -> torch.Tensor:
    """timm's own forward, written out: embeddings, `insert(tokens, layer)` before each block, `block(blk, x)`
    instead of timm's Block.forward, final norm, CLS, head."""
    t = peer._pos_embed(peer.patch_embed(x))
    for i, blk in enumerate(peer.blocks):
        t = insert(t, i) if insert else t
        t = block(blk, t) if block else blk(t)
    return head(peer.norm(t)[:, 0])


def _images(backbone: VisionTransformer) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(3, 3, IMG, IMG)
    return x, (x - backbone.mean) / backbone.std


@pytest.mark.parametrize("deep", [False, True])
def test_vpt_prompts_sit_after_cls_without_position_embedding(deep):
    """Shallow: T prompts after CLS enter layer 0 and evolve; deep: layer i's prompts replace the previous ones."""
    backbone, peer = _pair()
    model = _model(backbone, "prompt", prompt_tokens=3, prompt_deep=deep).eval()
    prompts = model.prompts.embeddings.detach()

    def insert(t: torch.Tensor, i: int) -> torch.Tensor:
        if i and not deep:
            return t
        p = prompts[i].expand(len(t), -1, -1)
        return torch.cat([t[:, :1], p, t[:, 1 + (3 if i else 0):]], dim=1)

    x, normed = _images(backbone)
    torch.testing.assert_close(model(x), _timm_logits(peer, normed, model.head.last_layer, insert))


def test_vpt_prompt_projection_and_dropout():
    backbone, _ = _pair()
    model = _model(backbone, "prompt", prompt_tokens=3, prompt_project=6, prompt_dropout=0.5)
    assert model.prompts.embeddings.shape == (1, 3, 6)
    x = torch.rand(2, 3, IMG, IMG)
    assert torch.equal(model.eval()(x), model(x))
    torch.manual_seed(0)
    assert not torch.equal(model.train()(x), model.eval()(x))


@pytest.mark.parametrize(("project", "width"), [(-1, ARCH.embed_dim), (6, 6)])
def test_vpt_prompt_init_is_uniform_over_the_patch_and_prompt_width(project, width):
    """reference-spec §13.4: prompts ~ U(-v, v), v = sqrt(6 / (3 P^2 + p)) with p the prompt width (the projection's
    input); the projection Kaiming-normal (fan_out), its bias torch's default U(-1/sqrt(p), 1/sqrt(p))."""
    backbone, _ = _pair()
    model = _model(backbone, "prompt", prompt_tokens=40, prompt_deep=True, prompt_project=project)
    v = math.sqrt(6 / (3 * ARCH.patch_size ** 2 + width))
    tokens = model.prompts.embeddings.abs()
    assert tokens.max() <= v and tokens.max() > 0.95 * v and abs(tokens.mean().item() - v / 2) < 0.05 * v
    assert abs(model.prompts.embeddings.mean().item()) < 0.1 * v
    if project > -1:
        w = model.prompts.proj.weight
        assert abs(w.std().item() - math.sqrt(2 / ARCH.embed_dim)) < 0.1 * math.sqrt(2 / ARCH.embed_dim)
        b = model.prompts.proj.bias.abs()
        assert b.max() <= 1 / math.sqrt(width) and b.max() > 0.5 / math.sqrt(width)


def test_adaptformer_adds_a_scaled_bottleneck_of_the_mlp_input():
    backbone, peer = _pair()
    model = _model(backbone, "adaptformer", adaptformer_scale=0.3)
    for blk in model.backbone.blocks:  # nonzero Up so that the branch counts
        blk.adapter.up.weight.data.normal_(0, 0.3)
    adapters = [blk.adapter for blk in model.backbone.blocks]

    def block(blk, t):
        i = list(peer.blocks).index(blk)
        a = adapters[i]
        t = t + blk.attn(blk.norm1(t))
        return t + blk.mlp(blk.norm2(t)) + 0.3 * a.up(torch.relu(a.down(t)))

    x, normed = _images(backbone)
    model.eval()
    torch.testing.assert_close(model(x), _timm_logits(peer, normed, model.head.last_layer, block=block))
    h = torch.randn(2, 5, ARCH.embed_dim)
    for blk, ref in zip(model.backbone.blocks, peer.blocks):  # the plain forward carries the branch too
        torch.testing.assert_close(blk(h), block(ref, h))


def test_vpt_adapter_is_sequential_on_the_mlp_output():
    backbone, peer = _pair()
    model = _model(backbone, "adapter", adapter_reduction=4)
    adapters = [blk.mlp for blk in model.backbone.blocks]
    assert adapters[0].down.out_features == ARCH.embed_dim // 4

    def block(blk, t):
        a = adapters[list(peer.blocks).index(blk)]
        t = t + blk.attn(blk.norm1(t))
        m = blk.mlp(blk.norm2(t))
        return t + m + a.up(F.gelu(a.down(m)))

    x, normed = _images(backbone)
    torch.testing.assert_close(model.eval()(x), _timm_logits(peer, normed, model.head.last_layer, block=block))


def test_lora_updates_query_and_value_projections_only():
    backbone, peer = _pair()
    model = _model(backbone, "lora", lora_rank=2, lora_alpha=4.0)
    loras = [blk.attn.qkv for blk in model.backbone.blocks]
    for lo in loras:
        lo.b.data.normal_(0, 0.3)
    d = ARCH.embed_dim

    def block(blk, t):
        lo = loras[list(peer.blocks).index(blk)]
        attn = copy.deepcopy(blk.attn)
        w = attn.qkv.weight.detach().clone()
        w[:d] += 2.0 * lo.b[0].detach() @ lo.a[0].detach()
        w[2 * d:] += 2.0 * lo.b[1].detach() @ lo.a[1].detach()
        attn.qkv.weight.data = w
        t = t + attn(blk.norm1(t))
        return t + blk.mlp(blk.norm2(t))

    x, normed = _images(backbone)
    torch.testing.assert_close(model.eval()(x), _timm_logits(peer, normed, model.head.last_layer, block=block))
    h = torch.randn(2, 5, d)
    torch.testing.assert_close(loras[0](h), F.linear(h, loras[0].weight, loras[0].bias))  # unmerged == merged


@pytest.mark.parametrize("name", ["vqt+adaptformer", "vqt+lora"])
def test_vqt_on_a_zero_initialised_adaptation_equals_vqt(name):
    """At init (AdaptFormer's Up and LoRA's B are zero) the adapted VQT computes exactly today's VQT."""
    backbone, _ = _pair()
    plain, adapted = _model(backbone, "h2t-prompt", q=2), _model(backbone, name, q=2)
    x = torch.rand(3, 3, IMG, IMG)
    assert torch.equal(plain.eval()(x), adapted.eval()(x))
    assert adapted.backbone is not backbone and plain.backbone is backbone


def test_vqt_on_prompts_reads_the_prompted_layers():
    backbone, _ = _pair()
    plain, prompted = _model(backbone, "h2t-prompt", q=2), _model(backbone, "vqt+prompt", q=2, prompt_deep=True)
    x = torch.rand(3, 3, IMG, IMG)
    f_plain, f_prompted = plain.eval().features(x), prompted.eval().features(x)
    assert f_plain.shape == f_prompted.shape
    assert not torch.allclose(f_plain, f_prompted)


def test_original_adapter_zero_init_leaves_only_the_up_bias_learning():
    """reference-spec §13.5: with the original's all-zero init, Down and Up weights never move."""
    backbone, _ = _pair()
    model = _model(backbone, "adapter", adapter_zero_init=True)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, y = torch.rand(4, 3, IMG, IMG), torch.tensor([0, 1, 2, 3])
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model.train()(x), y).backward()
        opt.step()
    a = model.backbone.blocks[0].mlp
    assert not a.down.weight.any() and not a.up.weight.any() and not a.down.bias.any()
    assert a.up.bias.any()
    paper = _model(backbone, "adapter")
    assert paper.backbone.blocks[0].mlp.down.weight.any()


def test_end2end_trains_with_the_originals_dropout_and_other_types_without():
    backbone, _ = _pair()
    backbone.pos_drop.p = 0.1  # MODEL.H2T.EMBED_DROPOUT_IN_TRAIN's backbone
    full, partial = _model(backbone, "end2end"), _model(backbone, "partial-1")
    assert full.backbone.pos_drop.p == 0.1 and full.backbone.blocks[0].mlp.drop1.p == 0.1
    assert partial.backbone.pos_drop.p == 0.0 and backbone.pos_drop.p == 0.1
