#!/usr/bin/env python3
"""Where a bench run's time went: reads `kubectl get -o json` lists (projects,
Jobs and/or pods) on stdin and a start time (epoch seconds) as argv[1], and prints
for each stage when 50%, 90% and 100% of the objects had reached it, in
seconds after the start (API timestamps have whole seconds)."""
import json
import sys
from datetime import datetime


def ts(s):
    # API timestamps have whole seconds; the operator's admitted-at annotation may have a fraction.
    return datetime.strptime(s.split(".")[0].rstrip("Z") + "Z", "%Y-%m-%dT%H:%M:%SZ").timestamp() if s else None


def cond(o, type_):
    for c in (o.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_ and c.get("status") == "True":
            return c.get("lastTransitionTime")
    return None


def stages(o):
    meta, status = o["metadata"], o.get("status") or {}
    if o["kind"] == "ModelProject":
        return {"project created": meta.get("creationTimestamp"), "project admitted": status.get("admittedAt")}
    if o["kind"] == "Job":
        admitted = (meta.get("annotations") or {}).get("sovereign.ai/admitted-at")
        return {"Job created": meta.get("creationTimestamp"), "Job admitted": admitted}
    return {
        "pod created": meta.get("creationTimestamp"),
        "pod scheduled": cond(o, "PodScheduled"),
        "pod ready": cond(o, "Ready"),
    }


t0 = float(sys.argv[1])
seen = {}
for line in sys.stdin.read().split("\n---\n"):
    if not line.strip():
        continue
    for o in json.loads(line)["items"]:
        o.setdefault("kind", "Pod" if "containers" in o.get("spec", {}) else "ModelProject")
        for stage, t in stages(o).items():
            seen.setdefault(stage, []).append(ts(t))
for stage, times in seen.items():
    done = sorted(t - t0 for t in times if t is not None)
    if not done:
        print(f"  {stage}: none")
        continue
    at = lambda q: done[min(len(done) - 1, max(0, int(q * len(times) + 0.999) - 1))]
    print(f"  {stage}: {len(done)}/{len(times)}; 50% at {at(0.5):.0f} s, 90% at {at(0.9):.0f} s, last at {done[-1]:.0f} s")
