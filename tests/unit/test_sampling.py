"""Tests for stages.core.sampling: patch shapes, padding, foreground oversampling, determinism, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stages.core.errors import InputError
from stages.core.sampling import CaseStore, PatchSampler, iterate_cases


def _coord_image(shape: tuple[int, int, int]) -> np.ndarray:
    """Three channels holding x+1, y+1, z+1: any patch tells where it came from (0 = padding)."""
    grid = np.meshgrid(*[np.arange(1, s + 1, dtype=np.float32) for s in shape], indexing="ij")
    return np.stack(grid)


def _write_case(cases_dir: Path, case: str, image: np.ndarray, seg: np.ndarray | None) -> None:
    cases_dir.mkdir(parents=True, exist_ok=True)
    np.save(cases_dir / f"{case}.npy", image)
    if seg is not None:
        np.save(cases_dir / f"{case}_seg.npy", seg)


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """Two cases of odd shapes with coordinate images; each has a small class-1 blob and one class-2 voxel."""
    root = tmp_path / "data" / "toy"
    for case, shape, blob in [("c0", (20, 15, 23), (5, 5, 5)), ("c1", (31, 40, 24), (20, 30, 10))]:
        seg = np.zeros(shape, dtype=np.uint8)
        x, y, z = blob
        seg[x : x + 2, y : y + 2, z : z + 2] = 1
        seg[x + 6, y + 6, z + 6] = 2
        _write_case(root / "cases", case, _coord_image(shape), seg)
    return root


def _origin(patch_image: np.ndarray) -> tuple[int, ...] | None:
    """Lower corner of an unflipped patch of a coordinate image, checking it is one consistent crop."""
    inside = patch_image[0] > 0
    if not inside.any():
        return None
    idx = np.argwhere(inside)[0]
    origin = tuple(int(patch_image[a][tuple(idx)]) - 1 - int(idx[a]) for a in range(3))
    grid = np.meshgrid(*[np.arange(p) for p in patch_image.shape[1:]], indexing="ij")
    for a in range(3):
        expected = (grid[a] + origin[a] + 1).astype(np.float32)
        assert np.array_equal(patch_image[a][inside], expected[inside])
    return origin


@pytest.mark.parametrize("patch", [(16, 16, 16), (17, 18, 19), (40, 9, 33), (1, 1, 1)])
def test_shapes_content_and_padding(dataset: Path, patch: tuple[int, int, int]) -> None:
    store = CaseStore(dataset, ["c0", "c1"])
    sampler = PatchSampler(store, patch, batch_size=6, fg_ratio=0.5)
    batch = sampler.sample(torch.Generator().manual_seed(3))
    assert batch["image"].shape == (6, 3, *patch) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (6, 1, *patch) and batch["label"].dtype == torch.int64
    assert len(batch["case"]) == 6 and set(batch["case"]) <= {"c0", "c1"}
    for b, case in enumerate(batch["case"]):
        img = batch["image"][b].numpy()
        lab = batch["label"][b, 0].numpy()
        origin = _origin(img)
        assert origin is not None  # every patch overlaps its volume
        seg = np.load(dataset / "cases" / f"{case}_seg.npy")
        inside = img[0] > 0
        coords = np.argwhere(inside) + np.array(origin)
        assert np.array_equal(lab[inside], seg[tuple(coords.T)])
        assert (lab[~inside] == 0).all() and (img[:, ~inside] == 0).all()
        # where the volume is at least as large as the patch, a uniform patch lies inside it; in any
        # case the patch covers min(patch, volume) voxels along each axis or is centred on foreground
        for a in range(3):
            extent = int(inside.any(axis=tuple(i for i in range(3) if i != a)).sum())
            assert extent <= min(patch[a], store.shapes[case][a])


def test_patch_larger_than_volume_holds_whole_volume(dataset: Path) -> None:
    store = CaseStore(dataset, ["c0"])
    sampler = PatchSampler(store, (25, 21, 27), batch_size=4, fg_ratio=0.0)
    batch = sampler.sample(torch.Generator().manual_seed(0))
    seg = np.load(dataset / "cases" / "c0_seg.npy")
    for b in range(4):
        img = batch["image"][b].numpy()
        inside = img[0] > 0
        assert inside.sum() == 20 * 15 * 23  # the whole volume, zero-padded around it
        assert batch["label"][b, 0].numpy().sum() == seg.sum()


def test_determinism_from_generator_state(dataset: Path) -> None:
    store = CaseStore(dataset, ["c0", "c1"])
    sampler = PatchSampler(store, (17, 18, 19), batch_size=3, fg_ratio=0.33, flips=True)
    gen = torch.Generator().manual_seed(11)
    sampler.sample(gen)
    state = gen.get_state()
    first = sampler.sample(gen)
    gen.set_state(state)
    again = sampler.sample(gen)
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["label"], again["label"])
    assert first["case"] == again["case"]
    other = sampler.sample(torch.Generator().manual_seed(12))
    assert not torch.equal(first["image"], other["image"])
    # the global RNG is not used
    torch.manual_seed(0)
    before = torch.get_rng_state()
    sampler.sample(torch.Generator().manual_seed(1))
    assert torch.equal(before, torch.get_rng_state())


@pytest.mark.parametrize("fg_ratio", [0.0, 0.33, 1.0])
def test_foreground_ratio(dataset: Path, fg_ratio: float) -> None:
    store = CaseStore(dataset, ["c0", "c1"])
    patch = (9, 7, 11)  # odd: the centre voxel is unambiguous
    sampler = PatchSampler(store, patch, batch_size=50, fg_ratio=fg_ratio)
    gen = torch.Generator().manual_seed(5)
    on_fg, classes = 0, {1: 0, 2: 0}
    n = 0
    for _ in range(12):
        batch = sampler.sample(gen)
        centre = batch["label"][:, 0, patch[0] // 2, patch[1] // 2, patch[2] // 2]
        on_fg += int((centre > 0).sum())
        for c in (1, 2):
            classes[c] += int((centre == c).sum())
        n += len(centre)
    # foreground is 9 of >= 6900 voxels per case, so uniform patches almost never centre on it
    assert abs(on_fg / n - fg_ratio) < 0.06
    if fg_ratio == 1.0:
        # a class is drawn uniformly among those present: the single class-2 voxel is as likely as the blob
        assert abs(classes[2] / n - 0.5) < 0.08


def test_flips_mirror_patches(dataset: Path) -> None:
    store = CaseStore(dataset, ["c1"])
    sampler = PatchSampler(store, (8, 8, 8), batch_size=64, fg_ratio=0.0, flips=True)
    batch = sampler.sample(torch.Generator().manual_seed(2))
    seen = set()
    for b in range(64):
        img = batch["image"][b].numpy()
        signs = tuple(int(np.sign(np.diff(img[a], axis=a)).mean()) for a in range(3))
        assert all(s in (-1, 1) for s in signs)  # each axis is a clean (possibly mirrored) run
        seen.add(signs)
        lab = batch["label"][b, 0].numpy()
        unflipped = img[:, :: signs[0], :: signs[1], :: signs[2]]
        origin = _origin(unflipped)
        assert origin is not None
        seg = np.load(dataset / "cases" / "c1_seg.npy")
        crop = seg[tuple(slice(o, o + 8) for o in origin)]
        assert np.array_equal(lab[:: signs[0], :: signs[1], :: signs[2]], crop)
    assert len(seen) >= 6  # most of the 8 flip combinations occur in 64 draws


def test_store_uses_memmap_and_indexes_foreground(tmp_path: Path) -> None:
    cases_dir = tmp_path / "cases"
    seg = np.zeros((30, 30, 30), dtype=np.uint8)
    seg[2:12, 3:13, 4:14] = 1  # 1000 voxels
    _write_case(cases_dir, "a", np.zeros((1, 30, 30, 30), np.float32), seg)
    store = CaseStore(tmp_path, ["a"], max_fg_voxels=50)
    assert isinstance(store.image("a"), np.memmap) and isinstance(store.label("a"), np.memmap)
    assert store.in_channels == 1 and store.shapes["a"] == (30, 30, 30) and store.num_classes_seen == 2
    coords = store.foreground("a")[1]
    assert coords.shape == (50, 3)
    assert (seg[tuple(coords.astype(np.int64).T)] == 1).all()
    assert len({tuple(c) for c in coords}) == 50
    # the thinning is a fixed rule: a second store gives the same coordinates
    assert np.array_equal(CaseStore(tmp_path, ["a"], max_fg_voxels=50).foreground("a")[1], coords)
    # and it spans the region, not just its first rows
    assert coords[:, 0].min() == 2 and coords[:, 0].max() == 11


def test_store_without_labels(tmp_path: Path) -> None:
    _write_case(tmp_path / "cases", "u", np.ones((2, 10, 11, 12), np.float32), None)
    store = CaseStore(tmp_path, ["u"], with_labels=False)
    batch = PatchSampler(store, (5, 5, 5), batch_size=2, fg_ratio=0.0).sample(torch.Generator())
    assert "label" not in batch and batch["image"].shape == (2, 2, 5, 5, 5)
    with pytest.raises(ValueError, match="fg_ratio"):
        PatchSampler(store, (5, 5, 5), batch_size=2, fg_ratio=0.3)
    case, image, label = next(iterate_cases(store))
    assert case == "u" and image.shape == (1, 2, 10, 11, 12) and label is None


def test_iterate_cases(dataset: Path) -> None:
    store = CaseStore(dataset, ["c1", "c0"])
    items = list(iterate_cases(store))
    assert [c for c, _, _ in items] == ["c1", "c0"]
    _, image, label = items[1]
    assert image.shape == (1, 3, 20, 15, 23) and label.shape == (1, 1, 20, 15, 23) and label.dtype == torch.int64
    assert int(label.sum()) == 8 + 2


def test_missing_and_bad_files(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"c9\.npy.*missing"):
        CaseStore(dataset, ["c0", "c9"])
    (dataset / "cases" / "c1_seg.npy").unlink()
    with pytest.raises(InputError, match=r"c1_seg\.npy"):
        CaseStore(dataset, ["c0", "c1"])
    CaseStore(dataset, ["c0", "c1"], with_labels=False)  # images alone are fine
    bad = tmp_path / "bad"
    _write_case(bad / "cases", "d", np.zeros((1, 4, 4, 4), np.float64), np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(InputError, match=r"d\.npy.*float32"):
        CaseStore(bad, ["d"])
    _write_case(bad / "cases", "e", np.zeros((1, 4, 4, 4), np.float32), np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(InputError, match=r"e_seg\.npy.*shape"):
        CaseStore(bad, ["e"])
    (bad / "cases" / "f.npy").write_bytes(b"not an array")
    with pytest.raises(InputError, match=r"f\.npy.*readable"):
        CaseStore(bad, ["f"], with_labels=False)
    with pytest.raises(InputError, match="no cases"):
        CaseStore(dataset, [])


@pytest.mark.parametrize(
    "kwargs", [{"patch_size": (8, 8)}, {"patch_size": (8, 0, 8)}, {"batch_size": 0}, {"fg_ratio": 1.5}]
)
def test_bad_sampler_arguments(dataset: Path, kwargs: dict) -> None:
    args = {"patch_size": (8, 8, 8), "batch_size": 2, **kwargs}
    with pytest.raises(ValueError):
        PatchSampler(CaseStore(dataset, ["c0"]), **args)
