"""Hardware cluster size: how many filters to remove at a time so every layer keeps a width the hardware runs well.

Vector hardware computes channels in fixed-width groups; a layer with 68 output channels costs about
as much as one with 80 on a 16-lane unit (Gamanayake et al., "Cluster Pruning", arXiv 2003.02449:
latency moves in steps of channel count, not smoothly). The cluster size comes either from a named
hardware profile or from measuring that staircase on the OpenVINO CPU runtime.
"""
from __future__ import annotations

import platform
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import SettingsError
from .ov_runtime import compile_cpu, time_interleaved


@dataclass(frozen=True)
class ClusterProfile:
    name: str
    cluster: int
    label: str
    description: str


PROFILES: dict[str, ClusterProfile] = {
    "ncs2": ClusterProfile(
        "ncs2", 8, "Intel NCS2 (Myriad X VPU, MYRIAD plugin)",
        "The Myriad X runs the network in FP16 (the only model format its plugin takes) on SHAVE vector cores "
        "with 128-bit registers: 128 / 16 bit = 8 FP16 lanes, so channel counts in multiples of 8 fill the "
        "vector units."),
    "cpu-avx2": ClusterProfile(
        "cpu-avx2", 8, "CPU with AVX2 (FP32)",
        "256-bit AVX2 registers hold 8 FP32 values; oneDNN, under the OpenVINO CPU plugin, blocks channels "
        "by 8 (nChw8c), so widths in multiples of 8 avoid padded, wasted lanes."),
    "cpu-avx512": ClusterProfile(
        "cpu-avx512", 16, "CPU with AVX-512 (FP32)",
        "512-bit AVX-512 registers hold 16 FP32 values; oneDNN blocks channels by 16 (nChw16c)."),
    "cpu-sse": ClusterProfile(
        "cpu-sse", 4, "CPU with SSE4 or ARM NEON (FP32)",
        "128-bit registers hold 4 FP32 values."),
    "none": ClusterProfile(
        "none", 1, "No hardware constraint",
        "Filters are removed one at a time (ordinary filter pruning); layer widths may end up irregular."),
}
ALIASES = {"myriad": "ncs2", "vpu": "ncs2", "myriadx": "ncs2", "avx2": "cpu-avx2", "avx512": "cpu-avx512",
           "sse": "cpu-sse", "neon": "cpu-sse", "cpu-neon": "cpu-sse", "1": "none", "off": "none"}


def get_profile(name: str) -> ClusterProfile:
    key = (name or "").strip().lower()
    key = ALIASES.get(key, key)
    if key not in PROFILES:
        raise SettingsError(f"Unknown hardware profile '{name}'. Choose one of: {', '.join(PROFILES)} "
                            "(or measure the cluster size with the latency staircase probe).")
    return PROFILES[key]


def cluster_size(profile: str) -> int:
    """The cluster size of a named profile (``ncs2``/``MYRIAD`` -> 8, ``cpu-avx512`` -> 16, ``none`` -> 1)."""
    return get_profile(profile).cluster


# ----------------------------------------------------------------------------- CPU detection


@dataclass
class CpuDetection:
    profile: str
    cluster: int
    reason: str
    cpu_name: str = ""
    flags: list[str] = field(default_factory=list)
    openvino_capabilities: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _cpuinfo_flags(path: str = "/proc/cpuinfo") -> tuple[set[str], str]:
    flags: set[str] = set()
    name = ""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return flags, name
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features") and not flags:  # x86 "flags", ARM "Features"
            flags = set(value.split())
        elif key == "model name" and not name:
            name = value.strip()
    return flags, name


def detect_cpu_profile() -> CpuDetection:
    """Suggest a CPU profile from the CPU's vector extensions (/proc/cpuinfo, else OpenVINO's device name)."""
    flags, name = _cpuinfo_flags()
    caps: list[str] = []
    try:
        import openvino as ov

        core = ov.Core()
        caps = list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
        name = name or str(core.get_property("CPU", "FULL_DEVICE_NAME"))
    except Exception:  # OpenVINO missing or without a CPU device: the flags still decide
        pass
    vector_flags = sorted(f for f in flags if f.startswith(("avx", "sse4", "asimd", "neon", "fma")))
    if "avx512f" in flags:
        profile, why = "cpu-avx512", "the CPU reports avx512f (512-bit vectors: 16 FP32 lanes)"
    elif "avx2" in flags:
        profile, why = "cpu-avx2", "the CPU reports avx2 (256-bit vectors: 8 FP32 lanes)"
    elif flags & {"sse4_1", "sse4_2", "asimd", "neon"}:
        profile, why = "cpu-sse", "the CPU has 128-bit vectors only (SSE4 / NEON: 4 FP32 lanes)"
    elif platform.machine().lower() in ("arm64", "aarch64"):
        profile, why = "cpu-sse", f"{platform.machine()} CPU (NEON, 128-bit vectors: 4 FP32 lanes)"
    else:
        profile, why = "cpu-avx2", "the CPU's vector extensions could not be read; assuming AVX2, the common case"
    return CpuDetection(profile, PROFILES[profile].cluster, why, name, vector_flags, caps)


# ----------------------------------------------------------------------------- latency staircase probe


@dataclass
class StaircaseResult:
    cluster: int
    channels: list[int]
    latency_ms: list[float]  # median per channel count
    latency_p25_ms: list[float]
    latency_p75_ms: list[float]
    method: str
    fit_error: dict[int, float]  # candidate step -> plateau score (within-group spread / jump; low = staircase)
    confidence: float  # 0..1: how clearly the chosen width's plateaus stand out
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fit_error"] = {str(k): v for k, v in self.fit_error.items()}
        return d


def _conv_model(in_channels: int, out_channels: int, spatial: int, seed: int = 0):
    import openvino as ov
    from openvino import opset10 as ops

    rng = np.random.default_rng(seed)
    x = ops.parameter([1, in_channels, spatial, spatial], np.float32, name="input")
    w = ops.constant((rng.standard_normal((out_channels, in_channels, 3, 3)) * 0.05).astype(np.float32))
    conv = ops.convolution(x, w, [1, 1], [1, 1], [1, 1], [1, 1])
    return ov.Model([conv], [x], f"conv3x3_{in_channels}_{out_channels}")


MAX_PLATEAU_RATIO = 0.35


def fit_staircase(channels: list[int], latency: list[float], candidates: list[int] | None = None
                  ) -> tuple[int, dict[int, float], float]:
    """The widest step that explains latency vs channel count as flat plateaus with jumps between them.

    For each candidate width k the samples are grouped by ``ceil(c / k)`` (channel counts that round
    up to the same multiple of k). Under a staircase of width k each group is a plateau: its spread
    (max - min) is only noise, small next to the jumps between consecutive group means. The score is
    median group spread / median |jump|; a too-coarse k puts a real jump inside its groups (score
    about 0.5 or more), a smooth rise with no stairs scores 0.5 or more for every k. The widest k
    with score <= 0.35 wins; none means no plateau wider than the sampling step (returned as k).
    Medians keep one odd kernel choice (oneDNN switches algorithms at some widths) from deciding.
    Returns (k, score per candidate, confidence in 0..1).
    """
    c = np.asarray(channels, dtype=float)
    y = np.asarray(latency, dtype=float)
    if len(c) < 6:
        raise SettingsError("The staircase probe needs at least 6 channel counts.")
    order = np.argsort(c)
    c, y = c[order], y[order]
    step = int(np.min(np.diff(c))) or 1
    span = c.max() - c.min()
    if candidates is None:
        candidates = [k for k in (2, 4, 8, 16, 32, 64) if k > step and 3 * k <= span + step]
    scores: dict[int, float] = {}
    for k in candidates:
        groups = np.ceil(c / k)
        levels, spreads = [], []
        for g in np.unique(groups):
            members = y[groups == g]
            if len(members) >= 2:
                spreads.append(float(members.max() - members.min()))
            levels.append(float(np.median(members)))
        jumps = np.abs(np.diff(levels))
        if not spreads or len(jumps) < 2 or float(np.median(jumps)) <= 0:
            scores[k] = float("inf")
            continue
        scores[k] = float(np.median(spreads) / np.median(jumps))
    accepted = [k for k, v in scores.items() if v <= MAX_PLATEAU_RATIO]
    if not accepted:
        best_other = min(scores.values()) if scores else float("inf")
        confidence = float(min(1.0, max(0.0, (best_other - MAX_PLATEAU_RATIO) / MAX_PLATEAU_RATIO))) if np.isfinite(best_other) else 1.0
        return step, scores, confidence
    best = max(accepted)
    confidence = float(max(0.0, 1.0 - scores[best] / MAX_PLATEAU_RATIO))
    return int(best), scores, confidence


def latency_staircase(in_channels: int = 64, spatial: int = 32, channel_counts=None, runs: int = 40,
                      warmup: int = 3, threads: int = 1, seed: int = 0) -> StaircaseResult:
    """Measure the latency staircase of one 3x3 convolution on the OpenVINO CPU runtime.

    One convolution ``in_channels -> c`` at ``spatial x spatial`` is compiled for every output width c
    in ``channel_counts`` (default 8..128 in steps of 4); all are then timed in alternation (each
    round runs every width once, in shuffled order) so machine noise hits all widths alike, and the
    median per width is kept. The step width is found by :func:`fit_staircase`. One inference thread
    by default: several threads split the channels between cores, which adds steps of their own.
    """
    channels = sorted(int(c) for c in (channel_counts if channel_counts is not None else range(8, 129, 4)))
    if len(channels) < 6 or channels[0] < 1:
        raise SettingsError("Give at least 6 positive output-channel counts for the staircase probe.")
    compiled = [compile_cpu(_conv_model(in_channels, c, spatial, seed), threads) for c in channels]
    times = time_interleaved(compiled, (1, in_channels, spatial, spatial), runs=runs, warmup=warmup, seed=seed)
    med = [float(statistics.median(t)) for t in times]
    p25 = [float(np.percentile(t, 25)) for t in times]
    p75 = [float(np.percentile(t, 75)) for t in times]
    best, errors, confidence = fit_staircase(channels, med)
    step = min(np.diff(channels))
    if best <= step:
        note = (f"no plateau wider than the sampling step of {step} channels: latency rises with every sample, "
                f"so the step is {step} channels or finer")
    else:
        note = f"latency stays flat within groups of {best} output channels and jumps between them"
    method = (f"one 3x3 convolution {in_channels}->c channels at {spatial}x{spatial}, c = {channels[0]}..{channels[-1]} "
              f"step {step}, OpenVINO CPU, {threads} thread(s), median of {runs} interleaved runs; plateau test "
              f"(median spread within groups of k / median jump between them, <= {MAX_PLATEAU_RATIO} is a staircase) "
              f"for k in {sorted(errors)}: {', '.join(f'{k}: {v:.2f}' for k, v in sorted(errors.items()))}; "
              f"cluster {best} (confidence {confidence:.2f}): {note}.")
    return StaircaseResult(best, channels, med, p25, p75, method, errors, confidence,
                           {"in_channels": in_channels, "spatial": spatial, "runs": runs, "threads": threads})
