#!/usr/bin/env python3
"""Prints the table of a `scripts/bench.sh` run from the SUMMARY lines it kept.

Usage: bench_report.py OUT_DIR P99_MS "tasks epoll"

Run names are WORKLOAD.SERVER.CLIENT (fanout_a.split.tasks); every figure of a ratio comes
from the same run of the benchmark.
"""
import json
import os
import sys

out, p99, clients = sys.argv[1], sys.argv[2], sys.argv[3].split()
cores = os.cpu_count() or 1


def load(name):
    try:
        with open(os.path.join(out, name + ".json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def best(name):
    """Deliveries/s of the best passing step, or None."""
    s = load(name)
    return ((s or {}).get("best") or {}).get("achieved_per_s")


def described(name):
    s = load(name)
    if not s:
        return "n/a"
    b = s.get("best")
    if not b:
        return "no step passed"
    return f"{b['achieved_per_s']:,.0f}/s (p99 {b['p99_ms']:.0f} ms)"


def ratio(num, den):
    a, b = best(num), best(den)
    if a is None or b is None:
        which = num if a is None else den
        return f"n/a ({which.split('.')[1]}: {described(which)})"
    return f"{100 * a / b:.0f}% ({a:,.0f} / {b:,.0f})"


def subs(workload):
    for server in ("embedded", "split", "bare"):
        for client in clients:
            s = load(f"{workload}.{server}.{client}")
            if s:
                return s.get("subscribers"), s.get("topics")
    return "?", "?"


a, _ = subs("fanout_a")
b, _ = subs("fanout_b")
_, topics = subs("topics")
headline = [
    (f"fan-out {a}, p99 <= {p99} ms: 2+2 cluster split / embedded", ">= 80%", "fanout_a", "split", "embedded"),
    (f"fan-out {b}, p99 <= 500 ms: 2+2 cluster split / embedded", ">= 80%", "fanout_b", "split", "embedded"),
    (f"fan-out {a}: one gateway of the cluster / embedded", ">= 90%", "fanout_a", "one", "embedded"),
    (f"fan-out {a}: embedded / bare broadcaster", ">= 95%", "fanout_a", "embedded", "bare"),
    (f"topics {topics} x 10, p99 <= {p99} ms: split / embedded", ">= 80%", "topics", "split", "embedded"),
    (f"floor of any split, fan-out {a}: 2 bare / 1 bare", "", "fanout_a", "bare-split", "bare"),
    (f"floor of any split, fan-out {b}: 2 bare / 1 bare", "", "fanout_b", "bare-split", "bare"),
    (f"fan-out {a}: 2+2 cluster split / 2 bare (same split)", "", "fanout_a", "split", "bare-split"),
    (f"fan-out {b}: 2+2 cluster split / 2 bare (same split)", "", "fanout_b", "split", "bare-split"),
]

rows = [(label, target, *[ratio(f"{w}.{x}.{c}", f"{w}.{y}.{c}") for c in clients])
        for label, target, w, x, y in headline]
print()
print(f"ringcast benchmark ({os.uname().nodename}, {cores} cores, everything on one machine)")
print("Ratios of deliveries/s (best step with no loss and p99 within the bound), both sides from this run.")
print("Clients: tasks = a task per socket, one frame per read, paced publishes (like ordinary clients);")
print("         epoll = reader threads, 64 KiB reads, publishes in 1 ms bursts (the fastest client).")
widths = [max(len(r[i]) for r in rows + [("", "target", *clients)]) for i in range(2 + len(clients))]
header = ("", "target", *[f"{c} clients" for c in clients])
widths = [max(w, len(h)) for w, h in zip(widths, header)]
fmt = lambda r: "  ".join(f"{v:<{w}}" for v, w in zip(r, widths)).rstrip()
print(fmt(header))
print("-" * sum(w + 2 for w in widths))
for r in rows:
    print(fmt(r))

print()
print("Absolute figures (deliveries/s, p99)")
detail = []
for w, label in (("fanout_a", f"fan-out {a}, p99 <= {p99} ms"), ("fanout_b", f"fan-out {b}, p99 <= 500 ms"),
                 ("topics", f"topics {topics} x 10, p99 <= {p99} ms")):
    for server in ("embedded", "split", "one", "bare", "bare-split"):
        cells = [described(f"{w}.{server}.{c}") for c in clients]
        if all(c == "n/a" for c in cells):
            continue
        detail.append((f"  {label}: {server}", *cells))


def light(name):
    s = load(name)
    if not s or not s["steps"]:
        return "n/a"
    st = s["steps"][0]
    return f"p50 {st['p50_ms']:.2f} ms, p99 {st['p99_ms']:.2f} ms, lost {st['lost']}"


for server in ("split", "bare"):
    detail.append((f"  light load, 1000 subscribers x 100 msg/s: {server}", *[light(f"latency.{server}.{c}") for c in clients]))
w0 = max(len(d[0]) for d in detail)
for d in detail:
    print(f"{d[0]:<{w0}}  " + "  ".join(f"{c:<28}" for c in d[1:]).rstrip())

print()
conns_rows = []
bc, c1, c4 = load("conns.bare"), load("conns.cluster"), load("conns4.cluster")
if bc:
    conns_rows.append((f"{bc['connections']} idle joined connections, bare broadcaster", f"{bc['connect_join_per_s']:,.0f} connect+join/s"))
if c1:
    share = f", {100 * c1['connect_join_per_s'] / bc['connect_join_per_s']:.0f}% of bare" if bc else ""
    conns_rows.append((f"{c1['connections']} idle joined connections, 1 gateway", f"{c1['connect_join_per_s']:,.0f} connect+join/s{share}"))
    for r in c1["rss"]:
        delta = r["rss_held_kib"] - r["rss_before_kib"]
        if r["name"].startswith("gw-"):
            conns_rows.append(("  gateway RSS per connection", f"{delta * 1024 / c1['connections']:,.0f} bytes ({r['rss_before_kib']} -> {r['rss_held_kib']} KiB)"))
    ts = [r for r in c1["rss"] if r["name"].startswith("ts-")]
    if ts:
        delta = sum(r["rss_held_kib"] - r["rss_before_kib"] for r in ts)
        conns_rows.append(("  topic servers RSS per subscription (both)", f"{delta * 1024 / c1['connections']:,.0f} bytes"))
if c4:
    conns_rows.append((f"{c4['connections']} idle joined connections, 4 gateways, {c4['procs']} client processes", f"{c4['connect_join_per_s']:,.0f} connect+join/s"))
try:
    with open(os.path.join(out, "crossnode")) as f:
        deliveries, publishes = map(int, f.read().split())
    conns_rows.append(("cross-node messages per publish (2 gateways subscribed)", f"{deliveries / publishes:.3f} ({deliveries:,} deliveries for {publishes:,} publishes)"))
except (OSError, ValueError, ZeroDivisionError):
    pass
for name in sorted((f[:-5] for f in os.listdir(out) if f.startswith("presence.") and f.endswith(".json")), key=lambda n: -int(n.split(".")[1])):
    p = load(name)
    if not p:
        continue
    conns_rows.append((f"presence, {p['members']:,} members of one topic on 2 gateways: joins", f"{p['joins_per_s']:,.0f} joins/s (connect included); {p['join_presence_frames']:,} presence frames, {p['join_presence_bytes'] / 1e6:.1f} MB while joining"))
    conns_rows.append((f"  churn {p['churn_per_s']:.0f} leave+join/s", f"{p['churn_presence_frames_per_s']:,.0f} presence frames/s, {p['churn_presence_bytes_per_s'] / 1e6:.2f} MB/s to all members"))


def cpu(name):
    s = load(name)
    st = (s or {}).get("best")
    if not st or "kernel_us_per_delivery" not in st:
        return "n/a"
    return f"{st['user_us_per_delivery']:.2f} us user + {st['kernel_us_per_delivery']:.2f} us kernel at {st['rate']:.0f} msg/s"


conns_rows.append(("CPU per delivery, best step, every process (servers and generator):", ""))
for c in clients:
    for server in ("embedded", "split", "bare"):
        conns_rows.append((f"  fan-out {a}, {c} clients: {server}", cpu(f"fanout_a.{server}.{c}")))
conns_rows.append(("kernel time alone, bare broadcaster + generator (the floor of any server here):", ""))
for c in clients:
    s = load(f"latency.bare.{c}")
    if s and s["steps"] and "kernel_us_per_delivery" in s["steps"][0]:
        k = s["steps"][0]["kernel_us_per_delivery"]
        whole = s["subscribers"] * k / 1000 / cores
        conns_rows.append((f"  light load, {c} clients: {k:.1f} us per delivery", f"one message >= {whole:.1f} ms of all {cores} cores"))
if bc and "kernel_us_per_connection" in bc:
    k = bc["kernel_us_per_connection"]
    conns_rows.append((f"  connect+join: {k:.0f} us per connection", f"at most {cores * 1e6 / k:,.0f} connect+join/s on {cores} cores"))
w0 = max(len(r[0]) for r in conns_rows)
for k, v in conns_rows:
    print(f"{k:<{w0}}  {v}")

print()
print("peak RSS (VmHWM) per process")
try:
    with open(os.path.join(out, "rss")) as f:
        for line in f:
            label, name, kib = line.strip().split("|")
            print(f"  {label:<32} {name:<22} {int(kib) / 1024:8.1f} MiB")
except OSError:
    pass
