"""The ViT backbone (src/models/vit.py) and its checkpoint loaders against timm, and the query pass against a
masked-attention peer."""
from __future__ import annotations

import argparse
import dataclasses
from functools import partial

import numpy as np
import pytest
import torch
from scipy import ndimage
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch import nn

from src.configs.defaults import get_cfg
from src.configs.vit_configs import MODEL_ZOO, VIT_B16, ViTArch
from src.errors import VQTError
from src.models.checkpoints import build_backbone, load_backbone, write_random_npz
from src.models.vit import IMAGENET_MEAN, IMAGENET_STD, VisionTransformer
from tests.fakes import write_random_mae, write_random_moco
from tests.peers import check_query_pass

IMG = 32
WRITERS = {"npz": write_random_npz, "mae": write_random_mae, "moco": write_random_moco}


def _pool(fmt: str) -> str:
    return "avg" if fmt == "mae" else "token"


def _ours(arch: ViTArch, path, fmt: str, img_size: int = IMG) -> VisionTransformer:
    model = VisionTransformer(dataclasses.replace(arch, pool=_pool(fmt)), img_size)
    load_backbone(model, str(path), fmt)
    return model.requires_grad_(False).eval()


def _timm(arch: ViTArch, path, fmt: str, img_size: int = IMG) -> TimmViT:
    model = TimmViT(img_size=img_size, patch_size=arch.patch_size, embed_dim=arch.embed_dim, depth=arch.depth,
                    num_heads=arch.num_heads, mlp_ratio=arch.mlp_dim / arch.embed_dim, qkv_bias=True,
                    norm_layer=partial(nn.LayerNorm, eps=1e-6), num_classes=0, global_pool=_pool(fmt),
                    fc_norm=fmt == "mae")
    if fmt == "npz":
        model.load_pretrained(str(path))
    else:
        ckpt = torch.load(path, weights_only=True)
        state = ckpt["model"] if fmt == "mae" else {k[7:]: v for k, v in ckpt["state_dict"].items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert (set(missing), set(unexpected)) == (({"fc_norm.weight", "fc_norm.bias"}, {"norm.weight", "norm.bias"})
                                                   if fmt == "mae" else (set(), {"head.weight", "head.bias"}))
    return model.eval()


def _pair(tmp_path, arch: ViTArch, fmt: str) -> tuple[VisionTransformer, TimmViT]:
    path = tmp_path / f"w.{fmt}"
    WRITERS[fmt](str(path), arch, img_size=IMG)
    return _ours(arch, path, fmt), _timm(arch, path, fmt)


def _images(n: int = 2, size: int = IMG) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _normalized(x: torch.Tensor) -> torch.Tensor:
    """What timm's models take: images normalised with the ImageNet mean/std."""
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


@pytest.mark.parametrize("fmt", ["npz", "mae", "moco"])
def test_parity_with_timm(tmp_path, tiny_arch, fmt):
    ours, peer = _pair(tmp_path, tiny_arch, fmt)
    peer_params = dict(peer.named_parameters())
    assert set(dict(ours.named_parameters())) == set(peer_params)
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p, peer_params[name], rtol=0, atol=0)
    x = _images()
    with torch.no_grad():
        feat, kvs = ours.frozen_pass(x)
        assert feat.shape == (2, tiny_arch.embed_dim)
        x = _normalized(x)
        torch.testing.assert_close(feat, peer.forward_head(peer.forward_features(x), pre_logits=True),
                                   rtol=0, atol=1e-5)
        h = peer.norm_pre(peer._pos_embed(peer.patch_embed(x)))
        for blk, (k, v) in zip(peer.blocks, kvs):  # per-layer hidden states, via each layer's keys/values
            _, k_ref, v_ref = blk.attn.qkv(blk.norm1(h)).view(2, -1, 3, tiny_arch.num_heads,
                                                              tiny_arch.embed_dim // tiny_arch.num_heads
                                                              ).permute(2, 0, 3, 1, 4)
            torch.testing.assert_close(k, k_ref, rtol=0, atol=1e-5)
            torch.testing.assert_close(v, v_ref, rtol=0, atol=1e-5)
            h = blk(h)


@pytest.mark.parametrize("fmt", ["npz", "mae"])
def test_query_pass_matches_masked_attention_peer(tmp_path, tiny_arch, fmt):
    """Peer: queries prepended to the sequence, and nobody may attend to a query position."""
    ours, peer = _pair(tmp_path, tiny_arch, fmt)
    x = _images()
    feat, h = check_query_pass(ours, peer, x, _normalized(x))
    with torch.no_grad():  # the original tokens, having run next to the queries, still give the query-free feature
        torch.testing.assert_close(feat, peer.forward_head(peer.norm(h), pre_logits=True), rtol=0, atol=1e-5)


def test_frozen_path_has_no_grad_path_to_queries(tmp_path, tiny_arch):
    ours, _ = _pair(tmp_path, tiny_arch, "npz")
    x = _images()
    tokens = torch.randn(2, tiny_arch.depth, 2, tiny_arch.embed_dim, requires_grad=True)
    feat, kvs = ours.frozen_pass(x)
    assert feat.grad_fn is None and all(k.grad_fn is None and v.grad_fn is None for k, v in kvs)
    outs = [blk.query(tokens[:, i], k, v) for i, (blk, (k, v)) in enumerate(zip(ours.blocks, kvs))]
    (grad,) = torch.autograd.grad(sum(o.square().sum() for o in outs), tokens)
    assert grad.abs().amin(dim=(0, 2, 3)).gt(0).all()  # every layer's tokens reach the output
    torch.testing.assert_close(ours.frozen_pass(x)[0], feat, rtol=0, atol=0)


def test_block_forward_is_timms_and_forward_kv_adds_its_keys_values(tmp_path, tiny_arch):
    ours, peer = _pair(tmp_path, tiny_arch, "npz")
    h = torch.randn(2, 17, tiny_arch.embed_dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for blk, ref in zip(ours.blocks, peer.blocks):
            x, (y, k, v) = blk(h), blk.forward_kv(h)
            torch.testing.assert_close(x, ref(h), rtol=0, atol=1e-5)
            torch.testing.assert_close(y, x, rtol=0, atol=1e-5)
            _, k_ref, v_ref = ref.attn.qkv(ref.norm1(h)).view(2, 17, 3, tiny_arch.num_heads, -1).permute(2, 0, 3, 1, 4)
            assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
            h = x


@pytest.mark.parametrize("fmt", ["npz", "mae", "moco"])
def test_round_trip(tmp_path, tiny_arch, fmt):
    path = tmp_path / "w"
    WRITERS[fmt](str(path), tiny_arch, img_size=IMG)
    model = _ours(tiny_arch, path, fmt)
    if fmt == "npz":
        assert np.load(path).files[0] == "embedding/kernel"
        return  # values checked against timm's npz loader in test_parity_with_timm
    ckpt = torch.load(path, weights_only=True)
    state = ckpt["model"] if fmt == "mae" else {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}
    for name, p in model.named_parameters():
        if fmt == "mae" and name.startswith("fc_norm."):
            assert torch.equal(p, torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p))
        else:
            assert torch.equal(p, state[name]), name
    if fmt == "moco":
        assert ckpt["state_dict"]["module.head.weight"].shape == (1000, tiny_arch.embed_dim)


def test_npz_opt_target_prefix_and_ignored_heads(tmp_path, tiny_arch):
    plain = tmp_path / "plain.npz"
    write_random_npz(str(plain), tiny_arch, img_size=IMG, num_classes=5)
    arrays = dict(np.load(plain))
    assert arrays["head/kernel"].shape == (tiny_arch.embed_dim, 5)
    arrays["pre_logits/kernel"] = np.zeros((3, 3), np.float32)
    prefixed = tmp_path / "prefixed.npz"
    np.savez(prefixed, **{"opt/target/" + k: v for k, v in arrays.items()})
    a, b = _ours(tiny_arch, plain, "npz"), _ours(tiny_arch, prefixed, "npz")
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def test_mae_file_with_namespace_loads(tmp_path, tiny_arch):
    path = tmp_path / "mae.pth"
    write_random_mae(str(path), tiny_arch, img_size=IMG)
    ckpt = torch.load(path, weights_only=True)
    torch.save({**ckpt, "args": argparse.Namespace(model="mae_vit"), "epoch": 799}, path)
    model = _ours(tiny_arch, path, "mae")
    assert torch.equal(model.cls_token, ckpt["model"]["cls_token"])


def test_pos_embed_resized_with_scipy_zoom(tmp_path, tiny_arch):
    path = tmp_path / "w.npz"
    write_random_npz(str(path), tiny_arch, img_size=IMG)  # 4x4 grid
    model = _ours(tiny_arch, path, "npz", img_size=48)  # 6x6 grid
    pos = np.load(path)["Transformer/posembed_input/pos_embedding"]
    d = tiny_arch.embed_dim
    grid = ndimage.zoom(pos[0, 1:].reshape(4, 4, d), (1.5, 1.5, 1), order=1).reshape(1, 36, d)
    expected = np.concatenate([pos[:, :1], grid], axis=1)
    assert model.pos_embed.shape == (1, 37, d)
    np.testing.assert_allclose(model.pos_embed.numpy(), expected, rtol=0, atol=1e-7)
    assert model.frozen_pass(_images(1, 48))[0].shape == (1, d)


def test_build_backbone(tmp_path, tiny_arch):
    cfg = get_cfg()
    cfg.DATA.FEATURE, cfg.DATA.CROPSIZE, cfg.MODEL.MODEL_ROOT = "demo_vit_tiny", 32, str(tmp_path)
    entry = MODEL_ZOO["demo_vit_tiny"]
    write_random_npz(str(tmp_path / entry.file), entry.arch, img_size=224)
    model = build_backbone(cfg)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.pos_embed.shape == (1, 5, entry.arch.embed_dim)
    cfg.MODEL.WEIGHT_PATH = str(tmp_path / "elsewhere.npz")
    with pytest.raises(VQTError, match="elsewhere.npz not found.*download_weights.py.*MODEL.MODEL_ROOT"):
        build_backbone(cfg)


@pytest.mark.parametrize("fmt", ["npz", "mae", "moco"])
def test_unreadable_files(tmp_path, tiny_arch, fmt):
    path = tmp_path / f"w.{fmt}"
    path.write_text("<!DOCTYPE html>\n<html><body>Google Drive - virus scan warning</body></html>\n")
    model = VisionTransformer(tiny_arch, IMG)
    with pytest.raises(VQTError, match="HTML page") as err:
        load_backbone(model, str(path), fmt)
    assert "\n" not in str(err.value)
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(VQTError, match="corrupt or truncated"):
        load_backbone(model, str(path), fmt)


def test_missing_key(tmp_path, tiny_arch):
    path = tmp_path / "w.npz"
    write_random_npz(str(path), tiny_arch, img_size=IMG)
    arrays = dict(np.load(path))
    del arrays["Transformer/encoderblock_1/MlpBlock_3/Dense_0/bias"]
    np.savez(path, **arrays)
    with pytest.raises(VQTError, match="no key 'Transformer/encoderblock_1/MlpBlock_3/Dense_0/bias'.*Google/JAX"):
        load_backbone(VisionTransformer(tiny_arch, IMG), str(path), "npz")
    write_random_mae(str(path), tiny_arch, img_size=IMG)
    with pytest.raises(VQTError, match="no 'state_dict' entry.*MoCo"):
        load_backbone(VisionTransformer(tiny_arch, IMG), str(path), "moco")
    state = torch.load(path, weights_only=True)["model"]
    del state["blocks.2.attn.qkv.bias"]
    torch.save({"model": state}, path)
    with pytest.raises(VQTError, match="no key 'blocks.2.attn.qkv.bias'.*MAE"):
        load_backbone(VisionTransformer(tiny_arch, IMG), str(path), "mae")


def test_shape_mismatch(tmp_path, tiny_arch):
    path = tmp_path / "w.npz"
    write_random_npz(str(path), dataclasses.replace(tiny_arch, mlp_dim=96), img_size=IMG)
    with pytest.raises(VQTError, match=r"'Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel' has shape "
                                       r"\(32, 96\), expected \(32, 64\).*DATA.FEATURE"):
        load_backbone(VisionTransformer(tiny_arch, IMG), str(path), "npz")
    write_random_moco(str(path), dataclasses.replace(tiny_arch, embed_dim=48), img_size=IMG)
    with pytest.raises(VQTError, match=r"'cls_token' has shape \(1, 1, 48\), expected \(1, 1, 32\)"):
        load_backbone(VisionTransformer(tiny_arch, IMG), str(path), "moco")
    write_random_npz(str(path), dataclasses.replace(tiny_arch, depth=4), img_size=IMG)
    with pytest.raises(VQTError, match="more than 3 blocks"):
        load_backbone(VisionTransformer(tiny_arch, IMG), str(path), "npz")


def test_vit_b16_real_layout(tmp_path):
    path = tmp_path / "ViT-B_16.npz"
    write_random_npz(str(path), VIT_B16, num_classes=21843)
    model = _ours(VIT_B16, path, "npz", img_size=224)
    with torch.no_grad():
        feat, kvs = model.frozen_pass(_images(1, 224))
    assert feat.shape == (1, 768) and torch.isfinite(feat).all()
    assert len(kvs) == 12 and all(k.shape == v.shape == (1, 12, 197, 64) for k, v in kvs)
