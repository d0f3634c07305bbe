#!/usr/bin/env python3
"""A legacy broker (the original's: `get job` in a loop, no lease renewal) runs a job longer
than the router's usual job lease but shorter than its legacy lease: the job must not be
handed out again meanwhile, and its late `job finished` must be accepted.

Usage: legacy_broker_lease.py --api tcp://... --job-secs 2.5
"""
import argparse
import sys
import time

import zmq

TIMEOUT_MS = 10_000


def check(condition, message):
    if not condition:
        print("FAILED:", message, file=sys.stderr)
        sys.exit(1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--api", required=True)
    parser.add_argument("--job-secs", type=float, required=True)
    args = parser.parse_args()

    context = zmq.Context()

    def socket():
        s = context.socket(zmq.REQ)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVTIMEO, TIMEOUT_MS)
        s.setsockopt(zmq.SNDTIMEO, TIMEOUT_MS)
        s.connect(args.api)
        return s

    client, broker, other_broker = socket(), socket(), socket()

    def ask(s, request):
        s.send_json(request)
        return s.recv_json()

    added = ask(client, {"command": "add job", "worker": "Slow", "data": {"n": 1}})
    check(added.get("answer") == "job accepted", f"add job: {added}")
    job = ask(broker, {"command": "get job"})
    check(job.get("job id") == added["job id"], f"get job: {job}")

    # The broker "runs" the job; another legacy broker keeps asking meanwhile, as the
    # original broker did in its loop.
    started = time.monotonic()
    asked = 0
    while time.monotonic() - started < args.job_secs:
        again = ask(other_broker, {"command": "get job"})
        check(again == {"worker": None}, f"the running job was handed out again: {again}")
        asked += 1
        time.sleep(0.05)
    check(asked > 5, f"asked only {asked} times")

    done = ask(broker, {"command": "job finished", "job id": job["job id"], "duration": args.job_secs})
    check(done == {"answer": "good job!"}, f"job finished: {done}")
    print(f"ok: the job ran once; {asked} get job meanwhile got nothing")


if __name__ == "__main__":
    main()
