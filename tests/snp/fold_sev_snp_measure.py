#!/usr/bin/env python3
"""Folds a bubble's launch page list with IBM's `sev-snp-measure` package
(pip install sev-snp-measure), an implementation of the AMD SEV-SNP launch
digest that nobody in this project wrote, and prints the digest (hex).

Input (JSON file, argv[1]): {"pages": [...]} in load order, each one of
  {"type": "normal", "gpa": N, "data": HEX}        (whole pages)
  {"type": "zero" | "unmeasured", "gpa": N, "length": N}
  {"type": "secrets" | "cpuid", "gpa": N}
  {"type": "vmsa", "fields": {NAME: VALUE, ...}, "data": HEX}
For the VMSA the page is built here from the named fields with the
package's own SEV-ES save-area structure (`vmsa.SevEsSaveArea`), so the
save-area layout is checked too: the script fails (exit 1) if the page
given in "data" differs from it. Segment fields are [selector, attrib,
limit, base].
"""
import json
import sys

from sevsnpmeasure.gctx import GCTX
from sevsnpmeasure.vmsa import SevEsSaveArea, VmcbSeg

SEGMENTS = {"es", "cs", "ss", "ds", "fs", "gs", "gdtr", "ldtr", "idtr", "tr"}


def vmsa_page(fields):
    area = SevEsSaveArea()
    for name, value in fields.items():
        if name in SEGMENTS:
            setattr(area, name, VmcbSeg(*value))
        else:
            setattr(area, name, value)
    page = bytes(area)
    assert len(page) == 4096, len(page)
    return page


def main():
    spec = json.load(open(sys.argv[1]))
    g = GCTX()
    for p in spec["pages"]:
        t = p["type"]
        if t == "normal":
            g.update_normal_pages(p["gpa"], bytes.fromhex(p["data"]))
        elif t == "zero":
            g.update_zero_pages(p["gpa"], p["length"])
        elif t == "unmeasured":
            g.update_unmeasured_pages(p["gpa"], p["length"])
        elif t == "secrets":
            g.update_secrets_page(p["gpa"])
        elif t == "cpuid":
            g.update_cpuid_page(p["gpa"])
        elif t == "vmsa":
            page = vmsa_page(p["fields"])
            given = bytes.fromhex(p["data"])
            if page != given:
                diff = [hex(i) for i in range(4096) if page[i] != given[i]]
                print("VMSA differs from sev-snp-measure's at", diff[:16], file=sys.stderr)
                sys.exit(1)
            g.update_vmsa_page(page)
        else:
            print("unknown page type", t, file=sys.stderr)
            sys.exit(1)
    print(g.hex_ld())


if __name__ == "__main__":
    main()
