"""Whether bfloat16 pays on this machine, and what `--bf16` becomes where it does not.

On a CPU without native bf16 instructions (AVX2 only, e.g. an AMD EPYC with
`get_cpu_capability() == "AVX2"`) a bf16 matmul falls back to a naive kernel: measured 34×
slower than float32 forward+backward, a 120-step LoRA training 50 s per step instead of 1.5 s.
So `--bf16` there falls back to float32 with a one-line warning, unless the user insists
(`--bf16-force`). Torch is imported only when asked.
"""

from __future__ import annotations

import sys
import warnings
from functools import lru_cache
from pathlib import Path

from kifmerge.errors import KifWarning

SLOWDOWN_WITHOUT_NATIVE_BF16 = 34  # bf16 ÷ fp32 matmul time measured on an AVX2-only EPYC (issue 19)


class PrecisionWarning(KifWarning):
    """A precision asked for was replaced by one this machine runs well."""


@lru_cache(maxsize=1)
def bf16_support() -> tuple[bool, str]:
    """(bf16 runs at native speed here, why): a CUDA device that supports it, or a CPU with
    avx512_bf16 / amx_bf16 (Linux reads /proc/cpuinfo; elsewhere oneDNN's own check)."""
    import torch

    if torch.cuda.is_available():
        ok = torch.cuda.is_bf16_supported()
        return ok, f"CUDA {torch.cuda.get_device_name()}: bf16 {'supported' if ok else 'not supported'}"
    capability = torch.backends.cpu.get_cpu_capability()
    cpuinfo = Path("/proc/cpuinfo")
    if sys.platform.startswith("linux") and cpuinfo.exists():
        flags = set()
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
        native = sorted(flags & {"avx512_bf16", "amx_bf16"})
        if native:
            return True, f"CPU {capability} with {', '.join(native)}"
        return False, f"CPU {capability} without avx512_bf16 or amx_bf16"
    ok = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return ok, f"CPU {capability}: oneDNN bf16 {'supported' if ok else 'not supported'}"


def resolve_bf16(asked: bool, force: bool = False, *, what: str = "training") -> bool:
    """What `--bf16` becomes here: True where bf16 is native or `force`d; else False, with a
    PrecisionWarning (the CLI prints it as one line on stderr)."""
    if not asked or force:
        return asked
    ok, why = bf16_support()
    if not ok:
        warnings.warn(f"--bf16 ignored for {what}: {why}, where bf16 ran ~{SLOWDOWN_WITHOUT_NATIVE_BF16}× slower than "
                      "float32 (measured); running in float32. Pass --bf16-force to use bf16 anyway",
                      PrecisionWarning, stacklevel=2)
    return ok
