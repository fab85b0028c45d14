"""Tests of stages.core.lora: targets, trainable counts, PEFT merge equivalence, adapter round trip."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from stages.core.lora import add_lora, count_trainable, load_adapter, lora_targets, merge_lora, save_adapter
from stages.core.nets import FoundationNet

TINY_UNET = {"features": [4, 4, 4, 4, 4, 4], "norm": ["group", {"num_groups": 2}]}
TINY_SWIN = {
    "feature_size": 12,
    "depths": [1, 1, 1, 1],
    "window_size": 4,
    "norm_name": ["group", {"num_groups": 4}],
}


def _unet() -> FoundationNet:
    return FoundationNet("basicunet", arch_kwargs=TINY_UNET, ssl={}, heads={"old": 2, "new": 3}, seed=1)


STRIDED_UNET = {"channels": [4, 8, 8], "num_res_units": 1, "norm": ["group", {"num_groups": 2}]}


def _strided() -> FoundationNet:
    return FoundationNet("unet", arch_kwargs=STRIDED_UNET, ssl={}, heads={"old": 2, "new": 3}, seed=1)


_BUILD = {"basicunet": lambda: _unet(), "swinunetr": lambda: _swin(), "unet": lambda: _strided()}


def _swin() -> FoundationNet:
    return FoundationNet("swinunetr", arch_kwargs=TINY_SWIN, ssl={}, heads={"old": 2, "new": 3}, seed=1)


def _randomise_lora_b(peft_model: nn.Module, seed: int = 0) -> None:
    """LoRA B starts at zero (no-op adapter); give it values so the merge has something to fold."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def test_targets_basicunet() -> None:
    model = _unet()
    names = lora_targets(model)
    modules = dict(model.named_modules())
    assert len(names) == 18  # 2 per TwoConv: conv_0, down_1..4, upcat_4..1
    assert all(isinstance(modules[n], nn.Conv3d) and modules[n].kernel_size == (3, 3, 3) for n in names)
    assert all(n.startswith("backbone.") for n in names)
    assert not any("upsample" in n for n in names)  # transposed convs are not targets
    assert lora_targets(model, exclude=[r"^backbone\.upcat"]) == [n for n in names if ".upcat_" not in n]
    assert lora_targets(model, include=[r"conv_0\.conv_0"]) == ["backbone.conv_0.conv_0.conv"]


def test_targets_swinunetr() -> None:
    names = lora_targets(_swin())
    assert len(names) == 16  # 4 stages x 1 block x (qkv, proj, linear1, linear2)
    assert {n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in names} == {
        "attn.qkv",
        "attn.proj",
        "mlp.linear1",
        "mlp.linear2",
    }
    assert all(n.startswith("backbone.swinViT.") for n in names)


def test_trainable_counts_hand_computed() -> None:
    # Two 3x3x3 convs: conv_0.conv_0 (1 -> 4) and conv_0.conv_1 (4 -> 4). PEFT's Conv3d LoRA has
    # A: Conv3d(in, r, 3x3x3, no bias) and B: Conv3d(r, out, 1x1x1, no bias): r * (27 * in + out).
    r = 2
    peft_model = add_lora(
        _unet(),
        rank=r,
        alpha=4,
        targets=["backbone.conv_0.conv_0.conv", "backbone.conv_0.conv_1.conv"],
        train_heads=["new"],
    )
    lora = r * (27 * 1 + 4) + r * (27 * 4 + 4)
    head = 4 * 3 + 3  # 1x1x1 Conv3d 4 -> 3 with bias, trained fully
    trainable, total = count_trainable(peft_model)
    assert trainable == lora + head == 301
    base_total = sum(p.numel() for p in _unet().parameters())
    assert total == base_total + lora + head  # PEFT keeps the original head beside its trained copy
    # every other parameter is frozen
    names = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or "seg_heads.new" in n for n in names)


def test_trainable_counts_swin_linear() -> None:
    model = _swin()
    modules = dict(model.named_modules())
    targets = lora_targets(model)
    r = 4
    expected = sum(r * (modules[n].in_features + modules[n].out_features) for n in targets)
    peft_model = add_lora(model, rank=r, alpha=4, train_heads=())
    assert count_trainable(peft_model)[0] == expected
    # stage 1 alone by hand: qkv 12->36, proj 12->12, mlp 12->48 and 48->12
    assert r * ((12 + 36) + (12 + 12) + (12 + 48) + (48 + 12)) == 768
    stage1 = [n for n in targets if ".layers1." in n]
    assert sum(r * (modules[n].in_features + modules[n].out_features) for n in stage1) == 768


def test_targets_strided_unet() -> None:
    model = _strided()
    targets = lora_targets(model)
    modules = dict(model.named_modules())
    assert targets and all(type(modules[n]) is nn.Conv3d and modules[n].kernel_size == (3, 3, 3) for n in targets)
    # every 3x3x3 conv of the backbone is a target; the transposed up-samplers are not (no PEFT LoRA for them)
    convs = [n for n, m in model.backbone.named_modules() if type(m) is nn.Conv3d and m.kernel_size == (3, 3, 3)]
    assert len(targets) == len(convs)
    ups = [n for n, m in model.named_modules() if isinstance(m, nn.ConvTranspose3d)]
    # one inner up layer in the backbone; the top one is each head's own (per_head): the SSL
    # reconstruction head's and the two task heads' — none a target
    assert len(ups) == 4 and sum(n.startswith("backbone.") for n in ups) == 1 and not set(ups) & set(targets)
    peft_model = add_lora(model, rank=2, alpha=2, train_heads=["new"])
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert not any("lora" not in n and "seg_heads" not in n for n in trainable)


@pytest.mark.parametrize("arch", ["basicunet", "swinunetr", "unet"])
def test_merge_equivalence(arch: str) -> None:
    if arch == "swinunetr":
        pytest.importorskip("einops", reason="MONAI's SwinUNETR forward needs einops")
    model = _BUILD[arch]().eval()
    shape = (1, 1, 32, 32, 32) if arch == "swinunetr" else (2, 1, 19, 18, 17)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        base = model.segment(x, "new")
    peft_model = add_lora(model, rank=4, alpha=8, train_heads=["new"]).eval()
    with torch.no_grad():
        assert torch.allclose(peft_model.segment(x, "new"), base, atol=1e-6)  # B = 0: a no-op
        _randomise_lora_b(peft_model)
        adapted = peft_model.segment(x, "new")
        feats = peft_model.encode(x)
    assert (adapted - base).abs().max() > 1e-3
    merged = merge_lora(peft_model)
    assert type(merged) is FoundationNet
    assert not any("lora" in k or "modules_to_save" in k for k in merged.state_dict())
    assert set(merged.state_dict()) == set(_BUILD[arch]().state_dict())
    with torch.no_grad():
        assert torch.allclose(merged.segment(x, "new"), adapted, atol=1e-5)
        assert torch.allclose(merged.encode(x), feats, atol=1e-5)


def test_adapter_round_trip(tmp_path) -> None:
    x = torch.randn(1, 1, 16, 17, 18)
    peft_model = add_lora(_unet(), rank=2, alpha=2, train_heads=["new"]).eval()
    _randomise_lora_b(peft_model, seed=3)
    with torch.no_grad():
        peft_model.base_model.model.seg_heads["new"].modules_to_save["default"].weight.mul_(2.0)
        expected = peft_model.segment(x, "new")
    save_adapter(peft_model, tmp_path / "ad", provenance={"stage": "test"})
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["target_modules"] == lora_targets(_unet())
    assert cfg["modules_to_save"] == ["seg_heads.new"]
    assert (tmp_path / "ad" / "adapter_model.safetensors").is_file()
    reloaded = load_adapter(_unet(), tmp_path / "ad").eval()
    with torch.no_grad():
        assert torch.equal(reloaded.segment(x, "new"), expected)
    # saving twice gives the same bytes (no timestamps, sorted keys)
    save_adapter(reloaded, tmp_path / "ad2", provenance={"stage": "test"})
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "ad" / name).read_bytes() == (tmp_path / "ad2" / name).read_bytes()


def test_bad_arguments(tmp_path) -> None:
    with pytest.raises(ValueError, match="not in the model"):
        add_lora(_unet(), targets=["backbone.nope"])
    with pytest.raises(ValueError, match="no segmentation heads"):
        add_lora(_unet(), train_heads=["absent"])
    with pytest.raises(ValueError, match="rank"):
        add_lora(_unet(), rank=0)
    from stages.core.errors import InputError

    with pytest.raises(InputError, match="adapter_config.json"):
        load_adapter(_unet(), tmp_path)


def test_lora_initialisation_is_seeded() -> None:
    """PEFT draws LoRA A from torch's global generator: add_lora seeds it, so reruns train identically."""
    import torch

    from stages.core.lora import add_lora
    from stages.core.nets import FoundationNet

    def adapters(seed: int, noise: int) -> dict[str, torch.Tensor]:
        torch.rand(noise)  # whatever happened to the global generator before must not matter
        model = FoundationNet("basicunet", 1, {"features": [4, 4, 8, 8, 16, 4]}, seed=0)
        model.add_head("t", 2)
        return {k: v for k, v in add_lora(model, seed=seed).state_dict().items() if "lora_A" in k}

    a, b, c = adapters(0, 1), adapters(0, 7), adapters(1, 1)
    assert a and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def _perturbed(model: FoundationNet, seed: int, scale: float = 0.05) -> FoundationNet:
    """A 'teacher': a copy of ``model`` with every parameter moved by seeded noise."""
    import copy

    teacher = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return teacher


@pytest.mark.parametrize("arch", ["basicunet", "swinunetr"])
def test_teacher_svd_full_rank_merges_to_the_teacher(arch: str) -> None:
    """r = full rank: the merged student equals the teacher on every LoRA-targeted layer (to 1e-5)."""
    import copy

    from stages.core.lora import teacher_svd_init

    start = _unet() if arch == "basicunet" else _swin()
    teacher = _perturbed(start, seed=4)
    modules = dict(start.named_modules())
    targets = lora_targets(start)
    full = max(min(modules[n].weight.shape[0], modules[n].weight[0].numel()) for n in targets)
    peft_model = add_lora(copy.deepcopy(start), rank=full, alpha=3, train_heads=["new"])
    errors = teacher_svd_init(peft_model, start, teacher)
    assert set(errors) == set(targets) and max(errors.values()) < 1e-6
    merged = dict(merge_lora(peft_model).named_modules())
    teacher_modules = dict(teacher.named_modules())
    for name in targets:
        assert torch.allclose(merged[name].weight, teacher_modules[name].weight, atol=1e-5), name
    # what LoRA does not adapt (biases, norms, the other layers) stays at the start model's values
    for name in targets:
        if modules[name].bias is not None:
            assert torch.equal(merged[name].bias, modules[name].bias), name


def test_teacher_svd_small_rank_is_the_truncated_svd() -> None:
    import copy

    from stages.core.lora import teacher_svd_init

    start = _unet()
    teacher = _perturbed(start, seed=5)
    r, alpha = 2, 4
    peft_model = add_lora(copy.deepcopy(start), rank=r, alpha=alpha, train_heads=["new"])
    errors = teacher_svd_init(peft_model, start, teacher)
    merged = dict(merge_lora(peft_model).named_modules())
    s_mod, t_mod = dict(start.named_modules()), dict(teacher.named_modules())
    for name in lora_targets(start):
        w0 = s_mod[name].weight.double()
        delta = (t_mod[name].weight.double() - w0).reshape(w0.shape[0], -1)
        u, sv, vh = torch.linalg.svd(delta, full_matrices=False)
        expected = w0 + ((u[:, :r] * sv[:r]) @ vh[:r]).reshape(w0.shape)
        assert torch.allclose(merged[name].weight.double(), expected, atol=1e-5), name
        assert 0 < errors[name] < 1  # a rank-2 cut of a random 4x(4*27) change loses something


def test_param_groups_and_norms_and_biases_round_trip(tmp_path) -> None:
    """train_norms / train_biases: trainable, in the right optimiser group, saved, reloaded and merged."""
    from stages.core.lora import lora_param_groups, norm_modules

    x = torch.randn(1, 1, 16, 17, 18, generator=torch.Generator().manual_seed(2))
    norms = norm_modules(_unet())
    assert norms and all(isinstance(dict(_unet().named_modules())[n], nn.GroupNorm) for n in norms)
    peft_model = add_lora(_unet(), rank=2, alpha=2, train_heads=["new"], train_norms=True, train_biases=True)
    groups = lora_param_groups(peft_model, lr=1e-3, lora_lr=1e-2)
    assert [g["name"] for g in groups] == ["lora", "full"] and [g["lr"] for g in groups] == [1e-2, 1e-3]
    named = {id(p): n for n, p in peft_model.named_parameters()}
    assert all("lora_" in named[id(p)] for p in groups[0]["params"])
    rest = {named[id(p)] for p in groups[1]["params"]}
    assert any(".adn.N." in n for n in rest) and any(n.endswith(".conv.base_layer.bias") for n in rest)
    assert any("seg_heads.new" in n for n in rest)
    # move everything trainable, then save, reload and merge: the same outputs all the way
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model.segment(x, "new")
    save_adapter(peft_model, tmp_path / "ad")
    reloaded = load_adapter(_unet(), tmp_path / "ad").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded.segment(x, "new"), expected, atol=1e-6)
        merged = merge_lora(reloaded).eval()
        assert torch.allclose(merged.segment(x, "new"), expected, atol=1e-5)


@pytest.mark.parametrize("arch", ["basicunet", "swinunetr", "unet"])
@pytest.mark.parametrize("extra", [{}, {"train_norms": True}, {"train_biases": True}])
def test_merge_without_peft_is_bit_identical_to_peft(arch: str, extra: dict, tmp_path) -> None:
    """The merge stage's PEFT-free fold of an adapter folder equals PEFT's merge_and_unload bit for bit."""
    from stages.core.lora import merge_adapter_folder

    peft_model = add_lora(_BUILD[arch](), rank=4, alpha=8, train_heads=["new"], **extra)
    _randomise_lora_b(peft_model)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():  # move what trains besides LoRA (head, norms, biases) so copying them matters
        for name, p in peft_model.named_parameters():
            if p.requires_grad and "lora_" not in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    save_adapter(peft_model, tmp_path / "ad")
    expected = merge_lora(load_adapter(_BUILD[arch](), tmp_path / "ad")).state_dict()
    ours = merge_adapter_folder(_BUILD[arch](), tmp_path / "ad")
    assert type(ours) is FoundationNet and all(p.requires_grad for p in ours.parameters())
    got = ours.state_dict()
    assert set(got) == set(expected)
    changed = [k for k in got if not torch.equal(got[k], _BUILD[arch]().state_dict()[k])]
    assert any("seg_heads.new" in k for k in changed) and any(k.startswith("backbone.") for k in changed)
    assert [k for k in got if not torch.equal(got[k], expected[k])] == []


def test_merge_without_peft_refuses_what_it_cannot_fold(tmp_path) -> None:
    from stages.core.errors import InputError
    from stages.core.lora import merge_adapter_folder

    save_adapter(add_lora(_strided(), rank=2, alpha=2, train_heads=["new"]), tmp_path / "ad")
    cfg_path = tmp_path / "ad" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(InputError, match="use_dora"):
        merge_adapter_folder(_strided(), tmp_path / "ad")
    cfg_path.write_text(json.dumps({**cfg, "target_modules": [*cfg["target_modules"], "backbone.nope"]}))
    with pytest.raises(InputError, match="not in the base model"):
        merge_adapter_folder(_strided(), tmp_path / "ad")
    cfg_path.write_text(json.dumps(cfg))
    other = FoundationNet(
        "unet", arch_kwargs={**STRIDED_UNET, "channels": [4, 8, 16]}, ssl={}, heads={"old": 2, "new": 3}
    )
    with pytest.raises(InputError, match="adapter_model.safetensors"):
        merge_adapter_folder(other, tmp_path / "ad")
