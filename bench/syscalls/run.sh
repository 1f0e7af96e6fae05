#!/bin/bash
# Syscalls per 64-byte echo round trip of an echo_server, counted by strace -c over the server
# (all its threads), with a Python client of N connections x R round trips. strace slows the
# server, so only the counts mean anything here, not the time.
#   bench/syscalls/run.sh PATH/TO/echo_server MODE CONNS ROUNDS
set -euo pipefail
here=$(dirname "$0")
bin=$1; mode=$2; n=$3; r=$4
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
out=$(mktemp)
"$bin" --addr 127.0.0.1:$port --mode "$mode" --workers 1 >/dev/null 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; rm -f $out' EXIT
sleep 0.5
python3 "$here/load.py" 127.0.0.1 $port 2 50 >/dev/null # warm up: threads and buffers exist
strace -c -f -p $pid -o "$out" 2>/dev/null &
sp=$!
sleep 0.5
msgs=$(python3 "$here/load.py" 127.0.0.1 $port "$n" "$r")
sleep 0.3
kill -INT $sp
wait $sp 2>/dev/null || true
total=$(awk '/^100.00/ {print $4}' "$out")
echo "$mode conns=$n msgs=$msgs syscalls=$total per_msg=$(echo "scale=2; $total/$msgs" | bc)"
awk 'NR>2 && $0 !~ /^---|^100|total/ {print "   ", $NF, $4}' "$out" | sort -k2 -nr | head -6
