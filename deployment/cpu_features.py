"""Which int8 kernels an x86 CPU runs: its instruction sets (``/proc/cpuinfo``), and where they saturate.

Without VNNI an x86 int8 dot product multiplies u8 x s8 pairs and adds each pair into a saturating int16
(``vpmaddubsw``) before widening to int32. With activations up to 255 a pair stays exact only while
``2 * 255 * |q_w| < 2^15``, i.e. ``|q_w| <= MAX_UNSATURATED_WEIGHT``; 8-bit weights (up to 127) can saturate.
VNNI (``vpdpbusd``: four products summed straight into int32) and AMX do not. onnxruntime's kernels and
oneDNN's (inductor's int8) both behave so; oneDNN can also be held below VNNI by ``ONEDNN_MAX_CPU_ISA``.
"""
from __future__ import annotations

import os
from pathlib import Path

# 2 * 255 * 64 = 32640 < 2^15 = 32768: no pair sum of such weights saturates.
MAX_UNSATURATED_WEIGHT = 64
INT8_FLAGS = ("avx2", "avx512_vnni", "avx_vnni", "amx_int8")
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
# ONEDNN_MAX_CPU_ISA values below every VNNI level of oneDNN.
ONEDNN_ISAS_WITHOUT_VNNI = frozenset({"SSE41", "AVX", "AVX2", "AVX512_CORE"})


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's flags from ``cpuinfo`` (empty where there is no such file, e.g. off Linux)."""
    if not cpuinfo.exists():
        return frozenset()
    lines = cpuinfo.read_text().splitlines()
    return frozenset(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))


def int8_instruction_sets(flags: frozenset[str] | None = None) -> list[str]:
    """The int8-relevant instruction sets among ``flags`` (default: this CPU's), in :data:`INT8_FLAGS` order."""
    flags = cpu_flags() if flags is None else flags
    return [flag for flag in INT8_FLAGS if flag in flags]


def u8s8_saturates(flags: frozenset[str] | None = None) -> bool:
    """Whether this CPU's (or ``flags``') int8 kernels add u8 x s8 pairs in saturating int16: AVX2 and none of
    :data:`VNNI_FLAGS` (module doc); False where the flags are unknown."""
    flags = cpu_flags() if flags is None else flags
    return "avx2" in flags and not flags & VNNI_FLAGS


def onednn_saturates(flags: frozenset[str] | None = None, max_isa: str | None = None) -> bool:
    """:func:`u8s8_saturates` for oneDNN (inductor's int8 kernels), which ``ONEDNN_MAX_CPU_ISA`` (``max_isa``,
    default: the environment's) can also hold below VNNI on a CPU that has it."""
    flags = cpu_flags() if flags is None else flags
    max_isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "") if max_isa is None else max_isa
    return u8s8_saturates(flags) or ("avx2" in flags and max_isa.upper() in ONEDNN_ISAS_WITHOUT_VNNI)
