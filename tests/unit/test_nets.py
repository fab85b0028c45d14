"""Tests of stages.core.nets: feature taps, heads, determinism, and bit-identical model folders."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from stages.core.errors import InputError
from stages.core.io import load_safetensors, read_provenance, save_safetensors
from stages.core.nets import FoundationNet, load_model, model_id, normalise_ssl, save_model

TINY_UNET = {"features": [4, 4, 8, 8, 16, 4], "norm": ["group", {"num_groups": 2}]}
# window 4 and group norm: window 7 is very slow on CPU, and instance norm cannot run on the 1-voxel
# bottleneck of a 32^3 patch
TINY_SWIN = {
    "feature_size": 12,
    "depths": [1, 1, 1, 1],
    "window_size": 4,
    "norm_name": ["group", {"num_groups": 4}],
}


def _unet(**kw: object) -> FoundationNet:
    return FoundationNet("basicunet", arch_kwargs=TINY_UNET, ssl={"patch_size": [24, 24, 24]}, seed=3, **kw)


@pytest.mark.parametrize("shape", [(2, 1, 19, 21, 23), (1, 1, 32, 32, 32)])
def test_basicunet_shapes(shape: tuple[int, ...]) -> None:
    model = _unet(heads={"liver": 3}).eval()
    x = torch.randn(shape)
    with torch.no_grad():
        deepest, decoded = model.forward_features(x)
        out = model.ssl_forward(x)
        logits = model.segment(x, "liver")
        pooled = model.pooled_features(x)
    assert deepest.shape[:2] == (shape[0], 16) and decoded.shape == (shape[0], 4, *shape[2:])
    assert torch.equal(model.encode(x), deepest)
    assert out["reconstruction"].shape == shape and out["rotation"].shape == (shape[0], 4)
    assert "contrastive" not in out
    assert logits.shape == (shape[0], 3, *shape[2:])
    assert pooled.shape == (shape[0], model.feature_dim) and torch.allclose(pooled, out["pooled"])
    # the seg head is a 1x1x1 conv on the decoder features
    assert torch.allclose(logits, model.seg_heads["liver"](decoded), atol=1e-6)
    with pytest.raises(KeyError):
        model.segment(x, "spleen")


STRIDED_UNET = {"channels": [4, 8, 8, 16], "num_res_units": 1, "norm": ["group", {"num_groups": 2}]}


@pytest.mark.parametrize("top", ["per_head", "shared"])
@pytest.mark.parametrize("norm", [["group", {"num_groups": 2}], ["instance", {"affine": True}]])
@pytest.mark.parametrize("shape", [(2, 1, 19, 21, 23), (1, 1, 32, 24, 16)])
def test_strided_unet_shapes(shape: tuple[int, ...], norm: list, top: str) -> None:
    kwargs = {**STRIDED_UNET, "norm": norm, "top": top}
    model = FoundationNet("unet", arch_kwargs=kwargs, ssl={}, heads={"liver": 3}, seed=2).eval()
    assert model.arch_kwargs["strides"] == [2, 2, 2] and model.stride == 8
    # per_head: the heads read the top level's concatenation (2 x channels[0]) at half resolution
    assert (model.feature_dim, model.decoder_dim) == (16, 8 if top == "per_head" else 4)
    x = torch.randn(shape)
    with torch.no_grad():
        deepest, decoded = model.forward_features(x)
        out = model.ssl_forward(x)
        logits = model.segment(x, "liver")
    padded = [-(-n // 8) for n in shape[2:]]  # sides padded up to a multiple of the total stride
    assert deepest.shape == (shape[0], 16, *padded)
    if top == "per_head":
        assert decoded.shape == (shape[0], 8, *(4 * n for n in padded))
    else:
        assert decoded.shape == (shape[0], 4, *shape[2:])
    with torch.no_grad():
        assert torch.equal(model.encode(x), deepest)
    assert out["reconstruction"].shape == shape and out["rotation"].shape == (shape[0], 4)
    assert logits.shape == (shape[0], 3, *shape[2:])
    if all(n % 8 == 0 for n in shape[2:]):
        # the level-by-level pass is MONAI's own forward, nothing replaced; per_head: a plain MONAI UNet
        # whose top up layer is the head computes the head's logits
        plain = copy.deepcopy(model.backbone)
        if top == "per_head":
            plain.model[2] = copy.deepcopy(model.seg_heads["liver"].layer)
        with torch.no_grad():
            assert torch.allclose(logits if top == "per_head" else decoded, plain(x), atol=1e-5)


def test_strided_unet_bad_strides() -> None:
    with pytest.raises(ValueError, match="strides"):
        FoundationNet("unet", arch_kwargs={"channels": [4, 8, 16], "strides": [2]})


def test_swinunetr_shapes_and_state_dict() -> None:
    model = FoundationNet("swinunetr", arch_kwargs=TINY_SWIN, ssl={"contrastive": True}, heads={"t": 2}, seed=0)
    keys = model.state_dict().keys()
    assert not any(k.startswith("backbone.out.") for k in keys)
    assert {"ssl_heads.contrastive.weight", "ssl_heads.rotation.weight", "ssl_heads.reconstruction.weight"} <= set(keys)
    assert model.feature_dim == 192 and model.decoder_dim == 12
    pytest.importorskip("einops", reason="MONAI's SwinUNETR forward needs einops")
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        out = model.eval().ssl_forward(x)
        logits = model.segment(x, "t")
    assert out["reconstruction"].shape == x.shape and out["rotation"].shape == (2, 4)
    assert out["contrastive"].shape == (2, 512) and logits.shape == (2, 2, 32, 32, 32)
    assert model.encode(x).shape == (2, 192, 1, 1, 1)


def test_output_conv_excluded_and_config_json() -> None:
    model = _unet(heads={"a": 2})
    assert not any("final_conv" in k for k in model.state_dict())
    cfg = model.arch_config()
    assert json.loads(json.dumps(cfg)) == cfg
    assert cfg["feature_dim"] == 16 and cfg["has_ssl_heads"] is True and cfg["heads"] == {"a": 2}
    assert cfg["ssl"]["heads"] == ["reconstruction", "rotation"]
    assert FoundationNet("basicunet", arch_kwargs=TINY_UNET).arch_config()["has_ssl_heads"] is False


def test_seeded_init_is_deterministic_and_leaves_global_rng() -> None:
    state = torch.random.get_rng_state()
    a, b = _unet(), _unet()
    assert torch.equal(torch.random.get_rng_state(), state)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    a.add_head("x", 3)
    b.add_head("x", 3)
    b.add_head("y", 3)
    assert torch.equal(a.seg_heads["x"].weight, b.seg_heads["x"].weight)
    assert not torch.equal(b.seg_heads["x"].weight, b.seg_heads["y"].weight)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(a.add_head("z", 2, generator=g1).weight, b.add_head("z", 2, generator=g2).weight)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown arch"):
        FoundationNet("resnet")
    with pytest.raises(ValueError, match="out_channels"):
        FoundationNet("basicunet", arch_kwargs={"out_channels": 3})
    with pytest.raises(ValueError, match="unknown ssl settings"):
        normalise_ssl({"mask_rate": 0.3})
    with pytest.raises(ValueError, match="x and y"):
        normalise_ssl({"patch_size": [32, 16, 32]})
    with pytest.raises(ValueError, match="dots"):
        _unet().add_head("a.b", 2)


def test_config_weight_aliases() -> None:
    cfg = normalise_ssl({"inpaint_weight": 0.0, "rotation_weight": 2.0, "patch_size": [16, 16, 8]})
    assert cfg["weights"] == {"inpaint": 0.0, "rotation": 2.0, "contrastive": 0.0}
    assert cfg["patch_size"] == [16, 16, 8]
    model = FoundationNet("basicunet", arch_kwargs=TINY_UNET, ssl={"inpaint_weight": 0.0, "heads": ["rotation"]})
    assert model.has_ssl_heads  # rotation-only scoring needs only the rotation head


def test_save_load_bit_identical(tmp_path) -> None:
    model = _unet(heads={"liver": 3, "lung": 2})
    with torch.no_grad():  # move away from the seeded init so the test sees real loading
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    prov = {"stage": "test", "seed": 1}
    save_model(model, tmp_path / "m", prov, extra={"preprocessing": {"spacing": [1.0, 1.0, 1.0]}})
    loaded = load_model(tmp_path / "m")
    sa, sb = model.state_dict(), loaded.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["provenance"] == prov and meta["preprocessing"] == {"spacing": [1.0, 1.0, 1.0]}
    assert meta["heads"] == {"liver": 3, "lung": 2} and meta["has_ssl_heads"] is True
    assert read_provenance(tmp_path / "m" / "model.safetensors") == prov
    assert loaded.arch_config() == model.arch_config()
    # a rerun writes the same bytes: model_id is stable
    save_model(loaded, tmp_path / "m2", prov, extra={"preprocessing": {"spacing": [1.0, 1.0, 1.0]}})
    assert model_id(tmp_path / "m") == model_id(tmp_path / "m2") and len(model_id(tmp_path / "m")) == 16
    x = torch.randn(1, 1, 17, 16, 18)
    with torch.no_grad():
        assert torch.equal(model.eval().segment(x, "lung"), loaded.eval().segment(x, "lung"))


def test_load_mismatch_lists_keys(tmp_path) -> None:
    save_model(_unet(heads={"a": 2}), tmp_path / "m", {"stage": "test"})
    weights = tmp_path / "m" / "model.safetensors"
    state = load_safetensors(weights)
    del state["seg_heads.a.bias"]
    state["backbone.extra.weight"] = torch.zeros(1)
    save_safetensors(state, weights)
    with pytest.raises(InputError) as err:
        load_model(tmp_path / "m")
    msg = str(err.value)
    assert str(weights) in msg and "seg_heads.a.bias" in msg and "backbone.extra.weight" in msg
    assert "missing" in msg and "unexpected" in msg
    with pytest.raises(InputError, match="model.json"):
        load_model(tmp_path / "nothing")


def test_unet_decoder_channels_sets_the_head_width_and_defaults_to_the_first_level() -> None:
    """``decoder_channels`` (top shared): the top up layer's output, read by every head; default ``channels[0]``."""
    kwargs = {"channels": [4, 8, 16], "num_res_units": 1, "norm": "instance", "top": "shared"}
    default = FoundationNet("unet", 1, kwargs, ssl=None, heads={"t": 3}, seed=0)
    assert default.decoder_dim == 4 and default.seg_heads["t"].in_channels == 4
    narrow = FoundationNet("unet", 1, {**kwargs, "decoder_channels": 2}, ssl=None, heads={"t": 3}, seed=0)
    assert narrow.decoder_dim == 2 and narrow.seg_heads["t"].in_channels == 2
    x = torch.randn(1, 1, 9, 10, 11)
    assert narrow.segment(x, "t").shape == (1, 3, 9, 10, 11)
    with pytest.raises(ValueError, match="decoder_channels applies to top 'shared'"):
        FoundationNet("unet", 1, {**kwargs, "top": "per_head", "decoder_channels": 2}, ssl=None, seed=0)
    with pytest.raises(ValueError, match="top must be one of"):
        FoundationNet("unet", 1, {**kwargs, "top": "both"}, ssl=None, seed=0)
    with pytest.raises(ValueError, match="decoder_channels"):
        FoundationNet("unet", 1, {**kwargs, "decoder_channels": 0}, ssl=None, seed=0)


def test_per_head_unet_heads_are_seeded_and_group_norm_fits_their_width() -> None:
    """Per-head unet heads: the same seed gives the same head; 4 norm groups shrink to gcd(4, classes)."""
    kwargs = {"channels": [8, 16, 32], "num_res_units": 2, "norm": ["group", {"num_groups": 4}]}
    a = FoundationNet("unet", 1, kwargs, ssl={}, heads={"t": 2, "u": 3}, seed=0)
    b = FoundationNet("unet", 1, kwargs, ssl={}, heads={"t": 2, "u": 3}, seed=0)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert not torch.equal(a.seg_heads["t"].layer[0].conv.weight[:, :2], a.seg_heads["u"].layer[0].conv.weight[:, :2])
    groups = {n: m.num_groups for n, m in a.named_modules() if isinstance(m, torch.nn.GroupNorm)}
    assert groups["seg_heads.t.layer.0.adn.N"] == 2 and groups["seg_heads.u.layer.0.adn.N"] == 1
    assert groups["backbone.model.0.conv.unit0.adn.N"] == 4
    assert a.segment(torch.randn(1, 1, 12, 10, 9), "u").shape == (1, 3, 12, 10, 9)


def test_a_unet_saved_before_top_existed_loads_as_shared(tmp_path) -> None:
    kwargs = {"channels": [4, 8, 16], "num_res_units": 1, "norm": "instance", "top": "shared"}
    model = FoundationNet("unet", 1, kwargs, ssl=None, heads={"t": 2}, seed=0)
    save_model(model, tmp_path / "m", {"stage": "test"})
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    del meta["arch_kwargs"]["top"]
    (tmp_path / "m" / "model.json").write_text(json.dumps(meta))
    loaded = load_model(tmp_path / "m")
    assert not loaded.per_head and loaded.decoder_dim == 4
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
