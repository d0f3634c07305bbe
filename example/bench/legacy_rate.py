#!/usr/bin/env python3
"""Legacy-client rate: a pyzmq REQ client doing `add job`/`get job` round trips against our
router, and the same client against a trivial pyzmq echo server, in one run.

    python3 example/bench/legacy_rate.py [--router target/release/my_router] [--secs 3]
        [--rounds 3] [--no-durability]

Each round measures the echo server, then the router, for --secs each; the script prints every
round and, as its last line, one JSON object with the medians and the ratio router/echo.
Everything runs on 127.0.0.1 with ephemeral ports; every process it starts is stopped.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import zmq

ECHO_SERVER = """
import sys, zmq
ctx = zmq.Context()
s = ctx.socket(zmq.REP)
s.bind("tcp://127.0.0.1:*")
print(s.getsockopt(zmq.LAST_ENDPOINT).decode(), flush=True)
while True:
    msg = s.recv()
    s.send(b'{"answer": "job accepted", "job id": "0123456789abcdef0123456789abcdef"}')
"""


def round_trips(endpoint, secs):
    """Round trips per second of one REQ client alternating add job and get job."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.connect(endpoint)
    add = json.dumps({"command": "add job", "worker": "Legacy", "data": {"n": 1}}).encode()
    get = json.dumps({"command": "get job"}).encode()
    # Warm up: the first exchanges include the TCP and ZMTP handshakes.
    for _ in range(50):
        sock.send(add)
        sock.recv()
    n = 0
    deadline = time.perf_counter() + secs
    start = time.perf_counter()
    while time.perf_counter() < deadline:
        sock.send(add if n % 2 == 0 else get)
        sock.recv()
        n += 1
    rate = n / (time.perf_counter() - start)
    sock.close()
    return rate


def start_router(binary, home, durable):
    args = [binary, "--api", "tcp://127.0.0.1:0", "--broadcast", "tcp://127.0.0.1:0",
            "--home", home, "--no-store"]
    if not durable:
        args.append("--no-durability")
    log = open(os.path.join(home, "router.log"), "w")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, text=True)
    line = proc.stdout.readline().strip()
    if not line.startswith("listening "):
        proc.kill()
        sys.exit(f"the router did not start: {line!r} (see {home}/router.log)")
    fields = dict(part.split("=", 1) for part in line.split()[1:])
    return proc, fields["api"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--router", default="target/release/my_router")
    parser.add_argument("--secs", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-durability", action="store_true")
    args = parser.parse_args()

    home = tempfile.mkdtemp(prefix="pypelinin-legacy-rate-")
    echo = subprocess.Popen([sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE, text=True)
    router = None
    try:
        echo_endpoint = echo.stdout.readline().strip()
        router, router_endpoint = start_router(args.router, home, not args.no_durability)
        echo_rates, router_rates = [], []
        for i in range(args.rounds):
            echo_rates.append(round_trips(echo_endpoint, args.secs))
            router_rates.append(round_trips(router_endpoint, args.secs))
            print(f"round {i + 1}: echo {echo_rates[-1]:,.0f} rt/s, "
                  f"router {router_rates[-1]:,.0f} rt/s")
        e, r = statistics.median(echo_rates), statistics.median(router_rates)
        print(json.dumps({
            "durable": not args.no_durability,
            "echo_rt_per_s": round(e),
            "router_rt_per_s": round(r),
            "ratio": round(r / e, 3),
            "echo_runs": [round(x) for x in echo_rates],
            "router_runs": [round(x) for x in router_rates],
        }))
    finally:
        echo.kill()
        echo.wait()
        if router is not None:
            router.terminate()
            try:
                router.wait(timeout=10)
            except subprocess.TimeoutExpired:
                router.kill()
        subprocess.run(["rm", "-rf", home], check=False)


if __name__ == "__main__":
    main()
