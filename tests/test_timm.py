"""timm backbones (MODEL.TIMM_NAME), one per family, offline: a small random timm model of each family is
saved in its released file format, loaded through our path, and checked against timm itself."""
from __future__ import annotations

import numpy as np
import pytest
import safetensors.torch
import timm
import torch

from src.configs.vit_configs import ViTArch
from src.data.loader import ImageSet
from src.data.preprocess import preprocess
from src.engine.frozen import FrozenFeatures
from src.engine.members import Members
from src.errors import VQTError
from src.models.checkpoints import write_random_npz
from src.models.timm_backbone import build_timm_backbone, check_timm_name, image_config
from src.models.vqt import VQT, QuerySpec
from tests.peers import check_query_pass

SMALL = {"embed_dim": 32, "depth": 2, "num_heads": 4}
# family -> (timm name, image size, file format)
FAMILIES = {
    "classic": ("vit_base_patch16_224.augreg2_in21k_ft_in1k", 32, "npz"),
    "deit": ("deit_base_patch16_224.fb_in1k", 32, "deit"),
    "dinov2_reg": ("vit_base_patch14_reg4_dinov2.lvd142m", 28, "safetensors"),
    "clip": ("vit_base_patch16_clip_224.openai", 32, "safetensors"),
    "siglip": ("vit_base_patch16_siglip_224", 32, "safetensors"),
    "mae": ("vit_base_patch16_224.mae", 32, "mae"),
}


def write_family_weights(path: str, name: str, img_size: int, fmt: str, seed: int = 0) -> torch.nn.Module:
    """A small random timm model of `name`'s family saved as its releases are: timm state dicts in
    .safetensors (Hugging Face hub), DeiT's `{'model': ...}` .pth (with its 1000-class head), MAE's
    `{'model': encoder}` .pth, a Google .npz. Returns the timm model (eval mode) the file holds."""
    torch.manual_seed(seed)
    model = timm.create_model(name, img_size=img_size, **SMALL).eval()
    with torch.no_grad():  # off timm's init (LayerScale 1e-5, LayerNorm 1/0): every parameter matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    if fmt == "npz":
        arch = ViTArch(16, SMALL["embed_dim"], SMALL["depth"], SMALL["num_heads"], 4 * SMALL["embed_dim"])
        write_random_npz(path, arch, img_size=img_size, seed=seed, num_classes=1000)
        model.load_pretrained(path)
    elif fmt == "safetensors":
        safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    else:
        torch.save({"model": model.state_dict()}, path)
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(timm model as saved, our backbone loaded from the file, image size)."""
    name, size, fmt = FAMILIES[request.param]
    path = str(tmp_path_factory.mktemp(request.param) / f"weights.{'pth' if fmt in ('deit', 'mae') else fmt}")
    peer = write_family_weights(path, name, size, fmt)
    return peer, build_timm_backbone(name, path, size, **SMALL), size


def _images(n: int, size: int) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _normalized(x: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    cfg = model.pretrained_cfg
    return (x - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)


def test_frozen_pass_equals_timm_forward(family):
    peer, ours, size = family
    x = _images(2, size)
    with torch.no_grad():
        feat, kvs = ours.frozen_pass(x)
        ref = peer.forward_head(peer.forward_features(_normalized(x, peer)), pre_logits=True)
        torch.testing.assert_close(feat, ref, rtol=0, atol=1e-5)
        h = peer.norm_pre(peer._pos_embed(peer.patch_embed(_normalized(x, peer))))
        assert kvs[0][0].shape[2] == h.shape[1] == ours.num_tokens  # prefix (CLS, registers) + patch tokens
        for blk, (k, v) in zip(peer.blocks, kvs):
            a = blk.attn
            _, k_ref, v_ref = a.qkv(blk.norm1(h)).view(2, -1, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
            torch.testing.assert_close(k, a.k_norm(k_ref), rtol=0, atol=1e-5)
            torch.testing.assert_close(v, v_ref, rtol=0, atol=1e-5)
            h = blk(h)


def test_query_path_equals_timm_blocks_with_masked_queries(family):
    """Peer: queries prepended to each block's input, and no token may attend to a query position."""
    peer, ours, size = family
    x = _images(2, size)
    check_query_pass(ours, peer, x, _normalized(x, peer))


def test_cached_equals_uncached(family):
    """VQT on images (backbone every call) == the stacked engine on the cached frozen path."""
    _, ours, size = family
    rng = np.random.default_rng(0)
    images = ImageSet([rng.integers(0, 256, (size + 5, size, 3), dtype=np.uint8) for _ in range(4)],
                      np.zeros(4, np.int64))
    spec = QuerySpec(2, 5)
    members = Members(ours, spec, [7])
    members.reset(torch.device("cpu"))
    one = VQT(ours, spec)
    one.load_trained_state(members.trained_state(0)["model"])
    frozen = FrozenFeatures(ours, images, size, torch.device("cpu"), cache=True)
    with torch.no_grad():
        feat, kvs, _ = frozen.batch(torch.arange(4))
        cached = members(feat, kvs)[:, 0]
        torch.testing.assert_close(cached, one(preprocess(images.images, size)), rtol=0, atol=1e-5)


def test_image_config_from_timm():
    c = image_config("vit_base_patch16_clip_224.openai")
    assert (c.size, c.mean[0], c.interpolation) == (224, 0.48145466, "bicubic")
    assert image_config("vit_base_patch14_reg4_dinov2.lvd142m").size == 518
    assert image_config("vit_base_patch14_reg4_dinov2.lvd142m", 224).size == 224


@pytest.mark.parametrize("name, what", [
    ("eva02_tiny_patch14_224.mim_in22k", "Eva"),
    ("swin_tiny_patch4_window7_224.ms_in1k", "SwinTransformer"),
    ("vit_relpos_base_patch16_224.sw_in1k", "VisionTransformerRelPos"),
    ("deit_base_distilled_patch16_224.fb_in1k", "VisionTransformerDistilled"),
    ("not_a_model", "not a timm model"),
])
def test_unsupported_families_one_line(name, what):
    with pytest.raises(VQTError, match=what) as err:
        check_timm_name(name)
    assert "\n" not in str(err.value) and ("supported: " in str(err.value) or what == "not a timm model")


def test_missing_or_wrong_weights(tmp_path):
    name = "vit_base_patch16_clip_224.openai"
    with pytest.raises(VQTError, match="does not exist"):
        build_timm_backbone(name, str(tmp_path / "nope.safetensors"), 32, **SMALL)
    other = tmp_path / "other.safetensors"
    write_family_weights(str(other), "vit_base_patch16_siglip_224", 32, "safetensors")
    with pytest.raises(VQTError, match="cannot load .*other.safetensors into timm model") as err:
        build_timm_backbone(name, str(other), 32, **SMALL)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name, size, fmt", [
    ("vit_base_patch16_224.augreg2_in21k_ft_in1k", 32, "safetensors"),
    ("deit_base_patch16_224.fb_in1k", 32, "deit"),
    ("vit_base_patch16_clip_224.openai", 32, "safetensors"),
    ("vit_medium_patch16_gap_256.sw_in12k_ft_in1k", 32, "safetensors"),
])
def test_weights_load_strictly(tmp_path, name, size, fmt):
    """A file with a tensor missing and a foreign one is refused in one line naming both; the file as
    released loads (with its head, which is then dropped)."""
    path = str(tmp_path / f"w.{'pth' if fmt == 'deit' else fmt}")
    peer = write_family_weights(path, name, size, fmt)
    backbone = build_timm_backbone(name, path, size, **SMALL)
    torch.testing.assert_close(backbone.blocks[1].mlp.fc2.bias, peer.blocks[1].mlp.fc2.bias, rtol=0, atol=0)
    state = {k: v for k, v in peer.state_dict().items() if k != "blocks.1.mlp.fc2.bias"}
    state["foreign.weight"] = torch.zeros(3)
    if fmt == "deit":
        torch.save({"model": state}, path)
    else:
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, path)
    with pytest.raises(VQTError, match="cannot load .*Missing key.*blocks.1.mlp.fc2.bias.*Unexpected key.*"
                                       "foreign.weight") as err:
        build_timm_backbone(name, path, size, **SMALL)
    assert "\n" not in str(err.value)


def test_fine_tuned_head_of_another_size_loads(tmp_path):
    """A fine-tuned checkpoint (10 classes, not the released 1000) still loads strictly, with its own head."""
    name, path = "deit_base_patch16_224.fb_in1k", str(tmp_path / "finetuned.pth")
    torch.manual_seed(0)
    peer = timm.create_model(name, img_size=32, num_classes=10, **SMALL).eval()
    torch.save({"model": peer.state_dict()}, path)
    backbone = build_timm_backbone(name, path, 32, **SMALL)
    torch.testing.assert_close(backbone.blocks[1].mlp.fc2.weight, peer.blocks[1].mlp.fc2.weight, rtol=0, atol=0)
