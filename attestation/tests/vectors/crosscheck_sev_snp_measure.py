#!/usr/bin/env python3
"""Second, independent check of launch_digest.txt: recomputes every vector
with the GCTX class of the `sev-snp-measure` package (pip install
sev-snp-measure; IBM's implementation of the same spec section) and compares.
Run: python3 crosscheck_sev_snp_measure.py  (exit 0 = all vectors agree)
"""
import os
import sys

from sevsnpmeasure.gctx import GCTX

PAGE = 4096
ramp = bytes(i % 251 for i in range(PAGE))


def run(pages):
    g = GCTX()
    for gpa, t, c in pages:
        if t == 1:
            g.update_normal_pages(gpa, c)
        elif t == 2:
            assert gpa == GCTX.VMSA_GPA
            g.update_vmsa_page(c)
        elif t == 3:
            g.update_zero_pages(gpa, PAGE)
        elif t == 4:
            g.update_unmeasured_pages(gpa, PAGE)
        elif t == 5:
            g.update_secrets_page(gpa)
        elif t == 6:
            g.update_cpuid_page(gpa)
    return g.hex_ld()


V = GCTX.VMSA_GPA
vectors = {
    "one_normal": [(0x1000, 1, bytes([0xAB]) * PAGE)],
    "mixed": [
        (0x1000, 1, ramp),
        (0x2000, 3, None),
        (0x3000, 1, bytes(PAGE)),
        (0x100000, 1, bytes([0x5A]) * PAGE),
    ],
    "with_vmsa": [(0x1000, 1, ramp), (V, 2, bytes([0x11]) * PAGE)],
    "all_types": [
        (0x0, 1, ramp),
        (0x5000, 3, None),
        (0x6000, 4, None),
        (0x7000, 5, None),
        (0x8000, 6, None),
        (0x7FFFF000, 1, bytes([0xFF]) * PAGE),
        (V, 2, ramp),
    ],
}
here = os.path.dirname(os.path.abspath(__file__))
want = {}
for line in open(os.path.join(here, "launch_digest.txt")):
    if line.strip() and not line.startswith("#"):
        name, h = line.split()
        want[name] = h
bad = 0
for name, pages in vectors.items():
    got = run(pages)
    ok = want.get(name) == got
    bad += not ok
    print(("ok  " if ok else "DIFF"), name, got)
if set(want) != set(vectors):
    print("vector sets differ", sorted(want), sorted(vectors))
    bad += 1
sys.exit(1 if bad else 0)
