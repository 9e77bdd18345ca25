"""A small PTX interpreter for the inline assembly of bitsmith's kernels, from the PTX manual's
definitions: an independent reading of the programs for CI, where no GPU runs them."""
from __future__ import annotations


def run_ptx(ptx: str, regs: dict) -> dict:
    """Run the PTX that :func:`bitsmith.kernels.small_m._lut8_ptx`, ``_magic_pair_ptx``,
    ``lut_pair_ptx`` and :mod:`bitsmith.kernels.fragment_mma`'s conversions write (``shr``,
    ``and``, ``or``, ``prmt`` ``.b32`` in prmt's default mode, ``lop3.b32``, ``mov.b32`` of a value
    and ``{a, b}``, ``cvt.f32.f16``). ``regs``: register name -> value (the operands, e.g. ``$8``
    the word and ``$9..$16`` the planes of ``_lut8_ptx``); returns every register afterwards."""
    import numpy as np

    def val(tok):
        tok = tok.strip()
        return regs[tok] if tok in regs else int(tok, 0)

    for line in ptx.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        if op == "mov.b32" and not rest.startswith("{"):
            dst, src = (t.strip() for t in rest.split(","))
            regs[dst] = val(src)
            continue
        if op == "mov.b32":
            dst, src = rest.split("},")
            lo, hi = (t.strip() for t in dst.strip(" {").split(","))
            regs[lo], regs[hi] = val(src) & 0xFFFF, val(src) >> 16
            continue
        dst, *srcs = (t.strip() for t in rest.split(","))
        if op == "shr.b32":
            regs[dst] = val(srcs[0]) >> val(srcs[1])
        elif op == "and.b32":
            regs[dst] = val(srcs[0]) & val(srcs[1])
        elif op == "or.b32":
            regs[dst] = val(srcs[0]) | val(srcs[1])
        elif op == "prmt.b32":
            src8 = [(val(srcs[0]) >> (8 * i)) & 0xFF for i in range(4)] + [(val(srcs[1]) >> (8 * i)) & 0xFF for i in range(4)]
            out = 0
            for j in range(4):
                sel = (val(srcs[2]) >> (4 * j)) & 0xF
                byte = src8[sel & 7] if sel < 8 else (0xFF if src8[sel & 7] & 0x80 else 0)  # msb set: sign replication
                out |= byte << (8 * j)
            regs[dst] = out
        elif op == "lop3.b32":  # bit i of the result: bit (a_i b_i c_i) of the lookup table
            a, b, c, lut = (val(t) for t in srcs)
            regs[dst] = sum(((lut >> ((((a >> i) & 1) << 2) | (((b >> i) & 1) << 1) | ((c >> i) & 1))) & 1) << i
                            for i in range(32))
        elif op == "cvt.f32.f16":
            regs[dst] = float(np.array([val(srcs[0])], dtype=np.uint16).view(np.float16)[0])
        else:
            raise AssertionError(f"unknown PTX instruction {op}")
    return regs
