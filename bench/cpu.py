#!/usr/bin/env python3
"""Exact CPU accounting for a benchmark run, from /proc (no sampling).

  cpu.py snap PID OUT.json          machine-wide CPU times (/proc/stat) and the user/system
                                    time of every thread of PID (/proc/PID/task/*/stat)
  cpu.py diff BEFORE AFTER [--client USER_S SYS_S] [--name NAME]
                                    what happened between two snaps: the machine's busy share
                                    of all cores, the server process's CPU (in % of one core)
                                    and its threads grouped by name, the client's CPU (from
                                    bash `time`), and everything else on the machine ("others")
"""
import json
import os
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")


def snap(pid, out):
    with open("/proc/stat") as f:
        cpu = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal
    idle = cpu[3] + cpu[4]
    irq = cpu[5] + cpu[6]
    steal = cpu[7]
    busy = cpu[0] + cpu[1] + cpu[2] + irq
    threads = {}
    task_dir = f"/proc/{pid}/task"
    for tid in os.listdir(task_dir):
        try:
            with open(f"{task_dir}/{tid}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        comm = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()
        utime, stime = int(fields[11]), int(fields[12])
        threads[tid] = {"comm": comm, "utime": utime, "stime": stime}
    procs = {}
    for p in os.listdir("/proc"):
        if not p.isdigit() or p == str(pid):
            continue
        try:
            with open(f"/proc/{p}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        comm = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()
        # starttime tells a reused pid from the same process (a kworker's comm changes with its work).
        procs[p] = {"comm": comm, "ticks": int(fields[11]) + int(fields[12]), "start": int(fields[19])}
    json.dump(
        {
            "wall": time.monotonic(),
            "procs": procs,
            "busy": busy,
            "idle": idle,
            "iowait": cpu[4],
            "irq": irq,
            "steal": steal,
            "ncpu": os.cpu_count(),
            "threads": threads,
        },
        open(out, "w"),
    )


def diff(before_path, after_path, client=None, name="server"):
    b, a = json.load(open(before_path)), json.load(open(after_path))
    wall = a["wall"] - b["wall"]
    busy = (a["busy"] - b["busy"]) / TICK
    idle = (a["idle"] - b["idle"]) / TICK
    iowait = (a["iowait"] - b["iowait"]) / TICK
    irq = (a["irq"] - b["irq"]) / TICK
    steal = (a["steal"] - b["steal"]) / TICK
    by_comm = {}
    total = 0.0
    for tid, t in a["threads"].items():
        before = b["threads"].get(tid, {"utime": 0, "stime": 0})
        used = (t["utime"] - before["utime"] + t["stime"] - before["stime"]) / TICK
        sys_part = (t["stime"] - before["stime"]) / TICK
        c = by_comm.setdefault(t["comm"], [0.0, 0.0, 0])
        c[0] += used
        c[1] += sys_part
        c[2] += 1
        total += used
    pct = lambda s: 100.0 * s / wall if wall > 0 else 0.0
    parts = [
        f"wall {wall:.2f} s; machine busy {100.0 * busy / (busy + idle) if busy + idle else 0:.0f}% of "
        f"{a['ncpu']} cores (in % of one core: iowait {pct(iowait):.0f}, irq+softirq {pct(irq):.0f}, steal {pct(steal):.0f})",
        f"{name} {pct(total):.0f}% of a core",
    ]
    threads = sorted(by_comm.items(), key=lambda kv: -kv[1][0])
    parts.append(
        "threads: "
        + ", ".join(
            f"{comm}{'' if n == 1 else f' x{n}'} {pct(used):.0f}% (sys {pct(sys_part):.0f}%)"
            for comm, (used, sys_part, n) in threads
            if pct(used) >= 1
        )
    )
    others = busy - irq - total
    if client is not None:
        cu, cs = client
        parts.append(f"client {pct(cu + cs):.0f}% of a core (sys {pct(cs):.0f}%)")
        others -= cu + cs
    # The busiest other processes still running at the end (ones that ended during the run, such as
    # compiler runs of a concurrent build, only show in the total).
    other_procs = []
    for p, q in a.get("procs", {}).items():
        before = b.get("procs", {}).get(p)
        if before is None or before.get("start") != q["start"]:
            before = {"ticks": 0}  # started during the run
        other_procs.append(((q["ticks"] - before["ticks"]) / TICK, q["comm"]))
    other_procs.sort(reverse=True)
    top = ", ".join(f"{comm} {pct(used):.0f}%" for used, comm in other_procs[:3] if pct(used) >= 2)
    parts.append(f"others {max(0.0, pct(others)):.0f}% of a core" + (f" (of which {top})" if top else ""))
    print("; ".join(parts))


def main(argv):
    if len(argv) >= 3 and argv[0] == "snap":
        snap(argv[1], argv[2])
    elif len(argv) >= 3 and argv[0] == "diff":
        client, name, rest = None, "server", argv[3:]
        while rest:
            if rest[0] == "--client":
                client = (float(rest[1]), float(rest[2]))
                rest = rest[3:]
            elif rest[0] == "--name":
                name, rest = rest[1], rest[2:]
            else:
                sys.exit(f"unknown argument {rest[0]}")
        diff(argv[1], argv[2], client, name)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
