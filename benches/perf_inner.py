#!/usr/bin/env python3
"""Where one thread group's samples are, by the innermost frame of ours.

Reads `perf script -F comm,tid,ip,sym --no-inline` output of a recording
made with --call-graph dwarf, keeps the samples of threads whose name
starts with COMM (vcn-server, vcn-committer, fjall:worker, vcn-bench-load),
and gives each to the innermost frame matching PATTERN (default `vcn::`,
our own code), or to "(none)" when no frame matches (the gRPC stack, tokio,
the kernel, for the server's threads). Prints each such frame's share of
the group's samples and, under it, the leaf functions it spent them in.
Session 15 used it for the ceilings in BENCHMARKS.md.

usage: perf_inner.py SCRIPT.txt COMM [PATTERN]
"""
import collections
import re
import sys


def main():
    path, comm = sys.argv[1], sys.argv[2]
    pattern = re.compile(sys.argv[3] if len(sys.argv) > 3 else r"vcn::")
    inner = collections.Counter()
    leaves = collections.defaultdict(collections.Counter)
    n = 0
    for sample in open(path).read().split("\n\n"):
        lines = [l.strip() for l in sample.strip().split("\n") if l.strip()]
        if not lines or not lines[0].startswith(comm):
            continue
        n += 1
        frames = [l.split(" ", 1)[1] if " " in l else l for l in lines[1:]]
        leaf = frames[0] if frames else "?"
        who = next((f for f in frames if pattern.search(f)), "(none)")
        who = re.sub(r"::\{\{closure\}\}", "", who)[:150]
        inner[who] += 1
        leaves[who][leaf[:80]] += 1
    print(n, "samples")
    for who, c in inner.most_common(40):
        print(f"{100 * c / n:5.1f}% {who}")
        for leaf, c2 in leaves[who].most_common(4):
            print(f"        {100 * c2 / n:4.1f}% {leaf}")


if __name__ == "__main__":
    main()
