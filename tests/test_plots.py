"""Figures from saved results: every plot writes a real PNG of the stated size from JSON round-tripped dicts."""

from __future__ import annotations

import json
import struct

import matplotlib

matplotlib.use("Agg")

import matplotlib.image  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jaxsam import plots  # noqa: E402
from jaxsam.geometry import landscape  # noqa: E402
from jaxsam.geometry.records import to_json  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SIZE = (720, 480)  # 6 x 4 in at 120 dpi


def _round_trip(value):
    return json.loads(json.dumps(value.to_dict() if hasattr(value, "to_dict") else to_json(value)))


def _check_png(path, expected=SIZE):
    raw = path.read_bytes()
    assert raw[:8] == PNG_MAGIC and raw[12:16] == b"IHDR"
    width, height = struct.unpack(">II", raw[16:24])
    assert (width, height) == expected
    assert 5_000 < len(raw) < 400_000  # a drawn figure, and a small file
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == (height, width)
    colours = np.unique((pixels[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 20  # not a blank canvas: lines, text, colour map
    assert plt.get_fignums() == []  # nothing left open in pyplot


def _curve(kind, t, loss, accuracy):
    return landscape.CurveResult(
        t=np.asarray(t),
        loss=np.asarray(loss),
        accuracy=None if accuracy is None else np.asarray(accuracy),
        kind=kind,
        span=(float(t[0]), float(t[-1])),
        params_norm=10.0,
        direction_norm=3.0,
        recalibrated=False,
        direction_info={},
        loss_info={"subset": "train[:512]"},
    )


def test_plot_curve_interpolation_with_accuracy(tmp_path):
    t = np.linspace(-0.5, 1.5, 25)
    loss = 0.1 + 2.0 * (t - 0.0) ** 2 * (t - 1.0) ** 2 + 0.05 * t
    loss[0] = np.inf  # a diverged point: saved as null, drawn as a gap
    sgd = _round_trip(_curve("interpolation", t, loss, np.clip(1 - loss / 3, 0, 1)))
    sam = _round_trip(_curve("interpolation", t, 0.8 * loss, None))
    assert sgd["loss"][0] is None and sam["accuracy"] is None
    results = [("SGD -> SAM", sgd), ("Adam -> Adam+SAM", sam)]
    path = plots.plot_curve(results, tmp_path / "deep" / "interp.png", title="Interpolation", log_loss=True)
    assert path == tmp_path / "deep" / "interp.png"
    _check_png(path)


def test_plot_curve_accepts_records_directly(tmp_path):
    t = np.linspace(-1, 1, 51)
    curve = _curve("slice", t, 0.2 + t**2, None)
    path = plots.plot_curve([("filter-normalized", curve)], tmp_path / "slice.png", title="1-D slice")
    _check_png(path)


def test_plot_surface(tmp_path):
    x, y = np.linspace(-1, 1, 21), np.linspace(-1, 1, 17)
    xx, yy = np.meshgrid(x, y)
    loss = 0.05 + 3 * xx**2 + 0.5 * yy**2 + 4 * xx**2 * yy**2  # spans > 30x: logarithmic levels
    surface = landscape.SurfaceResult(
        x=x, y=y, loss=loss, accuracy=None, kind="surface_2d", params_norm=10.0, direction_norms=(10.0, 10.0),
        direction_cosine=0.01, recalibrated=True, direction_info={}, loss_info={},
    )  # fmt: skip
    loaded = _round_trip(surface)
    assert np.array(loaded["loss"]).shape == (17, 21)
    _check_png(plots.plot_surface(loaded, tmp_path / "surface.png", title="SAM minimum"))
    flat = dict(loaded, loss=(0.5 + 0.1 * xx).tolist())  # narrow range: linear levels
    _check_png(plots.plot_surface(flat, tmp_path / "flat.png", title="nearly flat"))
    with pytest.raises(ValueError, match="shape"):
        plots.plot_surface(dict(loaded, loss=loss.T.tolist()), tmp_path / "bad.png")


def test_plot_spectral_density(tmp_path):
    grid = np.linspace(-5, 120, 400)
    nodes = np.array([[-1.0, 0.0, 2.0, 50.0, 110.0], [-0.5, 0.1, 3.0, 60.0, 100.0]])
    weights = np.array([[0.1, 0.8, 0.09, 0.009, 0.001]] * 2)
    density = sum(
        w * np.exp(-((grid - n) ** 2) / (2 * 0.5**2)) / np.sqrt(2 * np.pi * 0.5**2)
        for n, w in zip(nodes.ravel(), weights.ravel())
    ) / 2
    sgd = _round_trip({"grid": grid, "density": density, "nodes": nodes, "weights": weights})
    sam = _round_trip({"grid": grid, "density": density * 0.5})  # no nodes
    assert min(sgd["density"]) < 1e-8  # exercised: the floor before the log axis
    path = plots.plot_spectral_density([("SGD", sgd), ("SGD+SAM", sam)], tmp_path / "slq.png", title="Hessian spectrum")
    _check_png(path)


def test_plot_metric_curves(tmp_path):
    epochs = list(range(1, 21))
    series = _round_trip(
        {
            "SGD": (epochs, [90 - 60 * np.exp(-e / 4) for e in epochs]),
            "SGD+SAM": (epochs, [92 - 60 * np.exp(-e / 4) for e in epochs[:-1]] + [float("nan")]),
        }
    )
    series = {label: tuple(xy) for label, xy in series.items()}
    path = plots.plot_metric_curves(
        series, tmp_path / "acc.png", title="Test accuracy", xlabel="epoch", ylabel="test accuracy (%)"
    )
    _check_png(path)
    with pytest.raises(ValueError, match="y values"):
        plots.plot_metric_curves({"bad": ([1, 2], [1.0])}, tmp_path / "bad.png")
