"""Tests of stages.import_checkpoint on state dicts built here (MONAI SSL layout and plain state dicts)."""

from __future__ import annotations

import json

import pytest
import torch
from monai.networks.nets import BasicUNet
from monai.networks.nets.swin_unetr import SwinTransformer
from safetensors.torch import save_file

from stages.core.errors import InputError, run_cli
from stages.core.nets import FoundationNet, load_model
from stages.import_checkpoint import main, run

TINY_UNET = {"features": [4, 4, 4, 4, 8, 4], "norm": ["group", {"num_groups": 2}]}
TINY_SWIN = {
    "feature_size": 12,
    "depths": [1, 1, 1, 1],
    "window_size": 4,
    "norm_name": ["group", {"num_groups": 4}],
}


def _swin_ssl_state(with_heads: bool, released_names: bool, prefix: str) -> dict[str, torch.Tensor]:
    """A checkpoint shaped like Tang et al.'s SSL weights, from a tiny MONAI SwinTransformer."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vit = SwinTransformer(
            in_chans=1,
            embed_dim=12,
            window_size=(4, 4, 4),
            patch_size=(2, 2, 2),
            depths=(1, 1, 1, 1),
            num_heads=(3, 6, 12, 24),
        )
    g = torch.Generator().manual_seed(1)
    state = {}
    for key, value in vit.state_dict().items():
        if released_names:  # the released file uses timm's fc1/fc2 MLP names
            key = key.replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2.")
        state[prefix + key] = value.clone()
    if with_heads:
        dim = 16 * 12
        head_prefix = "module." if prefix.startswith("module.") else ""
        state[head_prefix + "rotation_head.weight"] = torch.randn(4, dim, generator=g)
        state[head_prefix + "rotation_head.bias"] = torch.randn(4, generator=g)
        state[head_prefix + "contrastive_head.weight"] = torch.randn(64, dim, generator=g)
        state[head_prefix + "contrastive_head.bias"] = torch.randn(64, generator=g)
        state[head_prefix + "conv.0.weight"] = torch.randn(
            dim // 2, dim, 3, 3, 3, generator=g
        )  # SSLHead's image decoder
    return state


def _swin_settings(**extra: object) -> dict[str, object]:
    return {"format": "monai_swin_ssl", "arch": "swinunetr", "arch_kwargs": TINY_SWIN, **extra}


@pytest.mark.parametrize(
    ("prefix", "released_names"), [("module.", True), ("swinViT.", False), ("module.swin_vit.", False)]
)
def test_monai_swin_ssl_with_heads(tmp_path, prefix: str, released_names: bool) -> None:
    state = _swin_ssl_state(with_heads=True, released_names=released_names, prefix=prefix)
    path = tmp_path / "ssl.pt"
    torch.save({"state_dict": state, "epoch": 3}, path)
    run(path, tmp_path / "m", _swin_settings(preprocessing={"spacing": [1.5, 1.5, 2.0]}))
    model = load_model(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    ours = model.state_dict()
    head_prefix = "module." if prefix.startswith("module.") else ""
    assert torch.equal(ours["ssl_heads.rotation.weight"], state[head_prefix + "rotation_head.weight"])
    assert torch.equal(ours["ssl_heads.contrastive.bias"], state[head_prefix + "contrastive_head.bias"])
    qkv = "backbone.swinViT.layers2.0.blocks.0.attn.qkv.weight"
    fc1 = "backbone.swinViT.layers3.0.blocks.0.mlp.linear1.weight"
    src_fc1 = prefix + "layers3.0.blocks.0.mlp." + ("fc1" if released_names else "linear1") + ".weight"
    assert torch.equal(ours[qkv], state[prefix + "layers2.0.blocks.0.attn.qkv.weight"])
    assert torch.equal(ours[fc1], state[src_fc1])
    # the rotation head is there but the inpainting head is not: no usable SSL heads by default
    assert meta["has_ssl_heads"] is False
    assert meta["ssl"]["heads"] == ["rotation", "contrastive"] and meta["ssl"]["head_input"] == "token"
    assert meta["ssl"]["contrastive_dim"] == 64
    assert meta["preprocessing"] == {"spacing": [1.5, 1.5, 2.0]}
    prov = meta["provenance"]
    assert prov["stage"] == "import_checkpoint" and prov["dropped_keys"] == [head_prefix + "conv.0.weight"]
    assert "backbone.decoder1.conv_block.conv1.conv.weight" in prov["initialised_keys"]
    assert not any(k.startswith("backbone.swinViT.") for k in prov["initialised_keys"])
    # rotation-only scoring when the config says so
    run(path, tmp_path / "rot", _swin_settings(ssl={"inpaint_weight": 0.0, "heads": ["rotation"]}))
    meta = json.loads((tmp_path / "rot" / "model.json").read_text())
    assert meta["has_ssl_heads"] is True and meta["ssl"]["heads"] == ["rotation"]


def test_monai_swin_ssl_without_heads_and_deterministic(tmp_path) -> None:
    path = tmp_path / "swin.pth"
    torch.save(_swin_ssl_state(with_heads=False, released_names=True, prefix="module."), path)
    run(path, tmp_path / "a", _swin_settings())
    run(path, tmp_path / "b", _swin_settings())
    meta = json.loads((tmp_path / "a" / "model.json").read_text())
    assert meta["has_ssl_heads"] is False and meta["ssl"]["heads"] == []
    assert not any(k.startswith("ssl_heads.") for k in load_model(tmp_path / "a").state_dict())
    # the seeded initialisation of the decoder makes reruns byte-identical
    for name in ("model.safetensors", "model.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_state_dict_format_plain_monai_basicunet(tmp_path) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        unet = BasicUNet(
            spatial_dims=3,
            in_channels=1,
            out_channels=3,
            features=(4, 4, 4, 4, 8, 4),
            norm=("group", {"num_groups": 2}),
        )
    path = tmp_path / "unet.pt"
    torch.save({"model": {f"module.net.{k}": v for k, v in unet.state_dict().items()}}, path)
    settings = {
        "format": "state_dict",
        "arch": "basicunet",
        "arch_kwargs": TINY_UNET,
        "prefix_map": {"module.net.": "backbone."},
    }
    run(path, tmp_path / "m", settings)
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["has_ssl_heads"] is False and meta["heads"] == {}
    assert meta["provenance"]["dropped_keys"] == ["backbone.final_conv.bias", "backbone.final_conv.weight"]
    ours = load_model(tmp_path / "m").state_dict()
    for key, value in unet.state_dict().items():
        if not key.startswith("final_conv."):
            assert torch.equal(ours["backbone." + key], value)


@pytest.mark.parametrize("top", ["per_head", "shared"])
def test_state_dict_format_plain_monai_strided_unet(tmp_path, top: str) -> None:
    """A plain MONAI UNet: per_head drops its top up layer (each head's own, seeded); shared keeps it."""
    from monai.networks.nets import UNet

    kwargs = {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1, "norm": "instance"}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        unet = UNet(spatial_dims=3, in_channels=1, out_channels=3, **kwargs)
    path = tmp_path / "unet.pt"
    torch.save({f"net.{k}": v for k, v in unet.state_dict().items()}, path)
    arch_kwargs = {**kwargs, "top": top, **({"decoder_channels": 3} if top == "shared" else {})}
    settings = {"format": "state_dict", "arch": "unet", "arch_kwargs": arch_kwargs, "prefix_map": {"net.": "backbone."}}
    run(path, tmp_path / "m", settings)
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    top_layer = sorted(f"backbone.{k}" for k in unet.state_dict() if k.startswith("model.2."))
    assert top_layer and meta["provenance"]["dropped_keys"] == (top_layer if top == "per_head" else [])
    ours = load_model(tmp_path / "m").state_dict()
    for key, value in unet.state_dict().items():
        if top == "shared" or not key.startswith("model.2."):
            assert torch.equal(ours["backbone." + key], value)


def test_state_dict_format_full_model_safetensors(tmp_path) -> None:
    source = FoundationNet("basicunet", arch_kwargs=TINY_UNET, ssl={"patch_size": [16, 16, 16]}, heads={"t": 2}, seed=4)
    path = tmp_path / "full.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    run(
        path,
        tmp_path / "m",
        {
            "format": "state_dict",
            "arch": "basicunet",
            "arch_kwargs": TINY_UNET,
            "ssl": {"patch_size": [16, 16, 16]},
        },
    )
    model = load_model(tmp_path / "m")
    assert model.arch_config()["has_ssl_heads"] is True and model.arch_config()["heads"] == {"t": 2}
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)


def test_mismatch_lists_missing_and_unexpected(tmp_path) -> None:
    state = _swin_ssl_state(with_heads=False, released_names=False, prefix="swinViT.")
    del state["swinViT.layers1.0.blocks.0.attn.proj.weight"]
    state["swinViT.layers9.0.extra"] = torch.zeros(2)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(InputError) as err:
        run(path, tmp_path / "m", _swin_settings())
    msg = str(err.value)
    assert str(path) in msg and "missing keys" in msg and "unexpected keys" in msg
    assert "backbone.swinViT.layers1.0.blocks.0.attn.proj.weight" in msg
    assert "backbone.swinViT.layers9.0.extra" in msg
    assert not (tmp_path / "m").exists()  # validated before writing

    state = _swin_ssl_state(with_heads=False, released_names=False, prefix="swinViT.")
    state["decoder_of_something_else.weight"] = torch.zeros(2)
    torch.save(state, path)
    with pytest.raises(InputError, match="map to nothing.*decoder_of_something_else"):
        run(path, tmp_path / "m", _swin_settings())
    run(path, tmp_path / "m", _swin_settings(drop=["decoder_of_something_else."]))  # unless dropped on purpose

    unet = BasicUNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=2,
        features=(4, 4, 4, 4, 8, 4),
        norm=("group", {"num_groups": 2}),
    )
    torch.save(unet.state_dict(), path)  # plain keys, no prefix_map: nothing matches
    with pytest.raises(InputError, match="missing keys.*unexpected keys"):
        run(path, tmp_path / "u", {"format": "state_dict", "arch": "basicunet", "arch_kwargs": TINY_UNET})


def test_bad_settings_and_cli(tmp_path, capsys) -> None:
    path = tmp_path / "x.pt"
    torch.save(_swin_ssl_state(with_heads=False, released_names=False, prefix=""), path)
    with pytest.raises(InputError, match="format"):
        run(path, tmp_path / "m", {"format": "onnx", "arch": "swinunetr"})
    with pytest.raises(InputError, match="needs arch 'swinunetr'"):
        run(path, tmp_path / "m", {"format": "monai_swin_ssl", "arch": "basicunet"})
    with pytest.raises(InputError, match="unknown keys"):
        run(path, tmp_path / "m", _swin_settings(colour="red"))
    with pytest.raises(InputError, match="not in"):
        run(path, tmp_path / "m", _swin_settings(ssl={"heads": ["rotation"]}))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(
            main,
            [
                "--checkpoint",
                str(tmp_path / "junk.pt"),
                "--out",
                str(tmp_path / "m"),
                "--settings",
                json.dumps(_swin_settings()),
            ],
        )
    assert exit_info.value.code == 2 and "cannot read checkpoint" in capsys.readouterr().err
    main(["--checkpoint", str(path), "--out", str(tmp_path / "cli"), "--settings", json.dumps(_swin_settings())])
    assert (tmp_path / "cli" / "model.safetensors").is_file() and (tmp_path / "cli" / "model.json").is_file()
