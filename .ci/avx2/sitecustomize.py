"""Loaded by every Python process that .ci/as-avx2 starts: /proc/cpuinfo reads as an AVX2-only CPU's
(AMD EPYC Zen 2: no AVX-512, no VNNI, no native bf16), for what the sidecar decides from it."""

import pathlib

_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7R32 (emulated by .ci/as-avx2)
flags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2 bmi2

processor\t: 1
model name\t: AMD EPYC 7R32 (emulated by .ci/as-avx2)
"""
_read_text = pathlib.Path.read_text


def _read_text_as_avx2(self: pathlib.Path, *args: object, **kwargs: object) -> str:
    if str(self) == "/proc/cpuinfo":
        return _CPUINFO
    return _read_text(self, *args, **kwargs)


pathlib.Path.read_text = _read_text_as_avx2
