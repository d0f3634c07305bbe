#!/usr/bin/env python3
"""A stand-in of the original pypelinin 0.1.1 router, for the tests of our broker and
pipeliner against it: the legacy commands only, answered as the original answered them
(docs/protocol.md), one request at a time, everything in memory.

Prints `listening api=ENDPOINT broadcast=ENDPOINT` once bound (ephemeral ports on
127.0.0.1), then serves until killed. `counts` of what it answered are printed on SIGTERM.

Usage: legacy_router.py [--config JSON]
"""
import argparse
import json
import signal
import sys
import uuid
from collections import Counter, deque

import zmq


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default='{"store": {"type": "none"}, "monitoring interval": 60}')
    args = parser.parse_args()
    config = json.loads(args.config)

    context = zmq.Context()
    api = context.socket(zmq.REP)
    broadcast = context.socket(zmq.PUB)
    api.setsockopt(zmq.LINGER, 0)
    broadcast.setsockopt(zmq.LINGER, 0)
    api_port = api.bind_to_random_port("tcp://127.0.0.1")
    broadcast_port = broadcast.bind_to_random_port("tcp://127.0.0.1")
    print(
        "listening api=tcp://127.0.0.1:{} broadcast=tcp://127.0.0.1:{}".format(api_port, broadcast_port),
        flush=True,
    )

    job_queue, pipeline_queue = deque(), deque()
    pending_jobs, pending_pipelines = set(), set()
    counts = Counter()

    def report(*_):
        print(json.dumps(counts), flush=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, report)

    while True:
        message = api.recv_json()
        if not isinstance(message, dict) or "command" not in message:
            reply, event = {"answer": "undefined command"}, None
        else:
            command = message.pop("command")
            reply, event = handle(command, message, config, job_queue, pipeline_queue,
                                  pending_jobs, pending_pipelines)
            counts["{} -> {}".format(command, reply.get("answer", "work"))] += 1
            if command == "add job" and "data" not in message:
                # The original's broker hands such a job no data at all.
                counts["add job without data"] += 1
        api.send_json(reply)
        if event is not None:
            broadcast.send_string(event)


def handle(command, message, config, job_queue, pipeline_queue, pending_jobs, pending_pipelines):
    if command == "get configuration":
        return config, None
    if command == "add job":
        message["job id"] = uuid.uuid4().hex
        job_queue.append(message)
        pending_jobs.add(message["job id"])
        return {"answer": "job accepted", "job id": message["job id"]}, "new job"
    if command == "get job":
        return (job_queue.popleft() if job_queue else {"worker": None}), None
    if command == "job finished":
        if "job id" not in message or "duration" not in message:
            return {"answer": "syntax error"}, None
        if message["job id"] not in pending_jobs:
            return {"answer": "unknown job id"}, None
        pending_jobs.remove(message["job id"])
        return {"answer": "good job!"}, "job finished: {} duration: {}".format(
            message["job id"], message["duration"])
    if command == "add pipeline":
        message["pipeline id"] = uuid.uuid4().hex
        pipeline_queue.append(message)
        pending_pipelines.add(message["pipeline id"])
        return {"answer": "pipeline accepted", "pipeline id": message["pipeline id"]}, "new pipeline"
    if command == "get pipeline":
        return (pipeline_queue.popleft() if pipeline_queue else {"pipeline": None}), None
    if command == "pipeline finished":
        if "pipeline id" not in message:
            return {"answer": "syntax error"}, None
        if message["pipeline id"] not in pending_pipelines:
            return {"answer": "unknown pipeline id"}, None
        pending_pipelines.remove(message["pipeline id"])
        return {"answer": "good job!"}, "pipeline finished: id={}, duration={}".format(
            message["pipeline id"], message["duration"])
    return {"answer": "unknown command"}, None


if __name__ == "__main__":
    main()
