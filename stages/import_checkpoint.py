"""Import an external checkpoint (MONAI SwinUNETR self-supervised weights or a plain state dict) as a model folder.

``python -m stages.import_checkpoint --checkpoint FILE --out DIR --settings JSON`` writes the same
``model.safetensors`` + ``model.json`` as :func:`stages.core.nets.save_model`. Settings:

- ``format``: ``"monai_swin_ssl"`` (the weights of Tang et al.'s SwinUNETR self-supervised pre-training:
  ``swinViT.*`` / ``swin_vit.*`` keys or bare Swin keys, optionally ``module.``-prefixed, optionally with
  their ``rotation_head.*``, ``contrastive_head.*`` and ``conv.*`` heads) or ``"state_dict"`` (keys that,
  after ``prefix_map``, are exactly this project's ``backbone.*`` / ``ssl_heads.*`` / ``seg_heads.*``);
- ``arch``, ``arch_kwargs``, ``in_channels`` (default 1): the network (:class:`FoundationNet`);
- ``prefix_map``: ``{"old.prefix.": "new.prefix."}`` applied to every key (longest match first);
- ``drop``: key prefixes to discard on purpose (recorded);
- ``ssl``: SSL settings (:data:`stages.core.nets.DEFAULT_SSL`); its ``heads`` are those found in the
  checkpoint unless given;
- ``seed`` (default 0): initialises what the checkpoint does not hold (``monai_swin_ssl`` only: the
  SwinUNETR convolutional encoder/decoder blocks, which Tang et al.'s pre-training does not train);
- ``preprocessing``: recorded in ``model.json`` as given.

``monai_swin_ssl`` mapping: Swin keys go to ``backbone.swinViT.*`` (older ``mlp.fc1/fc2`` names become
``mlp.linear1/linear2``); ``rotation_head`` -> ``ssl_heads.rotation`` and ``contrastive_head`` ->
``ssl_heads.contrastive``, read from single tokens of the bottleneck as in Tang et al.'s SSLHead
(``ssl.head_input = "token"``); ``conv.*`` (a decoder from the bottleneck straight to the image) has no
counterpart in our reconstruction head (a 1x1x1 conv on the SwinUNETR decoder) and is dropped, so such a
model has no inpainting head: ``has_ssl_heads`` is false (MDS / DKD use the feature fallback) unless the
``ssl.weights`` give inpainting weight 0 (rotation-only scoring). The backbone's own output conv
(``final_conv`` / ``out``) is dropped in both formats. Anything else that does not map is an error that
lists the missing and unexpected keys.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.core.errors import InputError, run_cli
from stages.core.io import load_safetensors, make_provenance, read_parquet
from stages.core.log import stage_log
from stages.core.nets import ARCHS, DEFAULT_ARCH_KWARGS, FoundationNet, check_state_dict, save_model, seed_from
from stages.core.settings import add_settings_argument, from_mapping, setting
from stages.core.ssl import write_feature_stats

__all__ = ["FORMATS", "ImportSettings", "main", "map_keys", "read_checkpoint", "run"]

log = logging.getLogger(__name__)

FORMATS = ("monai_swin_ssl", "state_dict")


@dataclass(frozen=True, kw_only=True)
class ImportSettings:
    """The settings of a checkpoint import (see the module docstring); a command-line tool, so optional
    keys keep defaults, those the pipeline passes equal to the schema's."""

    format: str = setting(help="monai_swin_ssl or state_dict", schema="foundation.import_format")
    arch: str = setting(help="the network (stages.core.nets.FoundationNet)", schema="foundation.arch")
    arch_kwargs: dict[str, Any] | None = setting(None, help="network keyword arguments (None = the network's own)")
    in_channels: int = setting(1, help="input channels", schema="foundation.in_channels")
    prefix_map: dict[str, str] = setting(
        factory=dict, help="key prefix renames, longest match first", schema="foundation.prefix_map"
    )
    drop: list[str] = setting(factory=list, help="key prefixes discarded on purpose (recorded)")
    ssl: dict[str, Any] | None = setting(
        None, help="SSL settings (None = the defaults); its heads are those found unless given"
    )
    heads: dict[str, int] | None = setting(None, help="segmentation heads; None = those found in the checkpoint")
    seed: int = setting(0, help="initialises what the checkpoint does not hold (monai_swin_ssl)")
    preprocessing: dict[str, Any] | None = setting(None, help="recorded in model.json as given")
    device: str = setting("cpu", help="device of the feature statistics (--pool)", schema="device")

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise InputError("--settings.format", f"must be one of {list(FORMATS)}, got {self.format!r}")
        if self.arch not in ARCHS:
            raise InputError("--settings.arch", f"must be one of {list(ARCHS)}, got {self.arch!r}")
        if self.format == "monai_swin_ssl" and self.arch != "swinunetr":
            raise InputError("--settings.arch", "format monai_swin_ssl needs arch 'swinunetr'")


# The backbone's output conv, which FoundationNet replaces by the task heads. MONAI's UNet: with
# arch_kwargs.top per_head (the default) its top up layer (``model.2``) is each head's own, so it is
# dropped like an output conv and the heads start from the seed; with top shared it keeps its last layer
# (it writes the decoder features), so set arch_kwargs.decoder_channels to the checkpoint's out_channels.
_OUTPUT_CONV = {"basicunet": "backbone.final_conv.", "swinunetr": "backbone.out.", "unet": None}
_SWIN_BLOCKS = (
    "encoder1.",
    "encoder2.",
    "encoder3.",
    "encoder4.",
    "encoder10.",
    "decoder5.",
    "decoder4.",
    "decoder3.",
    "decoder2.",
    "decoder1.",
    "out.",
)


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` or torch (``.pt``/``.pth``/``.bin``/``.ckpt``) state dict onto the CPU.

    Torch files are read with ``weights_only=True``; a ``{"state_dict": ...}`` or ``{"model": ...}``
    wrapper is unwrapped (nested wrappers too).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "checkpoint not found")
    try:
        if path.suffix == ".safetensors":
            obj: Any = load_safetensors(path)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any reader failure is bad input here
        raise InputError(path, f"cannot read checkpoint: {type(err).__name__}: {err}") from err
    for _ in range(3):
        if isinstance(obj, Mapping):
            inner = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), Mapping)), None)
            if inner is not None:
                obj = inner
                continue
        break
    if not isinstance(obj, Mapping) or not obj:
        raise InputError(
            path, "no state dict found (expected a mapping of tensors, maybe under 'state_dict' or 'model')"
        )
    bad = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise InputError(path, f"entries that are not tensors: {bad[:10]}")
    return {str(k): v for k, v in obj.items()}


def _apply_prefix_map(state: Mapping[str, torch.Tensor], prefix_map: Mapping[str, str]) -> dict[str, torch.Tensor]:
    order = sorted(prefix_map, key=len, reverse=True)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = key
        for old in order:
            if key.startswith(old):
                new = prefix_map[old] + key[len(old) :]
                break
        out[new] = value
    return out


def _map_swin_key(key: str) -> str | None:
    """Our name for a key of Tang et al.'s SSL checkpoint (``module.`` already stripped), or None."""
    for prefix in ("swinViT.", "swin_vit."):
        if key.startswith(prefix):
            key = "swinViT." + key[len(prefix) :]
            break
    else:
        if key.startswith(("patch_embed.", "layers")):
            key = "swinViT." + key
        elif key.startswith("rotation_head."):
            return "ssl_heads.rotation." + key[len("rotation_head.") :]
        elif key.startswith("contrastive_head."):
            return "ssl_heads.contrastive." + key[len("contrastive_head.") :]
        elif key.startswith(_SWIN_BLOCKS):
            return "backbone." + key
        else:
            return None
    return "backbone." + key.replace(".mlp.fc1.", ".mlp.linear1.").replace(".mlp.fc2.", ".mlp.linear2.")


def map_keys(
    state: Mapping[str, torch.Tensor], fmt: str, prefix_map: Mapping[str, str], drop: Sequence[str], arch: str
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Rename checkpoint keys to ours.

    Returns:
        (mapped state, dropped original keys, original keys that map to nothing).
    """
    state = _apply_prefix_map(state, prefix_map)
    mapped: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    unmapped: list[str] = []
    for key, value in state.items():
        if any(key.startswith(d) for d in drop):
            dropped.append(key)
            continue
        if fmt == "monai_swin_ssl":
            bare = key
            while bare.startswith("module."):
                bare = bare[len("module.") :]
            if bare.startswith("conv.") or bare.startswith("out."):
                dropped.append(key)  # SSLHead's image decoder / SwinUNETR's output conv: no counterpart
                continue
            new = _map_swin_key(bare)
            if new is None:
                unmapped.append(key)
                continue
        else:
            new = key
            output_conv = _OUTPUT_CONV.get(arch)
            if output_conv is not None and new.startswith(output_conv):
                dropped.append(key)
                continue
        if new in mapped:
            raise InputError(key, f"two checkpoint keys map onto {new!r}")
        mapped[new] = value
    return mapped, sorted(dropped), sorted(unmapped)


def _heads_in(state: Mapping[str, torch.Tensor]) -> tuple[list[str], dict[str, int]]:
    ssl = sorted({k.split(".")[1] for k in state if k.startswith("ssl_heads.")})
    seg: dict[str, int] = {}
    for k, v in state.items():
        parts = k.split(".")
        if parts[0] != "seg_heads" or len(parts) < 3:
            continue
        if parts[2:] == ["weight"]:  # a 1x1x1 conv head: (classes, in, 1, 1, 1)
            seg[parts[1]] = int(v.shape[0])
        elif parts[2:] in (
            ["layer", "0", "conv", "weight"],
            ["layer", "conv", "weight"],
        ):  # per-head unet: (in, classes, ...)
            seg[parts[1]] = int(v.shape[1])
    return ssl, seg


def run(checkpoint: Path, out: Path, settings: Mapping[str, Any], pool: Path | None = None) -> Path:
    """Map ``checkpoint`` onto a :class:`FoundationNet` and write the model folder ``out``.

    Everything is validated before anything is written.

    Args:
        checkpoint: the external weights file.
        out: the model folder to write.
        settings: see the module docstring.
        pool: a preprocessed unlabelled pool folder; when given, the pooled-feature statistics over it
            are written to ``out/feature_stats.safetensors`` (for the Mahalanobis fallback).

    Returns:
        ``out``.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    conf = from_mapping(ImportSettings, settings, "import_checkpoint", noun="keys")
    fmt, arch = conf.format, conf.arch
    prefix_map = dict(conf.prefix_map)
    drop = list(conf.drop)
    seed = conf.seed

    if arch == "unet" and (conf.arch_kwargs or {}).get("top", DEFAULT_ARCH_KWARGS["unet"]["top"]) == "per_head":
        drop.append("backbone.model.2.")
    state = read_checkpoint(checkpoint)
    mapped, dropped, unmapped = map_keys(state, fmt, prefix_map, drop, arch)
    if unmapped:
        raise InputError(
            checkpoint, f"keys that map to nothing ({len(unmapped)}): {unmapped[:20]} (use 'drop' or 'prefix_map')"
        )
    found_ssl, found_seg = _heads_in(mapped)

    ssl = dict(conf.ssl or {})
    if ssl.get("heads") is not None:
        absent = sorted(set(ssl["heads"]) - set(found_ssl))
        if absent:
            raise InputError("--settings.ssl.heads", f"heads {absent} are not in {checkpoint} (found {found_ssl})")
        for head in sorted(set(found_ssl) - set(ssl["heads"])):
            dropped += sorted(k for k in mapped if k.startswith(f"ssl_heads.{head}."))
            mapped = {k: v for k, v in mapped.items() if not k.startswith(f"ssl_heads.{head}.")}
    else:
        ssl["heads"] = found_ssl
    if fmt == "monai_swin_ssl" and ssl["heads"]:
        ssl.setdefault("head_input", "token")
    if "ssl_heads.contrastive.weight" in mapped:
        ssl.setdefault("contrastive_dim", int(mapped["ssl_heads.contrastive.weight"].shape[0]))
    heads = {str(k): int(v) for k, v in (conf.heads or found_seg).items()}
    try:
        model = FoundationNet(
            arch,
            in_channels=conf.in_channels,
            arch_kwargs=conf.arch_kwargs,
            ssl=ssl,
            heads=heads,
            seed=seed_from("import_checkpoint", seed),
        )
    except (ValueError, TypeError) as err:
        raise InputError("--settings", f"cannot build the network: {err}") from err

    expected = model.state_dict()
    initialised: list[str] = []
    if fmt == "monai_swin_ssl":
        # Tang et al. pre-train only the Swin encoder; the convolutional blocks start from the seed.
        initialised = sorted(k for k in expected if k not in mapped and not k.startswith("backbone.swinViT."))
        full = {**{k: expected[k] for k in initialised}, **mapped}
    else:
        full = mapped
    check_state_dict(checkpoint, expected, full)
    model.load_state_dict(full, strict=True)

    for key in dropped:
        log.info("dropped %s", key)
    if initialised:
        log.info("initialised from seed (%d keys): %s ...", len(initialised), initialised[:5])
    if not model.has_ssl_heads:
        log.warning("no usable SSL heads: MDS / DKD will use the feature-distance fallback")
    provenance = make_provenance(
        "import_checkpoint",
        settings=dict(settings),
        inputs=[checkpoint],
        seed=seed,
        dropped_keys=sorted(dropped),
        initialised_keys=initialised,
    )
    extra = {"preprocessing": conf.preprocessing} if "preprocessing" in settings else None
    if pool is not None:
        manifest = pool / "manifest.parquet"
        if not manifest.is_file():
            raise InputError(manifest, "missing: preprocess the pool before importing with --pool")
        cases = read_parquet(manifest)["case"].tolist()
        volumes = (np.load(pool / "cases" / f"{c}.npy", mmap_mode="r") for c in cases)
        model.eval()
        write_feature_stats(
            model,
            volumes,
            (conf.ssl or {}).get("patch_size", 96),
            out / "feature_stats.safetensors",
            provenance,
            conf.device,
        )
    save_model(model, out, provenance=provenance, extra=extra)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """Parse arguments and call :func:`run`."""
    parser = argparse.ArgumentParser(prog="python -m stages.import_checkpoint", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="external weights (.pt/.pth/.safetensors)")
    parser.add_argument("--out", type=Path, required=True, help="model folder to write")
    add_settings_argument(parser, required=True)  # the fields: the module docstring
    parser.add_argument("--pool", type=Path, default=None, help="preprocessed pool: also write feature statistics")
    args = parser.parse_args(argv)
    with stage_log(parser, args):
        run(args.checkpoint, args.out, args.settings, args.pool)


if __name__ == "__main__":
    run_cli(main)
