"""The dose-response analysis of a study (jaxsam.dose), on rows with known paired differences."""

from __future__ import annotations

import importlib.util
import math
import pathlib

import numpy as np
import pytest

from jaxsam import dose

ROOT = pathlib.Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)
NOISE = {0: -0.01, 1: 0.0, 2: 0.01}  # each seed's offset, the same at every ρ: sd 0.01 over seeds
# The mean paired worst-case difference of Adam + SAM at each ρ: detectably lower from ρ = 0.1 on
# (the 95 % half-width is t(0.975, 2)·0.01/√3 = 0.0248).
SAM_EFFECT = {0.02: 0.0, 0.05: -0.01, 0.1: -0.05, 0.2: -0.08, 0.5: -0.1}
SAM_ARMS = {0.02: "adam_sam_rho0.02", 0.05: "adam_sam", 0.1: "adam_sam_rho0.1", 0.2: "adam_sam_rho0.2",
            0.5: "adam_sam_rho0.5"}  # fmt: skip


def _dose_study():
    spec = importlib.util.spec_from_file_location("study_config", ROOT / "configs" / "study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("dose")


def _row(arm, seed, worst_case, test_accuracy=0.5):
    return {"model": "resnet18", "arm": arm, "seed": seed, "worst_case": worst_case, "test_accuracy": test_accuracy,
            "gap": 0.9 - test_accuracy}  # fmt: skip


def _rows():
    rows = [_row("adam", s, 1.0 + 0.1 * s) for s in SEEDS]
    rows += [_row(SAM_ARMS[rho], s, 1.0 + 0.1 * s + SAM_EFFECT[rho] + NOISE[s]) for rho in SAM_ARMS for s in SEEDS]
    # Label smoothing lowers worst-case by 0.2 alone; ASAM ρ=2 lowers it by 0.3 without and by 0.4 with it.
    rows += [_row("adam_asam_rho2", s, 1.0 + 0.1 * s - 0.3 + NOISE[s]) for s in SEEDS]
    rows += [_row("adam_ls", s, 1.0 + 0.1 * s - 0.2 + NOISE[s]) for s in SEEDS]
    rows += [_row("adam_ls_asam_rho2", s, 1.0 + 0.1 * s - 0.6 + 2 * NOISE[s]) for s in SEEDS]
    return rows


def test_the_dose_response_pairs_each_rho_with_the_base_and_fits_a_slope_per_seed(tmp_path):
    analysis = dose.dose_response(_dose_study(), _rows())
    families = {f["stem"]: f for f in analysis["resnet18"]["families"]}
    assert sorted(families) == ["adam_sam"]  # ASAM has one ρ in these rows: no dose-response
    sam = families["adam_sam"]
    assert [p["rho"] for p in sam["points"]] == sorted(SAM_ARMS)
    half = 4.302652729911275 * 0.01 / math.sqrt(3)
    for p in sam["points"]:
        cell = p["cells"]["worst_case"]
        assert cell["mean"] == pytest.approx(SAM_EFFECT[p["rho"]], abs=1e-12) and cell["n"] == 3
        assert cell["ci_high"] - cell["mean"] == pytest.approx(half, rel=1e-9)
    assert sam["smallest_flatter"]["worst_case"] == 0.1
    assert sam["points"][0]["cells"]["test_accuracy"]["mean"] == pytest.approx(0.0)
    # Every seed has the same slope (its offset is the same at every ρ): the interval is that slope.
    slope = np.polyfit(np.log10(sorted(SAM_ARMS)), [SAM_EFFECT[r] for r in sorted(SAM_ARMS)], 1)[0]
    t = sam["trend"]["worst_case"]
    assert t["mean"] == pytest.approx(slope, rel=1e-9) and t["n"] == 3 and t["verdict"] == "lower"

    alone, factor = analysis["resnet18"]["factors"]
    assert (alone["arm"], alone["without"]) == ("adam_ls", "adam") and "interaction" not in alone
    assert alone["cells"]["worst_case"]["mean"] == pytest.approx(-0.2)
    assert (factor["arm"], factor["without"]) == ("adam_ls_asam_rho2", "adam_asam_rho2")
    assert factor["cells"]["worst_case"]["mean"] == pytest.approx(-0.3)
    assert factor["interaction"]["worst_case"]["mean"] == pytest.approx(-0.1)  # (−0.4) − (−0.3)

    lines = dose.markdown(analysis, "figures/dose_response.png")
    text = "\n".join(lines)
    assert lines[0] == "## Dose-response: which ρ and ball" and "![dose-response](figures/dose_response.png)" in text
    assert "### ResNet18: Adam + SAM − Adam" in text and "Detectably flatter: worst-case from ρ = 0.1." in text
    assert "| ρ = 0.1 | 3 | " in text and "| slope per decade | 3 | " in text
    assert "| its SAM effect with − without label smoothing | 3 | " in text
    path = tmp_path / "dose.png"
    assert dose.figure(analysis, str(path)) and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_study_without_rho_variants_or_label_smoothing_has_no_dose_section():
    rows = [_row("adam", s, 1.0) for s in SEEDS] + [_row("adam_sam", s, 0.9) for s in SEEDS]
    assert dose.dose_response(_dose_study(), rows) == {}
    assert dose.markdown({}) == []
