"""MONAI 3D backbones wrapped with self-supervised heads and per-task segmentation heads, and model folders.

The foundation model M0 of ``methods.md`` §0 is a MONAI encoder–decoder (``BasicUNet`` as the small CPU
demo, ``SwinUNETR`` by default in real use) that carries its self-supervised heads, so that MDS and DKD
can evaluate M0's own SSL loss. The MONAI modules are used unchanged (``self.backbone``); this module only
walks their submodules to expose the deepest encoder features and the last decoder features.

A model folder holds ``model.safetensors`` (every parameter and buffer: ``backbone.*``, ``ssl_heads.*``,
``seg_heads.{task}.*``) and ``model.json`` (:meth:`FoundationNet.arch_config` + ``provenance`` + extras
such as ``preprocessing``).
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stages.core.errors import InputError
from stages.core.io import load_safetensors, read_json, save_json, save_safetensors, sha256_file

__all__ = [
    "ARCHS",
    "DEFAULT_ARCH_KWARGS",
    "DEFAULT_SSL",
    "SSL_HEAD_NAMES",
    "MODEL_JSON",
    "MODEL_WEIGHTS",
    "FoundationNet",
    "check_state_dict",
    "load_model",
    "model_id",
    "normalise_ssl",
    "read_model_json",
    "save_model",
    "seed_from",
]

ARCHS = ("basicunet", "swinunetr", "unet")
UNET_TOPS = ("per_head", "shared")

#: Defaults merged under the ``arch_kwargs`` a caller gives. BasicUNet: a small CPU demo (ours). Group
#: norm rather than MONAI's default instance norm, because instance norm fixes every channel's spatial
#: mean, which would make the globally pooled deepest features (rotation head, feature fallback,
#: diversity) nearly uninformative, and fails outright on a 1-voxel bottleneck (patches < 32).
#: SwinUNETR keeps MONAI's defaults (instance norm, window 7): its bottleneck is patch / 32, so instance
#: norm needs patches of 64 or more; for 32^3 patches set ``norm_name`` (e.g. ``["group", {"num_groups":
#: 4}]``), and a small ``window_size`` (e.g. 4) is much faster on CPU.
DEFAULT_ARCH_KWARGS: dict[str, dict[str, Any]] = {
    "basicunet": {"features": [8, 8, 16, 32, 64, 8], "norm": ["group", {"num_groups": 4}]},
    "swinunetr": {"feature_size": 24},
    # MONAI's strided UNet (Kerfoot et al., 2018): one strided conv + residual units per level, about a
    # tenth of BasicUNet's cost per voxel. Group norm for the same reason as BasicUNet's; ``["instance",
    # {"affine": true}]`` (MONAI's default is non-affine instance norm) is the other supported choice.
    # ``top`` (ours): where the task heads sit. ``per_head`` (the default): MONAI's top up layer
    # (transposed conv + residual unit, full resolution) is each head's own, reading the top level's
    # concatenated half-resolution features (2 x channels[0]); a training step then costs what a plain
    # MONAI UNet's does (0.68 s against 0.66 s at batch 8 x 40x56x40, one thread, one head; 16 shared
    # channels: 1.43 s). ``shared``: the top up layer writes ``decoder_channels`` (default channels[0])
    # full-resolution features that 1x1x1 heads read, as a plain MONAI UNet checkpoint has it. 16 shared
    # channels made a step 2.2x a plain UNet's, 4 about 1.4x, but 4 starved multi-task FT (training loss
    # 0.51 against 0.31 at 120 steps; test Dice 0.59 / 0.55 against 0.85 / 0.83 single-task).
    "unet": {
        "channels": [16, 32, 64, 128],
        "strides": [2, 2, 2],
        "num_res_units": 2,
        "norm": ["group", {"num_groups": 4}],
        "top": "per_head",
    },
}

#: Names of the SSL heads and the loss term each serves (Tang et al., CVPR 2022: inpainting, rotation,
#: contrastive).
SSL_HEAD_NAMES = ("reconstruction", "rotation", "contrastive")
_TERM_OF_HEAD = {"reconstruction": "inpaint", "rotation": "rotation", "contrastive": "contrastive"}

#: SSL settings (ours where ``methods.md`` says so); every key is overridable from the config.
DEFAULT_SSL: dict[str, Any] = {
    "patch_size": [32, 32, 32],  # views' crop size; x and y sides must be equal (rotation plane)
    "mask_ratio": 0.3,  # fraction of the patch hidden by the inpainting mask
    "mask_patch": 8,  # side of the masked cubes, voxels
    "mask_fill": "zero",  # "zero" | "noise" (standard normal) for the masked voxels
    "contrastive": False,  # build the contrastive projection head
    "contrastive_dim": 512,  # projection size (Tang et al. use 512)
    "weights": None,  # loss weights {inpaint, rotation, contrastive}; None -> 1, 1, (1 if contrastive else 0)
    "heads": None,  # which heads exist; None -> reconstruction, rotation (+ contrastive)
    "head_input": "mean",  # "mean": heads read the pooled deepest features; "token": Tang et al.'s
    #                        token 0 (rotation) / token 1 (contrastive) of the flattened deepest map
}


def seed_from(*parts: object) -> int:
    """A 63-bit seed from the SHA-256 of the parts' text, so that it does not depend on call order.

    Args:
        parts: anything with a stable ``str`` (seed, case id, task name ...).
    """
    text = "\0".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") & ((1 << 63) - 1)


def normalise_ssl(ssl: Mapping[str, Any] | None, build_heads: bool = True) -> dict[str, Any]:
    """Complete SSL settings with :data:`DEFAULT_SSL` and check them.

    Args:
        ssl: the settings given (``None``: defaults; with ``build_heads=False`` no head at all);
            ``inpaint_weight`` / ``rotation_weight`` / ``contrastive_weight`` are accepted for ``weights``.
        build_heads: whether the default head list applies when ``ssl`` names none.

    Raises:
        ValueError: unknown keys, bad patch size, ratio out of range, unknown head names.
    """
    given = dict(ssl or {})
    # The config's flat spelling ``inpaint_weight`` etc. folds into ``weights``.
    aliases = {f"{term}_weight": term for term in ("inpaint", "rotation", "contrastive")}
    flat = {aliases[k]: given.pop(k) for k in list(given) if k in aliases}
    if flat:
        given["weights"] = {**flat, **dict(given.get("weights") or {})}
    unknown = sorted(set(given) - set(DEFAULT_SSL))
    if unknown:
        known = sorted(set(DEFAULT_SSL) | set(aliases))
        raise ValueError(f"unknown ssl settings {unknown}; known: {known}")
    cfg = {**copy.deepcopy(DEFAULT_SSL), **copy.deepcopy(given)}
    patch = cfg["patch_size"]
    patch = [int(patch)] * 3 if isinstance(patch, (int, float)) else [int(p) for p in patch]
    if len(patch) != 3 or min(patch) < 1:
        raise ValueError(f"ssl patch_size must be 3 positive ints, got {cfg['patch_size']}")
    if patch[0] != patch[1]:
        raise ValueError(f"ssl patch_size x and y sides must be equal (rotation plane), got {patch}")
    cfg["patch_size"] = patch
    cfg["mask_ratio"] = float(cfg["mask_ratio"])
    if not 0.0 <= cfg["mask_ratio"] <= 1.0:
        raise ValueError(f"ssl mask_ratio must be in [0, 1], got {cfg['mask_ratio']}")
    cfg["mask_patch"] = int(cfg["mask_patch"])
    if cfg["mask_patch"] < 1:
        raise ValueError(f"ssl mask_patch must be >= 1, got {cfg['mask_patch']}")
    if cfg["mask_fill"] not in ("zero", "noise"):
        raise ValueError(f"ssl mask_fill must be 'zero' or 'noise', got {cfg['mask_fill']!r}")
    if cfg["head_input"] not in ("mean", "token"):
        raise ValueError(f"ssl head_input must be 'mean' or 'token', got {cfg['head_input']!r}")
    if cfg["heads"] is None:
        heads = ["reconstruction", "rotation"] + (["contrastive"] if cfg["contrastive"] else [])
        cfg["heads"] = heads if build_heads else []
    bad = sorted(set(cfg["heads"]) - set(SSL_HEAD_NAMES))
    if bad:
        raise ValueError(f"unknown ssl heads {bad}; known: {list(SSL_HEAD_NAMES)}")
    cfg["heads"] = [h for h in SSL_HEAD_NAMES if h in cfg["heads"]]
    cfg["contrastive"] = "contrastive" in cfg["heads"]
    cfg["contrastive_dim"] = int(cfg["contrastive_dim"])
    weights = {"inpaint": 1.0, "rotation": 1.0, "contrastive": 1.0 if cfg["contrastive"] else 0.0}
    given_w = dict(cfg["weights"] or {})
    bad_w = sorted(set(given_w) - set(weights))
    if bad_w:
        raise ValueError(f"unknown ssl loss weights {bad_w}; known: {sorted(weights)}")
    weights.update({k: float(v) for k, v in given_w.items()})
    cfg["weights"] = weights
    return cfg


def _jsonable(obj: Any) -> Any:
    """Tuples to lists (recursively), so a config round-trips through JSON unchanged."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _monai_args(obj: Any) -> Any:
    """Lists back to tuples for MONAI's ``("name", {args})`` layer specs and feature sequences."""
    if isinstance(obj, Mapping):
        return {k: _monai_args(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return tuple(_monai_args(v) for v in obj)
    return obj


def _init_conv_(module: nn.Conv3d | nn.Linear, generator: torch.Generator) -> None:
    """PyTorch's default layer init (Kaiming-uniform, a = sqrt(5)) drawn from an explicit generator."""
    nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
    if module.bias is not None:
        fan_in = module.weight[0].numel()
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        nn.init.uniform_(module.bias, -bound, bound, generator=generator)


def _is_unet_level(block: nn.Module) -> bool:
    """True for one level of MONAI's UNet, ``Sequential(down, SkipConnection(inner), up)``; False at the bottom."""
    from monai.networks.layers import SkipConnection

    return isinstance(block, nn.Sequential) and len(block) == 3 and isinstance(block[1], SkipConnection)


def _unet_levels(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MONAI UNet's forward pass, level by level: (bottom layer's output, this level's output).

    The same operations as ``block(x)`` (``SkipConnection`` concatenates input and inner output on the
    channels, ``mode="cat"``), but also returning the deepest features.
    """
    if not _is_unet_level(block):
        y = block(x)
        return y, y
    if block[1].mode != "cat":
        raise ValueError(f"unet skip connections must concatenate, got mode {block[1].mode!r}")
    down = block[0](x)
    deepest, inner = _unet_levels(block[1].submodule, down)
    return deepest, block[2](torch.cat([down, inner], dim=block[1].dim))


def _crop(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The first ``size`` voxels of each spatial side (undoes :func:`_pad_to`)."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    return x[(..., *(slice(0, int(n)) for n in size))]


class UpHead(nn.Module):
    """A per-head unet's task (or reconstruction) head: MONAI UNet's top up layer, ``out_channels`` outputs."""

    def __init__(self, layer: nn.Module, out_channels: int) -> None:
        super().__init__()
        self.layer = layer
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _pad_to(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the spatial sides at their ends up to a multiple of ``multiple`` (a strided UNet needs it)."""
    pad = [(-n) % multiple for n in x.shape[2:]]
    if not any(pad):
        return x
    return nn.functional.pad(x, [p for side in reversed(pad) for p in (0, side)])


class FoundationNet(nn.Module):
    """A MONAI encoder–decoder with SSL heads (``ssl_heads``) and per-task segmentation heads (``seg_heads``).

    The backbone's own output convolution (``BasicUNet.final_conv``, ``SwinUNETR.out``) is replaced by
    ``nn.Identity`` so that it is neither computed nor in the state dict: each task's 1x1x1 head in
    ``seg_heads`` takes its place.

    MONAI's strided ``UNet`` (``arch="unet"``): with ``arch_kwargs.top: per_head`` (the default) its top
    up layer is removed from the backbone and each head (task or reconstruction) is its own copy of it,
    reading the top level's half-resolution features; with ``top: shared`` it keeps its whole network,
    its ``out_channels`` is ``decoder_channels`` (default ``channels[0]``), and those full-resolution
    features are what 1x1x1 heads read. Its input is zero-padded at the end of each side to a multiple
    of the total stride and the heads' output cropped back (:meth:`head_logits`), so any size runs.

    Deepest features: BasicUNet ``down_4``; UNet the bottom layer; SwinUNETR the last (normalised) Swin stage,
    ``swinViT(x)[4]``, the feature space its self-supervised heads were trained on (Tang et al.).
    Decoder features: BasicUNet ``upcat_1``; UNet the top level's concatenation (per_head, half resolution
    and padded) or its up layer (shared); SwinUNETR ``decoder1``.

    Args:
        arch: "basicunet", "unet" or "swinunetr".
        in_channels: image channels.
        arch_kwargs: keyword arguments of the MONAI constructor, merged over
            :data:`DEFAULT_ARCH_KWARGS` (``spatial_dims``, ``in_channels`` and ``out_channels`` are set here);
            a key whose value is None is dropped.
        ssl: SSL settings (see :data:`DEFAULT_SSL`); ``None`` builds no SSL head.
        heads: ``{task: num_classes}`` segmentation heads to create (seeded from the task name).
        seed: if given, every initial weight comes from this seed (the global RNG is left untouched).
    """

    def __init__(
        self,
        arch: str,
        in_channels: int = 1,
        arch_kwargs: dict[str, Any] | None = None,
        ssl: dict[str, Any] | None = None,
        heads: dict[str, int] | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; known: {list(ARCHS)}")
        self.arch = arch
        self.in_channels = int(in_channels)
        kwargs = {**copy.deepcopy(DEFAULT_ARCH_KWARGS[arch]), **copy.deepcopy(arch_kwargs or {})}
        # a null value removes the key (a config layered over another one can drop the other arch's keys)
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        if arch == "unet" and "channels" in (arch_kwargs or {}) and "strides" not in (arch_kwargs or {}):
            kwargs["strides"] = [2] * (len(kwargs["channels"]) - 1)  # one halving per level by default
        for reserved in ("spatial_dims", "in_channels", "out_channels", "img_size"):
            if reserved in kwargs:
                raise ValueError(f"arch_kwargs must not set {reserved!r} (FoundationNet sets it)")
        self.arch_kwargs: dict[str, Any] = _jsonable(kwargs)
        self.ssl_config = normalise_ssl(ssl, build_heads=ssl is not None)
        if seed is None:
            self._build(heads or {})
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self._build(heads or {})

    def _build(self, heads: Mapping[str, int]) -> None:
        from monai.networks.nets import BasicUNet, SwinUNETR

        kwargs = _monai_args(self.arch_kwargs)
        if self.arch == "basicunet":
            self.backbone = BasicUNet(spatial_dims=3, in_channels=self.in_channels, out_channels=1, **kwargs)
            self.backbone.final_conv = nn.Identity()
            features = tuple(kwargs["features"]) if "features" in kwargs else (32, 32, 64, 128, 256, 32)
            self.feature_dim = int(features[4])
            self.decoder_dim = int(features[5])
        elif self.arch == "unet":
            from monai.networks.nets import UNet

            channels = tuple(int(c) for c in kwargs.pop("channels"))
            top = kwargs.pop("top", "per_head")
            if top not in UNET_TOPS:
                raise ValueError(f"unet top must be one of {list(UNET_TOPS)}, got {top!r}")
            if top == "per_head" and "decoder_channels" in kwargs:
                raise ValueError(
                    "unet decoder_channels applies to top 'shared' only (per_head heads read 2 x channels[0])"
                )
            decoder = int(kwargs.pop("decoder_channels", channels[0]))
            if decoder < 1:
                raise ValueError(f"unet decoder_channels must be >= 1, got {decoder}")
            strides = tuple(int(s) for s in kwargs.pop("strides"))
            if len(channels) < 2 or len(strides) != len(channels) - 1:
                raise ValueError(
                    f"unet needs >= 2 channels and len(strides) = len(channels) - 1, got {channels}, {strides}"
                )
            # The top level's up layer writes ``decoder_channels`` features (its last conv is linear, as in
            # MONAI's UNet); the task heads sit on them, so nothing of MONAI's network is replaced.
            self.backbone = UNet(
                spatial_dims=3,
                in_channels=self.in_channels,
                out_channels=decoder,
                channels=channels,
                strides=strides,
                **kwargs,
            )
            self.stride = math.prod(strides)
            self.feature_dim = int(channels[-1])
            self.decoder_dim = decoder
            self.per_head = top == "per_head"
            if self.per_head:
                # the top up layer becomes each head's own; the backbone ends with the top level's
                # concatenation (its down-sampled input and the inner levels' output) at half resolution
                self.backbone.model[2] = nn.Identity()
                self.decoder_dim = channels[0] * 2 if len(channels) > 2 else channels[0] + channels[1]
        else:
            self.backbone = SwinUNETR(in_channels=self.in_channels, out_channels=1, spatial_dims=3, **kwargs)
            self.backbone.out = nn.Identity()
            size = int(kwargs.get("feature_size", 24))
            self.feature_dim = 16 * size
            self.decoder_dim = size
        self.ssl_heads = nn.ModuleDict()
        for name in self.ssl_config["heads"]:
            if name == "reconstruction":
                self.ssl_heads[name] = (
                    self._up_head(self.in_channels)
                    if self.per_head
                    else nn.Conv3d(self.decoder_dim, self.in_channels, kernel_size=1)
                )
            elif name == "rotation":
                self.ssl_heads[name] = nn.Linear(self.feature_dim, 4)
            else:
                self.ssl_heads[name] = nn.Linear(self.feature_dim, self.ssl_config["contrastive_dim"])
        self.seg_heads = nn.ModuleDict()
        for task, num_classes in heads.items():
            self.add_head(task, num_classes)

    # ---- heads -------------------------------------------------------------------------------------
    per_head = False  # a unet whose top up layer is each head's own (``arch_kwargs.top: per_head``)

    def _up_head(self, out_channels: int) -> UpHead:
        """MONAI UNet's top up layer writing ``out_channels``, on the half-resolution decoder features.

        Built by MONAI's own ``UNet._get_up_layer``, so it is exactly a plain UNet's last layer; only a
        group norm is given ``gcd(num_groups, out_channels)`` groups (4 groups cannot split 2 channels).
        Initialised from the global RNG (callers fork and seed it).
        """
        net = self.backbone
        norm = net.norm
        name, args = (norm, {}) if isinstance(norm, str) else (norm[0], dict(norm[1]))
        if str(name).lower() == "group":
            args["num_groups"] = math.gcd(int(args.get("num_groups", 1)), int(out_channels))
            net.norm = (name, args)
        try:
            layer = net._get_up_layer(self.decoder_dim, int(out_channels), net.strides[0], True)
        finally:
            net.norm = norm
        return UpHead(layer, int(out_channels))

    def add_head(
        self, task: str, num_classes: int, generator: torch.Generator | None = None, seed: int | None = None
    ) -> nn.Module:
        """Add a task's segmentation head on the decoder features, deterministically initialised.

        A 1x1x1 convolution, or for ``arch_kwargs.top: per_head`` (unet) MONAI's top up layer (see
        :meth:`_up_head`).

        Args:
            task: task name (a ``seg_heads`` key; no dots).
            num_classes: output channels, background included.
            generator: draws the initial weights; else ``seed``; else a seed from the task name.
            seed: seed of a fresh generator when ``generator`` is None.
        """
        if not task or "." in task:
            raise ValueError(f"task name must be non-empty without dots, got {task!r}")
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if generator is None:
            generator = torch.Generator().manual_seed(seed if seed is not None else seed_from("seg_head", task))
        ref = next(self.backbone.parameters())
        head: nn.Module
        if self.per_head:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
                head = self._up_head(int(num_classes))
        else:
            head = nn.Conv3d(self.decoder_dim, int(num_classes), kernel_size=1)
            with torch.no_grad():
                _init_conv_(head, generator)
        self.seg_heads[task] = head.to(device=ref.device, dtype=ref.dtype)
        return self.seg_heads[task]

    @property
    def has_ssl_heads(self) -> bool:
        """True when every SSL loss term with a non-zero weight has its head (else: feature fallback)."""
        w = self.ssl_config["weights"]
        needed = [h for h, term in _TERM_OF_HEAD.items() if w.get(term, 0.0) > 0 and h != "contrastive"]
        return bool(needed) and all(h in self.ssl_heads for h in needed)

    # ---- forward passes ----------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Deepest encoder feature map, (B, feature_dim, *spatial / 16, 32 or the UNet's total stride); the decoder is not run."""
        b = self.backbone
        if self.arch == "basicunet":
            return b.down_4(b.down_3(b.down_2(b.down_1(b.conv_0(x)))))
        if self.arch == "unet":
            block = b.model
            x = _pad_to(x, self.stride)
            while _is_unet_level(block):
                x = block[0](x)
                block = block[1].submodule
            return block(x)
        b._check_input_size(x.shape[2:])
        return b.swinViT(x, b.normalize)[4]

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Deepest encoder features and final decoder features (before any output conv), in one pass."""
        b = self.backbone
        if self.arch == "basicunet":
            x0 = b.conv_0(x)
            x1 = b.down_1(x0)
            x2 = b.down_2(x1)
            x3 = b.down_3(x2)
            x4 = b.down_4(x3)
            u4 = b.upcat_4(x4, x3)
            u3 = b.upcat_3(u4, x2)
            u2 = b.upcat_2(u3, x1)
            return x4, b.upcat_1(u2, x0)
        if self.arch == "unet":
            deepest, decoded = _unet_levels(b.model, _pad_to(x, self.stride))
            if self.per_head:  # half resolution, padded: the heads crop (head_logits)
                return deepest, decoded
            return deepest, _crop(decoded, x.shape[2:])
        b._check_input_size(x.shape[2:])
        hidden = b.swinViT(x, b.normalize)
        enc0 = b.encoder1(x)
        enc1 = b.encoder2(hidden[0])
        enc2 = b.encoder3(hidden[1])
        enc3 = b.encoder4(hidden[2])
        dec4 = b.encoder10(hidden[4])
        dec3 = b.decoder5(dec4, hidden[3])
        dec2 = b.decoder4(dec3, enc3)
        dec1 = b.decoder3(dec2, enc2)
        dec0 = b.decoder2(dec1, enc1)
        return hidden[4], b.decoder1(dec0, enc0)

    def decode_features(self, x: torch.Tensor) -> torch.Tensor:
        """Final decoder feature map (B, decoder_dim, *spatial)."""
        return self.forward_features(x)[1]

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        """Global average of the deepest features, (B, feature_dim)."""
        return self.encode(x).mean(dim=(2, 3, 4))

    def head_logits(self, task: str, decoded: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """``task``'s head on decoder features of an input of spatial ``size``: (B, num_classes, *size).

        Per-head unet features are half-resolution and padded (see :meth:`forward_features`): the head
        doubles them and the result is cropped back to ``size``; elsewhere the crop does nothing.
        """
        return _crop(self.seg_heads[task](decoded), size)

    def segment(self, x: torch.Tensor, task: str) -> torch.Tensor:
        """Segmentation logits (B, num_classes, *spatial) of ``task``'s head."""
        if task not in self.seg_heads:
            raise KeyError(f"no segmentation head {task!r}; heads: {sorted(self.seg_heads)}")
        return self.head_logits(task, self.decode_features(x), x.shape[2:])

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        """Same as :meth:`segment` (so PEFT wrappers and MONAI inferers can call the module)."""
        return self.segment(x, task)

    def _head_input(self, deepest: torch.Tensor, token: int) -> torch.Tensor:
        if self.ssl_config["head_input"] == "token":
            # Tang et al.'s SSLHead reads single tokens of the flattened bottleneck.
            return deepest.flatten(2)[:, :, token]
        return deepest.mean(dim=(2, 3, 4))

    def ssl_forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Outputs of the SSL heads: reconstruction (B, C, *spatial), rotation (B, 4)[, contrastive (B, D)].

        Also returns ``pooled`` (B, feature_dim), the pooled deepest features, for free.
        """
        if not self.ssl_heads:
            raise RuntimeError("this model has no SSL heads (use the feature-distance fallback)")
        deepest, decoded = self.forward_features(x)
        out: dict[str, torch.Tensor] = {"pooled": deepest.mean(dim=(2, 3, 4))}
        if "reconstruction" in self.ssl_heads:
            out["reconstruction"] = _crop(self.ssl_heads["reconstruction"](decoded), x.shape[2:])
        if "rotation" in self.ssl_heads:
            out["rotation"] = self.ssl_heads["rotation"](self._head_input(deepest, 0))
        if "contrastive" in self.ssl_heads:
            out["contrastive"] = self.ssl_heads["contrastive"](self._head_input(deepest, 1))
        return out

    # ---- description -------------------------------------------------------------------------------
    def arch_config(self) -> dict[str, Any]:
        """JSON-serialisable description from which :func:`load_model` rebuilds this network."""
        return {
            "arch": self.arch,
            "in_channels": self.in_channels,
            "arch_kwargs": copy.deepcopy(self.arch_kwargs),
            "ssl": copy.deepcopy(self.ssl_config),
            "heads": {task: int(head.out_channels) for task, head in self.seg_heads.items()},
            "feature_dim": self.feature_dim,
            "decoder_dim": self.decoder_dim,
            "has_ssl_heads": self.has_ssl_heads,
        }


MODEL_WEIGHTS = "model.safetensors"
MODEL_JSON = "model.json"


def save_model(
    model: FoundationNet, folder: Path, provenance: Mapping[str, Any], extra: Mapping[str, Any] | None = None
) -> None:
    """Write ``folder/model.safetensors`` (all parameters and buffers) and ``folder/model.json``.

    Args:
        model: the network (not a PEFT wrapper: merge or unload first).
        folder: destination folder (created).
        provenance: from :func:`stages.core.io.make_provenance`; also put in the safetensors header.
        extra: further top-level ``model.json`` fields (e.g. ``preprocessing``); may not shadow
            arch_config keys.
    """
    if not isinstance(model, FoundationNet):
        raise TypeError(f"save_model needs a FoundationNet, got {type(model).__name__} (merge LoRA first)")
    meta = model.arch_config()
    for key, value in (extra or {}).items():
        if key in meta or key == "provenance":
            raise ValueError(f"extra key {key!r} would overwrite a model.json field")
        meta[key] = value
    meta["provenance"] = dict(provenance)
    folder = Path(folder)
    save_safetensors(model.state_dict(), folder / MODEL_WEIGHTS, provenance=provenance)
    save_json(meta, folder / MODEL_JSON)


def read_model_json(folder: Path) -> dict[str, Any]:
    """The ``model.json`` of a model folder (InputError if absent or not a model description)."""
    path = Path(folder) / MODEL_JSON
    if not path.is_file():
        raise InputError(path, "model description not found (expected a model folder from save_model)")
    meta = read_json(path)
    for key in ("arch", "in_channels", "arch_kwargs", "ssl", "heads"):
        if key not in meta:
            raise InputError(path, f"missing key {key!r}")
    return meta


def check_state_dict(where: object, expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]) -> None:
    """Raise InputError naming ``where`` and listing missing / unexpected / mis-shaped keys, if any."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(
        f"{k}: {tuple(found[k].shape)} != {tuple(expected[k].shape)}"
        for k in set(expected) & set(found)
        if tuple(found[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_short(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {_short(shapes)}")
        raise InputError(where, "weights do not match the architecture; " + "; ".join(parts))


def _short(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_model(folder: Path) -> FoundationNet:
    """Rebuild a :class:`FoundationNet` from a model folder, loading its weights strictly (bit-identical).

    Raises:
        InputError: missing files, unknown architecture, or weights that do not match (the message
            names the file and lists missing and unexpected keys).
    """
    folder = Path(folder)
    meta = read_model_json(folder)
    weights = folder / MODEL_WEIGHTS
    if not weights.is_file():
        raise InputError(weights, "model weights not found")
    arch_kwargs = dict(meta["arch_kwargs"])
    if meta["arch"] == "unet":
        # a unet saved before ``top`` existed kept MONAI's whole network (its heads read shared features)
        arch_kwargs.setdefault("top", "shared")
    try:
        model = FoundationNet(
            meta["arch"],
            in_channels=int(meta["in_channels"]),
            arch_kwargs=arch_kwargs,
            ssl=meta["ssl"],
            heads={k: int(v) for k, v in meta["heads"].items()},
            seed=0,  # every tensor is overwritten below; a fixed seed just avoids touching the global RNG
        )
    except (ValueError, TypeError) as err:
        raise InputError(folder / MODEL_JSON, f"cannot build the network: {err}") from err
    state = load_safetensors(weights)
    expected = model.state_dict()
    check_state_dict(weights, expected, state)
    model.load_state_dict(state, strict=True)
    return model


def model_id(folder: Path) -> str:
    """Identifier of a model folder: the first 16 hex digits of the SHA-256 of its ``model.safetensors``."""
    path = Path(folder) / MODEL_WEIGHTS
    if not path.is_file():
        raise InputError(path, "model weights not found")
    return sha256_file(path)[:16]
