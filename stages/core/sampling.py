"""Random training patches, foreground-oversampled, cut straight from the memory-mapped preprocessed arrays.

Layout (docs/design.md): ``data/{dataset}/cases/{case}.npy`` is a float32 image ``(C, X, Y, Z)`` and
``{case}_seg.npy`` a uint8 label ``(X, Y, Z)``. Arrays are opened with ``mmap_mode="r"``, so a patch
reads only the pages it covers. Every random choice comes from the ``torch.Generator`` the caller
passes, so the trainer can save and restore the whole sampling state with the generator's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.core.errors import InputError

__all__ = ["CaseStore", "PatchSampler", "iterate_cases"]

# Coordinates are stored as uint16: preprocessed volumes are far below 65535 voxels per axis.
_COORD_DTYPE = np.uint16


class CaseStore:
    """The preprocessed cases of one dataset, memory-mapped, with foreground voxels indexed per class.

    Args:
        data_dir: the dataset folder ``data/{dataset}`` (arrays read from its ``cases/``), or the
            ``cases`` folder itself when it has no ``cases/`` sub-folder.
        cases: case ids to use, in order (e.g. the manifest's training split).
        with_labels: also open ``{case}_seg.npy`` and index its foreground; off for unlabelled pools.
        label_dir: where the ``{case}_seg.npy`` files are, when not beside the images (pseudo-labels).
        max_fg_voxels: at most this many foreground coordinates kept per case and class; larger sets
            are thinned to evenly spaced entries in raster order, so the index is deterministic.

    Raises:
        InputError: a file is missing or unreadable, or an array has the wrong dtype, rank or shape.
    """

    def __init__(
        self,
        data_dir: Path,
        cases: Sequence[str],
        with_labels: bool = True,
        label_dir: Path | None = None,
        max_fg_voxels: int = 10000,
    ) -> None:
        data_dir = Path(data_dir)
        cases_dir = data_dir / "cases" if (data_dir / "cases").is_dir() else data_dir
        label_dir = Path(label_dir) if label_dir is not None else cases_dir
        if isinstance(cases, str):
            raise TypeError("cases must be a sequence of case ids, not one string")
        if not cases:
            raise InputError(data_dir, "no cases given to sample from")
        if len(set(cases)) != len(cases):
            raise InputError(data_dir, "case list has duplicates")
        if max_fg_voxels < 1:
            raise ValueError(f"max_fg_voxels must be >= 1, got {max_fg_voxels}")
        self.data_dir = data_dir
        self.cases_dir = cases_dir
        self.label_dir = label_dir
        self.cases: tuple[str, ...] = tuple(cases)
        self.with_labels = with_labels
        self.max_fg_voxels = max_fg_voxels

        # Validate everything before the (slower) foreground indexing, so a bad file fails fast.
        paths = {c: cases_dir / f"{c}.npy" for c in self.cases}
        seg_paths = {c: label_dir / f"{c}_seg.npy" for c in self.cases} if with_labels else {}
        for path in [*paths.values(), *seg_paths.values()]:
            if not path.is_file():
                raise InputError(path, "missing preprocessed array (run the preprocess step first)")

        self._images: dict[str, np.memmap] = {}
        self._labels: dict[str, np.memmap] = {}
        channels: int | None = None
        for case in self.cases:
            image = _open_memmap(paths[case])
            if image.dtype != np.float32 or image.ndim != 4:
                raise InputError(paths[case], f"expected float32 (C, X, Y, Z), got {image.dtype} {image.shape}")
            if min(image.shape) < 1:
                raise InputError(paths[case], f"empty image of shape {image.shape}")
            if channels is None:
                channels = image.shape[0]
            elif image.shape[0] != channels:
                raise InputError(paths[case], f"has {image.shape[0]} channels, earlier cases have {channels}")
            self._images[case] = image
            if with_labels:
                label = _open_memmap(seg_paths[case])
                if label.dtype != np.uint8 or label.shape != image.shape[1:]:
                    raise InputError(
                        seg_paths[case],
                        f"expected uint8 of shape {image.shape[1:]} (the image's), got {label.dtype} {label.shape}",
                    )
                self._labels[case] = label
        assert channels is not None
        self.in_channels: int = channels
        self.shapes: dict[str, tuple[int, int, int]] = {c: tuple(self._images[c].shape[1:]) for c in self.cases}

        self._fg: dict[str, dict[int, np.ndarray]] = {}
        max_class = 0
        for case in self.cases:
            self._fg[case] = self._index_foreground(self._labels[case]) if with_labels else {}
            if self._fg[case]:
                max_class = max(max_class, max(self._fg[case]))
        # Classes seen in these cases (background included); the task's own count is in the manifest.
        self.num_classes_seen: int = max_class + 1

    def _index_foreground(self, label: np.memmap) -> dict[int, np.ndarray]:
        flat = np.flatnonzero(label)
        if flat.size == 0:
            return {}
        values = label.reshape(-1)[flat]
        out: dict[int, np.ndarray] = {}
        for cls in np.unique(values):
            sel = flat[values == cls]
            if sel.size > self.max_fg_voxels:
                sel = sel[np.linspace(0, sel.size - 1, self.max_fg_voxels).astype(np.int64)]
            out[int(cls)] = np.stack(np.unravel_index(sel, label.shape), axis=1).astype(_COORD_DTYPE)
        return out

    def __len__(self) -> int:
        return len(self.cases)

    def image(self, case: str) -> np.memmap:
        """The memory-mapped image ``(C, X, Y, Z)`` of ``case`` (read-only)."""
        return self._images[case]

    def label(self, case: str) -> np.memmap | None:
        """The memory-mapped label ``(X, Y, Z)`` of ``case``, or None for a store without labels."""
        return self._labels.get(case)

    def foreground(self, case: str) -> dict[int, np.ndarray]:
        """Foreground voxel coordinates of ``case``: ``{class: (N, 3) array}`` for each present class > 0."""
        return self._fg[case]


def _open_memmap(path: Path) -> np.memmap:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as err:
        raise InputError(path, f"not a readable .npy array ({err})") from err
    if not isinstance(array, np.memmap):  # an empty array cannot be mapped; np.load then returns an ndarray
        raise InputError(path, "could not be memory-mapped (empty array?)")
    return array


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in ``[low, high]`` (inclusive) from ``generator``."""
    return int(torch.randint(low, high + 1, (1,), generator=generator).item())


class PatchSampler:
    """Draws batches of patches: uniform over cases, foreground-centred with probability ``fg_ratio``.

    The foreground oversampling follows nnU-Net (Isensee et al., Nature Methods 18, 203-211, 2021):
    a foreground patch is centred on a random indexed voxel of a class drawn uniformly among the classes
    present in the case, so rare classes are seen as often as large ones. A uniform patch has its lower
    corner drawn uniformly such that it lies inside the volume; along an axis where the volume is
    smaller than the patch, the volume is placed at a random offset inside the patch. Whatever lies
    outside the volume is zero (image) and background (label).

    Args:
        store: the cases to sample from.
        patch_size: spatial patch size ``(px, py, pz)``; any positive sizes, odd ones included.
        batch_size: patches per batch.
        fg_ratio: probability that a patch is centred on foreground (must be 0 for a store without
            labels); cases without foreground fall back to a uniform patch.
        flips: mirror each patch along each spatial axis with probability 1/2.
    """

    def __init__(
        self,
        store: CaseStore,
        patch_size: Sequence[int],
        batch_size: int,
        fg_ratio: float = 0.33,
        flips: bool = False,
    ) -> None:
        patch = tuple(int(p) for p in patch_size)
        if len(patch) != 3 or min(patch) < 1:
            raise ValueError(f"patch_size must be three positive sizes, got {tuple(patch_size)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= fg_ratio <= 1.0:
            raise ValueError(f"fg_ratio must be in [0, 1], got {fg_ratio}")
        if fg_ratio > 0 and not store.with_labels:
            raise ValueError("the store has no labels: foreground oversampling needs fg_ratio=0")
        self.store = store
        self.patch_size: tuple[int, int, int] = patch
        self.batch_size = batch_size
        self.fg_ratio = float(fg_ratio)
        self.flips = flips

    def _lower_corner(self, case: str, generator: torch.Generator) -> tuple[int, ...]:
        shape = self.store.shapes[case]
        fg = self.store.foreground(case)
        if self.fg_ratio > 0 and float(torch.rand((), generator=generator)) < self.fg_ratio and fg:
            classes = sorted(fg)
            coords = fg[classes[_randint(generator, 0, len(classes) - 1)]]
            centre = coords[_randint(generator, 0, len(coords) - 1)]
            return tuple(int(c) - p // 2 for c, p in zip(centre, self.patch_size))
        return tuple(_randint(generator, min(0, s - p), max(0, s - p)) for s, p in zip(shape, self.patch_size))

    def _crop_into(self, case: str, lower: Sequence[int], img: np.ndarray, lab: np.ndarray | None) -> None:
        """Copy the patch at ``lower`` into ``img`` (C, *patch) and ``lab`` (*patch), padding with zeros.

        The destinations are the batch's own slots (or flipped views of them), so each voxel is read
        from the memmap and written once: no intermediate patch, no second copy into the batch, and
        the label is cast to the batch's int64 in the same pass. Only a patch that reaches outside
        the volume has its slot zeroed first.
        """
        image = self.store.image(case)
        label = self.store.label(case)
        src, dst = [], []
        inside = True
        for lo, p, s in zip(lower, self.patch_size, image.shape[1:]):
            a, b = max(lo, 0), min(lo + p, s)
            b = max(a, b)  # a patch wholly outside the volume along an axis stays all padding
            src.append(slice(a, b))
            dst.append(slice(a - lo, b - lo))
            inside = inside and a == lo and b == lo + p
        if not inside:
            img[...] = 0
        # One read from the memmap straight into the padded patch: no copy of the full volume.
        img[(slice(None), *dst)] = image[(slice(None), *src)]
        if lab is not None and label is not None:
            if not inside:
                lab[...] = 0
            lab[tuple(dst)] = label[tuple(src)]

    def sample(self, generator: torch.Generator) -> dict[str, Any]:
        """Draw one batch.

        Args:
            generator: the only source of randomness (a CPU ``torch.Generator``).

        Returns:
            ``image`` float32 ``(B, C, *patch_size)``, ``label`` int64 ``(B, 1, *patch_size)`` (only for a
            store with labels) and ``case``, the list of the B case ids.
        """
        n_cases = len(self.store.cases)
        images = np.empty((self.batch_size, self.store.in_channels, *self.patch_size), dtype=np.float32)
        # int64 straight away: the uint8 label is widened while it is copied, not in a second pass
        labels = np.empty((self.batch_size, 1, *self.patch_size), dtype=np.int64) if self.store.with_labels else None
        cases: list[str] = []
        for b in range(self.batch_size):
            case = self.store.cases[_randint(generator, 0, n_cases - 1)]
            lower = self._lower_corner(case, generator)
            img, lab = images[b], labels[b, 0] if labels is not None else None
            if self.flips:  # drawn after the corner, as before: the crop itself draws nothing
                flip = torch.rand(3, generator=generator) < 0.5
                axes = tuple(i for i in range(3) if bool(flip[i]))
                if axes:
                    # cropping into the mirrored view of the slot leaves the slot holding the mirrored patch
                    img = np.flip(img, axis=tuple(a + 1 for a in axes))
                    lab = np.flip(lab, axis=axes) if lab is not None else None
            self._crop_into(case, lower, img, lab)
            cases.append(case)
        out: dict[str, Any] = {"image": torch.from_numpy(images), "case": cases}
        if labels is not None:
            out["label"] = torch.from_numpy(labels)
        return out


def iterate_cases(store: CaseStore) -> Iterator[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """Whole cases for validation, in the store's order.

    Args:
        store: the cases.

    Yields:
        ``(case, image, label)``: image float32 ``(1, C, X, Y, Z)``, label int64 ``(1, 1, X, Y, Z)`` or
        None for a store without labels (a batch of one, ready for MONAI's sliding-window inferer).
    """
    for case in store.cases:
        image = torch.from_numpy(np.array(store.image(case)))[None]
        seg = store.label(case)
        label = torch.from_numpy(np.array(seg)).long()[None, None] if seg is not None else None
        yield case, image, label
