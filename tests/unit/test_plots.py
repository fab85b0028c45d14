"""Figures are drawn from the summary tables, deterministically, with overlays in the original geometry."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from stages import aggregate, plots
from stages.core.errors import InputError
from stages.core.io import make_provenance, read_provenance, save_nifti, write_parquet

SHAPE = (9, 11, 7)  # canonical (RAS) shape of the synthetic volumes
PNG = b"\x89PNG\r\n\x1a\n"


def canonical_label() -> np.ndarray:
    """Source label values 5 (organ) and 7 (lesion) in canonical axes, spanning axial slices 2..4."""
    lab = np.zeros(SHAPE, dtype=np.int16)
    lab[2:6, 3:8, 2:5] = 5
    lab[6:8, 4:6, 3:5] = 7
    return lab


def stored(volume: np.ndarray) -> nib.Nifti1Image:
    """Store a canonical volume flipped along x (an L.. orientation), so the figure must reorient it."""
    affine = np.diag([-1.0, 1.5, 2.0, 1.0])
    affine[0, 3] = SHAPE[0] - 1
    return nib.Nifti1Image(np.ascontiguousarray(volume[::-1]), affine)


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A run folder with one task's original files, predictions, metrics of three models and training logs."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    image = rng.normal(100.0, 10.0, SHAPE).astype(np.float32)
    label = canonical_label()
    cases = {"t_000": label, "t_001": np.where(label == 7, 5, label), "t_002": np.zeros_like(label)}
    dice = {"t_000": 0.9, "t_001": 0.2, "t_002": 0.5}
    rows = []
    for case, pred in cases.items():
        save_nifti(stored(image), Path(f"demo/imagesTr/{case}.nii.gz"))
        save_nifti(stored(label), Path(f"demo/labelsTr/{case}.nii.gz"))
        # predictions hold task classes (1, 2) in the original geometry
        save_nifti(
            stored(pred.astype(np.uint8) // 5 + (pred == 7)),
            Path(f"results/eval/medseqft/t/predictions/t/{case}.nii.gz"),
        )
        for method, step, task, value in (
            ("medseqft", "t", "t", dice[case]),
            ("parallel_ft", "t", "t", 0.4),
            ("medseqft", "u", "t", dice[case] - 0.1),
            ("medseqft", "u", "u", 0.6),
            ("parallel_ft", "u", "u", 0.5),
        ):
            rows += [
                {
                    "method": method,
                    "step": step,
                    "task": task,
                    "case": case.replace("t_", f"{task}_"),
                    "class": c,
                    "metric": "dice",
                    "value": value,
                    "flag": "",
                }
                for c in (1, 2)
            ]
    manifest = pd.DataFrame(
        {
            "case": list(cases),
            "split": "test",
            "image_path": [f"demo/imagesTr/{c}.nii.gz" for c in cases],
            "label_path": [f"demo/labelsTr/{c}.nii.gz" for c in cases],
            "num_classes": 3,
        }
    )
    write_parquet(
        manifest,
        Path("results/data/t/manifest.parquet"),
        make_provenance("preprocess", {"labels": [5, 7]}, labels={"0": "background", "1": "organ", "2": "lesion"}),
    )
    metrics = pd.DataFrame(rows)
    paths = []
    for (method, step), part in metrics.groupby(["method", "step"]):
        paths.append(Path(f"results/eval/{method}/{step}/metrics.parquet"))
        write_parquet(part.reset_index(drop=True), paths[-1], make_provenance("evaluate", {}))
    log = Path("results/runs/medseqft/t/teacher/train_log.parquet")
    write_parquet(pd.DataFrame({"step": [1, 2, 3], "loss": [2.0, 1.5, 1.2]}), log, make_provenance("train", {}))
    # the workflow labels each log (method, step, stage); aggregate never reads them from the path
    labelled = aggregate.TrainLog("medseqft", "t", "teacher", log)
    aggregate.run(paths, Path("results/summary"), {"n_boot": 100, "order": ["t", "u"]}, [labelled])
    return tmp_path


OVERLAY = "t:t:results/eval/medseqft/t/predictions:results/data/t"


def test_run_draws_every_supported_figure_byte_identically(run_dir: Path) -> None:
    out = Path("results/summary/plots")
    written = plots.run(Path("results/summary"), out, {"dpi": 60}, [plots.parse_overlay(OVERLAY)])
    names = sorted(p.name for p in written)
    assert names == ["dice_boxplots.png", "forgetting.png", "overlay_t.png", "training_loss.png"]
    first = {n: (out / n).read_bytes() for n in names}
    assert all(b.startswith(PNG) for b in first.values())
    assert all(b"matplotlib" not in b for b in first.values())  # no software metadata
    prov = read_provenance(out / "overlay_t.png")  # the .prov.json sidecar
    assert prov["stage"] == "plots" and prov["cases"] == {"best": "t_000", "worst": "t_001"}
    assert {
        "demo/imagesTr/t_000.nii.gz",
        "demo/labelsTr/t_001.nii.gz",
        "results/eval/medseqft/t/predictions/t/t_001.nii.gz",
    } <= set(prov["inputs"])
    assert set(read_provenance(out / "forgetting.png")["inputs"]) == {
        "results/summary/forgetting.parquet",
        "results/summary/bwt.parquet",
    }
    plots.main(
        ["--summary", "results/summary", "--out", str(out), "--overlay", OVERLAY, "--settings", json.dumps({"dpi": 60})]
    )
    assert {n: (out / n).read_bytes() for n in names} == first


def test_budget_figure_only_with_rounds(run_dir: Path) -> None:
    rounds = pd.DataFrame(
        {
            "strategy": ["random", "random", "dkd_asd"],
            "round": [0, 1, 0],
            "labels": [2, 4, 2],
            "seed": [0, 0, 0],
            "dice": [0.3, 0.5, 0.4],
        }
    )
    write_parquet(rounds, Path("rounds.parquet"), make_provenance("query_round", {}))
    metrics = sorted(Path("results/eval").glob("*/*/metrics.parquet"))
    aggregate.run(metrics, Path("s2"), {"n_boot": 50}, budget=[Path("rounds.parquet")])
    written = plots.run(Path("s2"), Path("p2"), {"dpi": 50})
    assert sorted(p.name for p in written) == ["budget.png", "dice_boxplots.png", "forgetting.png"]


def _active_cases() -> pd.DataFrame:
    """cases.parquet rows of an ASSFT-only run: two chains, two rounds, a semi-supervised last round."""
    rows = [
        {
            "method": method,
            "step": step,
            "task": "target",
            "case": f"c{c}",
            "metric": metric,
            "value": 0.5 + 0.1 * c,
            "own_step": False,
        }
        for method, step in [
            ("assft_dkd_asd", "round0"),
            ("assft_dkd_asd", "round1"),
            ("assft_dkd_asd", "round1+selective"),
            ("assft_random", "round0"),
            ("assft_random", "round1"),
        ]
        for c in range(3)
        for metric in ("dice", "hd95")
    ]
    return pd.DataFrame(rows)


def test_an_assft_only_run_draws_its_last_round_models() -> None:
    """No own-step model (an ASSFT-only study): the box plot holds the chains' last-round models, so the
    rule's declared figure exists (it was missing, and Snakemake failed the job)."""
    drawn = plots._boxplot_rows(_active_cases())
    assert sorted(drawn["method"].unique()) == [
        "assft_dkd_asd@round1",
        "assft_dkd_asd@round1+selective",
        "assft_random@round1",
    ]
    assert set(drawn["metric"]) == {"dice"} and set(drawn["colour_key"]) == {"assft_dkd_asd", "assft_random"}
    fig = plots.dice_boxplots(_active_cases(), {"assft_dkd_asd": "C0", "assft_random": "C1"})
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["assft_dkd_asd@round1", "assft_dkd_asd@round1+selective", "assft_random@round1"]


def test_own_step_models_are_drawn_without_the_active_chains(run_dir: Path) -> None:
    cases = pd.read_parquet("results/summary/cases.parquet")
    drawn = plots._boxplot_rows(pd.concat([cases, _active_cases()], ignore_index=True))
    assert drawn["own_step"].all() and not drawn["method"].str.startswith("assft").any()


def test_a_run_without_dice_still_writes_the_box_plot(tmp_path: Path) -> None:
    empty = _active_cases().iloc[:0]
    fig = plots.dice_boxplots(empty, {})
    assert [t.get_text() for t in fig.axes[0].texts] == ["no test-set Dice in this run"]


def test_overlay_maps_labels_and_reorients_to_canonical(run_dir: Path) -> None:
    case = "t_000"
    fig = plots.case_overlay(
        "t",
        [("best", case, 0.9)],
        [Path(f"demo/imagesTr/{case}.nii.gz")],
        [Path(f"demo/labelsTr/{case}.nii.gz")],
        [Path(f"results/eval/medseqft/t/predictions/t/{case}.nii.gz")],
        [5, 7],
        3,
    )
    image_ax, truth_ax, pred_ax = fig.axes[:3]
    # labels span axial slices 2..4 of the canonical volume -> slice 3; source 5 -> class 1, 7 -> class 2
    expected = np.select([canonical_label() == 5, canonical_label() == 7], [1, 2], 0)[:, :, 3].T
    shown = truth_ax.images[1].get_array()
    np.testing.assert_array_equal(np.ma.filled(shown, -1), np.where(expected > 0, expected - 1, -1))
    np.testing.assert_array_equal(np.ma.filled(pred_ax.images[1].get_array(), -1), np.ma.filled(shown, -1))
    assert "axial slice 3" in image_ax.get_title()


def test_missing_prediction_is_refused_before_any_figure(run_dir: Path) -> None:
    Path("results/eval/medseqft/t/predictions/t/t_001.nii.gz").unlink()
    with pytest.raises(InputError, match=r"t_001\.nii\.gz: file not found"):
        plots.run(Path("results/summary"), Path("figs"), {}, [plots.parse_overlay(OVERLAY)])
    with pytest.raises(InputError, match="no Dice of method medseqft, step v on task t"):
        plots.run(Path("results/summary"), Path("figs"), {}, [plots.parse_overlay(OVERLAY.replace("t:t:", "t:v:"))])
    assert not Path("figs").exists()
    with pytest.raises(InputError, match="TASK:STEP:PREDICTIONS_DIR:DATA_DIR"):
        plots.parse_overlay("t:results/eval")
    with pytest.raises(InputError, match="unknown keys"):
        plots.run(Path("results/summary"), Path("figs"), {"colour": "red"})


def test_training_curves_show_validation_dice_on_a_second_axis() -> None:
    logs = pd.DataFrame(
        {
            "method": "parallel_ft",
            "step": "t",
            "stage": "train",
            "iteration": [1, 2, 3, 4],
            "loss": [2.0, 1.5, 1.2, 1.1],
            "val_score": [np.nan, 0.4, np.nan, 0.6],
        }
    )
    fig = plots.training_curves(logs, {"parallel_ft": "C0"})
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 2  # the loss axis and its twin with the validation Dice
    lines = axes[1].get_lines()
    assert list(lines[0].get_xdata()) == [2, 4] and list(lines[0].get_ydata()) == [0.4, 0.6]
    assert list(lines[1].get_xdata()) == [4]  # the best point, ringed
    # without any validation score, no second axis
    fig = plots.training_curves(logs.assign(val_score=np.nan), {})
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 1
