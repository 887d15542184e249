#!/usr/bin/env python3
"""compare.py DIRECT REPORT... : per case, whether each agent's result (behavior,
behaviorClose, remote close code) is one the direct agent gave. Each argument is an
index.json of wstest's fuzzingclient holding the agents named; results of several runs
(reruns of the cases that differed) are pooled, so a case whose direct result itself
varies from run to run (timing) passes if the results through the edge are among the
direct ones. Prints a summary and every differing case; exit 1 if any differs.

usage: compare.py --direct AGENT --through AGENT[,AGENT] index.json [index.json ...]
       compare.py ... --differing   (prints only the comma-separated differing cases)"""
import argparse, collections, json, sys

p = argparse.ArgumentParser()
p.add_argument("--direct", required=True)
p.add_argument("--through", required=True)
p.add_argument("--differing", action="store_true")
p.add_argument("reports", nargs="+")
a = p.parse_args()
through = a.through.split(",")
seen = collections.defaultdict(lambda: collections.defaultdict(set))
for path in a.reports:
    for agent, cases in json.load(open(path)).items():
        for case, v in cases.items():
            seen[agent][case].add((v["behavior"], v["behaviorClose"], v.get("remoteCloseCode")))
key = lambda c: [int(x) for x in c.split(".")]
direct = seen[a.direct]
differing = []
for case in sorted(direct, key=key):
    for agent in through:
        got = seen[agent].get(case)
        if got is None or not (got & direct[case]):
            differing.append((case, agent, sorted(direct[case], key=str), sorted(got or [], key=str)))
if a.differing:
    print(",".join(sorted({c for c, *_ in differing}, key=key)))
    sys.exit(0)
for agent in [a.direct] + through:
    counts = collections.Counter(min(r, key=str)[0] for r in seen[agent].values())
    print(f"  {agent}: {len(seen[agent])} cases, {dict(sorted(counts.items()))}")
for case, agent, d, g in differing:
    print(f"  DIFFERS {case}: direct {d}, {agent} {g}")
print(f"  {len(differing)} differing (case, agent) pairs over {len(direct)} cases")
sys.exit(1 if differing else 0)
