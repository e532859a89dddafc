"""Compare two ``python -m tnlib gpu-check`` outputs configuration by configuration (no GPU needed).

Each configuration row (kernel, configuration, dtype, the launches that use it) of the "before" file is
matched with the same row of the "after" file, and their shared memory, registers and spill stores are
compared. A configuration's words are compared as a set (their order follows the kernel's parameter
order); ``--ignore KERNEL:WORD`` drops a word that only one side prints (e.g. ``segment_state:SCALE_C``,
a flag that was hard-coded in the kernel before and is a launch argument after). ``--skip WORD`` leaves out the
configurations that print WORD (e.g. ``VARLEN``: launches the "after" side adds), ``--ignore-uses`` the column
of the launches that use a configuration (which grows when new launches share an old configuration).

Usage: python3 tools/compare_gpu_check.py BEFORE.txt AFTER.txt [--ignore segment_state:SCALE_C] [--skip VARLEN]
       [--ignore-uses]
Exit status 0 when every row matches and nothing differs, 1 otherwise.
"""
from __future__ import annotations

import argparse
import re
import sys
from collections import Counter

ROW = re.compile(r"^(\S+)\s{2,}(.+?)\s{2,}(\w+)\s+([\d,]+)\s+(\d+)\s+(\d+)\s+(yes|NO)\s+(.*)$")


def rows(path: str, ignore: set, skip: set = frozenset(), ignore_uses: bool = False) -> Counter:
    """``(kernel, config words, dtype, uses) -> (shared, registers, spills)`` multiset of a gpu-check output."""
    out = Counter()
    with open(path) as f:
        for line in f:
            m = ROW.match(line.rstrip("\n"))
            if not m or m.group(1) == "kernel":
                continue
            kernel, config, dtype, shared, regs, spills, _, uses = m.groups()
            if skip & set(config.split()):
                continue
            words = frozenset(w for w in config.split() if (kernel, w) not in ignore)
            uses = "" if ignore_uses else uses.strip()
            out[(kernel, words, dtype, uses, int(shared.replace(",", "")), int(regs), int(spills))] += 1
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--ignore", action="append", default=[], metavar="KERNEL:WORD")
    ap.add_argument("--skip", action="append", default=[], metavar="WORD")
    ap.add_argument("--ignore-uses", action="store_true")
    a = ap.parse_args(argv)
    ignore = {tuple(x.split(":", 1)) for x in a.ignore}
    b, af = (rows(p, ignore, set(a.skip), a.ignore_uses) for p in (a.before, a.after))
    same = sum((b & af).values())
    only_b, only_a = b - af, af - b
    print(f"{a.before}: {sum(b.values())} configurations; {a.after}: {sum(af.values())}; "
          f"identical (shared memory, registers, spills): {same}")
    for label, extra in (("only before", only_b), ("only after", only_a)):
        for (kernel, words, dtype, uses, shared, regs, spills), n in sorted(extra.items(), key=str):
            print(f"  {label}: {kernel} {' '.join(sorted(words))} {dtype}: shared {shared:,} B, {regs} registers, "
                  f"{spills} B spilled ({uses}){f' x{n}' if n > 1 else ''}")
    return 0 if not only_b and not only_a else 1


if __name__ == "__main__":
    sys.exit(main())
