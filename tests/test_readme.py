"""The README's code runs as written."""

from __future__ import annotations

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_optax_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(block for block in blocks if "jaxsam.sam_transform" in block)
    namespace: dict = {}
    exec(compile(example, str(README), "exec"), namespace)  # noqa: S102
    # One SAM+Adam step from zero moves every parameter by the learning rate.
    params = namespace["params"]
    assert abs(float(params["b"][0]) - 1e-3) < 1e-6
