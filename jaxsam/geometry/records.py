"""Result records of the geometry measures: frozen dataclasses that turn into JSON.

Every measure returns a record holding its value and the diagnostics needed
to trust it (iterations, convergence, standard errors, what loss was
measured). `record.to_dict()` gives plain floats, ints, strings and lists,
ready for `json.dump`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np


def to_json(value: Any) -> Any:
    """Arrays -> (nested) lists of Python numbers, scalars -> float/int/bool; NaN/inf -> None."""
    if isinstance(value, Record) and type(value).to_dict is not Record.to_dict:
        return value.to_dict()  # a record that leaves fields out (e.g. parameter-sized eigenvectors)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, (str, bool)) or value is None:
        return value
    if hasattr(value, "shape") and hasattr(value, "dtype"):  # jax or numpy array
        array = np.asarray(value)
        if array.ndim:
            return [to_json(v) for v in array.tolist()]
        value = array.item()
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


class Record:
    """Mixin for the result dataclasses: `to_dict()` for JSON."""

    def to_dict(self) -> dict[str, Any]:
        return to_json(self)
