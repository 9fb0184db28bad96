#!/usr/bin/env python3
"""The seeded Gaussian noise of docs/protocol.md section 8, reimplemented in plain Python.

It must give the same f32 bits as `diffusionx_diffusion::gaussian_noise`: only integer arithmetic
modulo 2**64 and correctly rounded IEEE binary64 operations (+ - * / sqrt) are used, so the result
cannot depend on a platform's libm. Python floats are binary64 and CPython never fuses a*b+c.

    python3 noise.py            # writes ../tests/fixtures/noise.json, prints the goldens
"""

import json
import math
import pathlib
import struct

MASK = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15
M1 = 0xBF58476D1CE4E5B9
M2 = 0x94D049BB133111EB


def f64(bits):
    return struct.unpack("<d", struct.pack("<Q", bits))[0]


def bits64(x):
    return struct.unpack("<Q", struct.pack("<d", x))[0]


def f32_bits(x):
    """The binary32 nearest to binary64 `x` (ties to even), as its u32 bit pattern."""
    return struct.unpack("<I", struct.pack("<f", x))[0]


SQRT2 = f64(0x3FF6A09E667F3BCD)
LN2_HI = f64(0x3FE62E42FEE00000)
LN2_LO = f64(0x3DEA39EF35793C76)
LG1 = f64(0x3FE5555555555593)
LG2 = f64(0x3FD999999997FA04)
LG3 = f64(0x3FD2492494229359)
LG4 = f64(0x3FCC71C51D8E78AF)
LG5 = f64(0x3FC7466496CB03DE)
LG6 = f64(0x3FC39A09D078C69F)
LG7 = f64(0x3FC2F112DF3E5244)
TWO_POW_M52 = f64(0x3CB0000000000000)


def mix64(z):
    z = ((z ^ (z >> 30)) * M1) & MASK
    z = ((z ^ (z >> 27)) * M2) & MASK
    return z ^ (z >> 31)


def ln(x):
    """Natural log of a positive normal binary64 (fdlibm's reduction and polynomial)."""
    b = bits64(x)
    k = ((b >> 52) & 0x7FF) - 1023
    m = f64((b & 0x000FFFFFFFFFFFFF) | 0x3FF0000000000000)
    if m > SQRT2:
        m = m * 0.5
        k += 1
    f = m - 1.0
    s = f / (2.0 + f)
    z = s * s
    w = z * z
    t1 = w * (LG2 + w * (LG4 + w * LG6))
    t2 = z * (LG1 + w * (LG3 + w * (LG5 + w * LG7)))
    r = t2 + t1
    hfsq = 0.5 * f * f
    dk = float(k)
    return dk * LN2_HI - ((hfsq - (s * (hfsq + r) + dk * LN2_LO)) - f)


class Generator:
    def __init__(self, seed, stream):
        self.state = mix64((seed ^ mix64(stream & MASK)) & MASK)

    def next_u64(self):
        self.state = (self.state + GAMMA) & MASK
        return mix64(self.state)

    def uniform(self):
        """A value in [-1, 1): the top 53 bits scaled by 2**-52, minus 1 (all exact)."""
        return float(self.next_u64() >> 11) * TWO_POW_M52 - 1.0

    def pair(self):
        while True:
            u = self.uniform()
            v = self.uniform()
            s = u * u + v * v
            if 0.0 < s < 1.0:
                break
        factor = math.sqrt(-2.0 * ln(s) / s)
        return u * factor, v * factor


def gaussian_noise_bits(seed, stream, n):
    """`n` standard normal values as binary32 bit patterns, in fill order."""
    gen = Generator(seed, stream)
    out = []
    while len(out) < n:
        z0, z1 = gen.pair()
        out.append(f32_bits(z0))
        if len(out) < n:
            out.append(f32_bits(z1))
    return out


def gaussian_noise(seed, stream, n):
    """`n` standard normal values as Python floats holding binary32 values."""
    return [struct.unpack("<f", struct.pack("<I", b))[0] for b in gaussian_noise_bits(seed, stream, n)]


CASES = [(0, 0, 16), (42, 0, 16), (42, 1, 16), (42, 1003, 16), (2**64 - 1, 7, 9), (123456789, 0, 257)]


def main():
    cases = []
    for seed, stream, n in CASES:
        bits = gaussian_noise_bits(seed, stream, n)
        cases.append({"seed": str(seed), "stream": stream, "bits": bits})
        print(seed, stream, [hex(b) for b in bits[:4]])
    path = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "noise.json"
    path.write_text(json.dumps({"generator": "diffusion/reference/noise.py", "cases": cases}) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
