#!/usr/bin/env python3
"""Server CPU per call, split by thread and by what the samples were in.

Two `perf script` outputs (recorded with --call-graph dwarf at 499 Hz while
`vcn bench` ran one operation) and the calls/s each run printed; prints the
microseconds of server CPU per call in each (thread, part), side by side.
The load tool's own thread is left out. A sample goes to the first part
whose pattern matches any frame of its stack, in the order below.

usage: perf_split.py A.txt A_CALLS_PER_S B.txt B_CALLS_PER_S [SECONDS] [HZ]
"""
import collections
import re
import sys

PARTS = [
    ("sealer", r"vcn::audit::Sealer"),
    ("recorder", r"vcn::audit::Recorder|vcn::audit::Entry"),
    ("journal", r"vcn::audit::journal"),
    ("sled in update()", r"SledStore as vcn::vault::store::Store>::update|SledStore::stage"),
    ("sled apply_batch", r"sled::.*apply_batch"),
    ("sled flush", r"sled::.*flush"),
    ("sled other", r"sled::"),
    ("decide", r"Vault::decide"),
    ("vault other", r"vcn::vault"),
    ("hyper/h2/tonic", r"h2::|hyper::|tonic::"),
    ("tokio", r"tokio::"),
    ("kernel", r"\[kernel"),
]


def split(path, calls_per_s, seconds, hz):
    counts = collections.Counter()
    for sample in open(path).read().split("\n\n"):
        lines = [l.strip() for l in sample.strip().split("\n") if l.strip()]
        if len(lines) < 2:
            continue
        thread = re.sub(r"-\d+$", "", lines[0].split()[0])
        if thread == "vcn-bench-load":
            continue
        stack = "\n".join(lines[1:])
        part = next((name for name, p in PARTS if re.search(p, stack)), "other")
        counts[(thread, part)] += 1
    calls = calls_per_s * seconds
    return {k: n * 1e6 / hz / calls for k, n in counts.items()}


def main():
    a_path, a_calls, b_path, b_calls = sys.argv[1:5]
    seconds = float(sys.argv[5]) if len(sys.argv) > 5 else 8.0
    hz = float(sys.argv[6]) if len(sys.argv) > 6 else 499.0
    a = split(a_path, float(a_calls), seconds, hz)
    b = split(b_path, float(b_calls), seconds, hz)
    print(f"{'us of server CPU per call':44} {'A':>7} {'B':>7} {'A-B':>7}")
    for k in sorted(set(a) | set(b), key=lambda k: -a.get(k, 0)):
        x, y = a.get(k, 0), b.get(k, 0)
        if max(x, y) >= 0.5:
            print(f"{k[0] + ' / ' + k[1]:44} {x:7.1f} {y:7.1f} {x - y:7.1f}")
    print(f"{'total':44} {sum(a.values()):7.1f} {sum(b.values()):7.1f}")


if __name__ == "__main__":
    main()
