"""The int8 weight range ONNX Runtime's quantizers use on a CPU: 8 bits where its int8 kernels compute exactly
(VNNI/AMX, or off x86), 7 bits (`reduce_range`) on an x86 CPU without them, where 8-bit weights would saturate.
The CPU's features are read by worker/engine/cpu.py; the choice is recorded in the quantize step's report."""

from __future__ import annotations

import platform


def int8_kernel(flags: frozenset[str] | set[str] | None, machine: str | None = None) -> dict:
    """The int8 weight range to quantize with for a CPU with these flags (None: unknown) and architecture.

    ONNX Runtime's u8s8 kernels (uint8 activations x int8 weights, both quantizers' form here) are exact where the
    CPU has VNNI (avx512_vnni, avx_vnni) or AMX: products accumulate in int32. Without them, on x86, they use
    vpmaddubsw, which adds each pair of u8 x s8 products in a saturating int16: with 8-bit weights a pair can
    reach 2 x 255 x 128 and clips, and the quantized model drifts (measured on an AVX2-only EPYC: the tests'
    tiny BERT, dynamic int8, agreed 0.947 with the float model, 0.997 with exact arithmetic; a trained ResNet,
    static QDQ, 0.925 against 1.0). 7-bit weights (`reduce_range`, [-64, 64]) keep every pair in range
    (2 x 255 x 64 < 32768) on the same kernels, as fast (same ResNet, b32, one thread: 4.06 against 3.81 ms and
    4.97 against 5.12 ms, two runs); int8 activations (s8s8) were no cure (ONNX Runtime shifts them to u8 on x86:
    same drift, 1.8x slower) and uint8 weights (u8u8) were exact but 1.4x slower. So: 8-bit weights with VNNI/AMX
    or off x86, 7-bit on an x86 CPU without them (or whose flags cannot be read). Returns the step report's
    `int8_kernel`: {"cpu_features", "vnni", "reduce_range", "reason"}."""
    from worker.engine.cpu import VNNI_FEATURES, int8_features, is_x86

    features = int8_features(flags)
    vnni = sorted(VNNI_FEATURES & set(flags or ()))
    if not is_x86(machine):
        return {"cpu_features": features, "vnni": False, "reduce_range": False,
                "reason": f"not an x86 CPU ({machine or platform.machine()}): ONNX Runtime's int8 kernels there do "
                          "not saturate; 8-bit weights"}
    if vnni:
        return {"cpu_features": features, "vnni": True, "reduce_range": False,
                "reason": f"{'/'.join(vnni)}: ONNX Runtime's u8s8 kernels accumulate in int32, exact with 8-bit "
                          "weights (a model quantized so may drift on a CPU without VNNI)"}
    known = "CPU flags unreadable: assumed without VNNI" if flags is None else \
        "no VNNI (avx512_vnni/avx_vnni) or AMX"
    return {"cpu_features": features, "vnni": False, "reduce_range": True,
            "reason": f"{known}: ONNX Runtime's u8s8 kernels add pairs of u8 x s8 products in a saturating int16 "
                      "(vpmaddubsw), which 8-bit weights overflow; 7-bit weights (reduce_range) are exact there, "
                      "at the same speed"}


def host_int8_kernel() -> dict:
    """int8_kernel for this host (its /proc/cpuinfo flags)."""
    from worker.engine.cpu import host_flags

    return int8_kernel(host_flags())


def int8_kernel_note(kernel: dict) -> str:
    """The step note that records int8_kernel's choice."""
    from worker.engine.cpu import INT8_FEATURES

    features = " ".join(kernel["cpu_features"]) or "none of " + "/".join(INT8_FEATURES)
    bits = "7-bit weights (reduce_range)" if kernel["reduce_range"] else "8-bit weights"
    return f"int8 kernels (ONNX Runtime): CPU features {features}: {bits}: {kernel['reason']}"
