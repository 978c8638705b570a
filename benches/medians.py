#!/usr/bin/env python3
"""Medians per configuration and operation of load-tool result lines.

Each line is a label, then a line of `vcn bench`'s table (operation,
calls/s, p50, p99, p999, max, floor, errors, declined, server us, engine
us), as benches/ab.sh and benches/pinned.sh collect them.

usage: benches/medians.py FILE
"""
import collections, statistics as st, sys
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    f = line.split()
    # label op calls/s p50 p99 p999 max floor errors declined srv_us eng_us
    rows[(f[0], f[1])].append((float(f[2]), float(f[4]), f[7], f[8], float(f[10]), float(f[11])))
for (label, op), v in sorted(rows.items(), key=lambda x: (x[0][1], x[0][0])):
    print(f"{op:14} {label:10} calls/s {st.median(x[0] for x in v):8.0f}"
          f"  p99 ms {st.median(x[1] for x in v):6.2f}  floor {[x[2] for x in v]}"
          f"  errors {sum(int(x[3]) for x in v)}"
          f"  server us/call {st.median(x[4] for x in v):5.0f} {[int(x[4]) for x in v]}"
          f"  engine {st.median(x[5] for x in v):4.0f}")
