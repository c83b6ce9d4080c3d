#!/usr/bin/env bash
# The order of a proxy's receives and sends within each turn of its event loop, and
# whom its sends wake: keyway vs HAProxy under the same saturating load (wrk).
#
# Two proxies making the same system calls can differ in how often they wake their peers
# (the load generator and the backend, asleep in epoll_wait), and each wakeup costs the
# sender kernel time (on a VM, an inter-processor interrupt is a VM exit). What decides
# it is the order of a turn's sends: sends to one peer that come together find it awake
# after the first. This records a short window of each proxy's socket system calls and
# scheduler wakeups (perf tracepoints), names each socket client or backend, and prints
# per turn (between two epoll_wait calls) the average receives and sends of each kind,
# the wakeups per request of each peer, and a few turns written out:
#   Rc/Rb  a receive from a client/backend      Sc/Sb  a send to a client/backend
#   Ww/Wb  the load generator/backend woken     x7     seven in a row
#
#   bash bench/send-order.sh                    # wrk -c50
#   CONNS=256 bash bench/send-order.sh
#
# Needs perf with access to tracepoints (root). Everything listens on 127.0.0.1 and
# stops by itself.
set -euo pipefail
cd "$(dirname "$0")/.."
CONNS=${CONNS:-50}
WINDOW=${WINDOW:-0.5}

for tool in wrk haproxy perf ss python3; do
  command -v "$tool" >/dev/null || { echo "send-order: needs $tool" >&2; exit 1; }
done
source bench/common.sh
declare -A pid port
start_pair
perf stat -e syscalls:sys_enter_sendto -p "${pid[keyway]}" -- sleep 0.1 >/dev/null 2>&1 ||
  { echo "send-order: perf cannot read syscall tracepoints here (run as root)" >&2; exit 1; }

events=syscalls:sys_enter_epoll_wait,syscalls:sys_enter_epoll_pwait,syscalls:sys_enter_recvfrom
events+=,syscalls:sys_enter_read,syscalls:sys_enter_readv,syscalls:sys_enter_sendto
events+=,syscalls:sys_enter_write,syscalls:sys_enter_writev,sched:sched_waking
for p in keyway haproxy; do
  timeout -k 5 30 taskset -c $front wrk -t1 -c"$CONNS" -d4s "http://127.0.0.1:${port[$p]}/" >/dev/null 2>&1 &
  load=$!
  sleep 1.5
  # fd -> socket inode, then inode -> (local, peer) of the established connections.
  for f in /proc/"${pid[$p]}"/fd/*; do
    ino=$(readlink "$f" 2>/dev/null | sed -nE 's/socket:\[([0-9]+)\]/\1/p') || true
    if [ -n "$ino" ]; then echo "${f##*/} $ino"; fi
  done >"$tmp/$p.fds"
  ss -tne state established | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^ino:/) { split($i, a, ":"); print a[2], $3, $4 } }' >"$tmp/$p.ss"
  perf record -q -e "$events" -p "${pid[$p]}" -o "$tmp/$p.data" -- sleep "$WINDOW" >/dev/null 2>&1
  wait "$load" || true
  perf script -i "$tmp/$p.data" -F event,trace 2>/dev/null >"$tmp/$p.trace"
  python3 - "$tmp/$p" "$p" "${port[$p]}" <<'EOF'
import collections, re, sys
base, name, listen = sys.argv[1], sys.argv[2], sys.argv[3]
conn = {}
for line in open(base + ".ss"):
    f = line.split()
    if len(f) == 3:
        conn[f[0]] = (f[1], f[2])
kind = {}
for line in open(base + ".fds"):
    fd, ino = line.split()
    if ino in conn:
        local, peer = conn[ino]
        if peer.endswith(":18080"):
            kind[int(fd)] = "b"
        elif local.endswith(":" + listen):
            kind[int(fd)] = "c"
turns, cur = [], []
for line in open(base + ".trace"):
    m = re.search(r"(sys_enter_\w+|sched_waking)", line)
    if not m:
        continue
    ev = m.group(1)
    if "epoll" in ev:
        turns.append(cur)
        cur = []
    elif ev == "sched_waking":
        comm = re.search(r"comm=(\S+)", line).group(1)
        cur.append("Ww" if comm == "wrk" else "Wb" if "backend" in comm else "W?")
    else:
        fd = re.search(r"fd: (0x[0-9a-f]+)", line)
        if fd:
            op = "R" if ev in ("sys_enter_recvfrom", "sys_enter_read", "sys_enter_readv") else "S"
            cur.append(op + kind.get(int(fd.group(1), 16), "?"))
turns = turns[1:]  # the first is cut by the window's start
if not turns:
    sys.exit(f"send-order: {name}: no epoll turns recorded")
count = collections.Counter(x for t in turns for x in t)
requests = count["Sb"] or 1
n = len(turns)
print(f"{name}: {n} turns, {count['Sb']} requests sent to the backend")
print("  per turn: " + ", ".join(f"{k} {count[k] / n:.2f}" for k in ("Rc", "Rb", "Sb", "Sc", "Wb", "Ww")))
print(f"  wakeups per request: backend {count['Wb'] / requests:.3f}, load generator {count['Ww'] / requests:.3f}")
def runs(t):
    out = []
    for x in t:
        if out and out[-1][0] == x:
            out[-1][1] += 1
        else:
            out.append([x, 1])
    return " ".join(x + (f"x{k}" if k > 1 else "") for x, k in out)
for t in turns[len(turns) // 2:len(turns) // 2 + 4]:
    print("  " + runs(t)[:200])
EOF
done
