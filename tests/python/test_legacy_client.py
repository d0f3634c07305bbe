"""Talks to our router exactly as the legacy Python 0.1.1 clients did, one request at a time.

Plain pyzmq REQ + send_json/recv_json and SUB with prefix subscriptions, the legacy
serialized pipeline format, and the legacy parsing of broadcasts.
"""
import time

import zmq

TIMEOUT_MS = 10_000


def check(condition, message):
    assert condition, message


def is_id(value):
    return isinstance(value, str) and len(value) == 32 and all(c in "0123456789abcdef" for c in value)


def test_request_reply_paths_and_broadcasts_match_the_original(start_router):
    args = start_router()

    context = zmq.Context()
    api = context.socket(zmq.REQ)
    api.setsockopt(zmq.LINGER, 0)
    api.setsockopt(zmq.RCVTIMEO, TIMEOUT_MS)
    api.setsockopt(zmq.SNDTIMEO, TIMEOUT_MS)
    api.connect(args.api)

    def ask(request):
        api.send_json(request)
        return api.recv_json()

    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVTIMEO, TIMEOUT_MS)
    sub.connect(args.broadcast)
    sub.setsockopt_string(zmq.SUBSCRIBE, "new job")
    sub.setsockopt_string(zmq.SUBSCRIBE, "new pipeline")
    # The legacy clients raced the slow joiner; this check waits until the SUB is live.
    sub.setsockopt_string(zmq.SUBSCRIBE, "probe: legacy")
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    sub.setsockopt(zmq.RCVTIMEO, 100)
    while True:
        check(time.monotonic() < deadline, "subscription never became live")
        check(ask({"command": "probe", "token": "legacy"}) == {"answer": "probe sent"}, "probe")
        try:
            if sub.recv_string() == "probe: legacy":
                break
        except zmq.Again:
            pass
    sub.setsockopt_string(zmq.UNSUBSCRIBE, "probe: legacy")
    sub.setsockopt(zmq.RCVTIMEO, 300)
    while True:  # drain extra probes
        try:
            sub.recv_string()
        except zmq.Again:
            break
    sub.setsockopt(zmq.RCVTIMEO, TIMEOUT_MS)

    # Broker side: configuration, add/get job, job finished with the fetched job sent back.
    config = ask({"command": "get configuration"})
    check(isinstance(config, dict) and "answer" not in config, "configuration: %r" % (config,))

    answer = ask({"command": "add job", "worker": u"Upper", "data": {"filename": u"\u00e7.json"}})
    check(answer["answer"] == "job accepted" and is_id(answer["job id"]), "add job: %r" % (answer,))
    job_id = answer["job id"]
    check(sub.recv_string() == "new job", "new job broadcast")
    job = ask({"command": "get job"})
    check(job == {"worker": "Upper", "data": {"filename": u"\u00e7.json"}, "job id": job_id}, "get job: %r" % (job,))
    check(ask({"command": "get job"}) == {"worker": None}, "empty job queue")

    # The legacy pipeliner subscribes to "job finished: ID" and parses the id out.
    sub.setsockopt_string(zmq.SUBSCRIBE, "job finished: " + job_id)
    job["command"] = "job finished"
    job["duration"] = 0.1
    check(ask(job) == {"answer": "good job!"}, "job finished")
    message = sub.recv_string()
    check(message == "job finished: %s duration: 0.1" % job_id, "job finished broadcast: %r" % message)
    check(message.split(": ")[1].split(" ")[0] == job_id, "legacy id parsing")
    check(ask(job) == {"answer": "unknown job id"}, "second job finished")

    # Client side: a pipeline in the legacy serialized format (tuples of pairs).
    pipeline = (
        ("graph", (
            ((("worker_name", "Downloader"), ("data", (("filename", "0.dat"),))),
             (("worker_name", "GetLinks"), ("data", (("filename", "0.dat"),)))),
            ((("worker_name", "Downloader"), ("data", (("filename", "0.dat"),))),
             (("worker_name", "GetTextAndWords"), ("data", (("filename", "0.dat"),)))),
        )),
        ("data", (("filename", "0.dat"),)),
    )
    answer = ask({"command": "add pipeline", "pipeline": pipeline})
    check(answer["answer"] == "pipeline accepted" and is_id(answer["pipeline id"]), "add pipeline: %r" % (answer,))
    pipeline_id = answer["pipeline id"]
    check(sub.recv_string() == "new pipeline", "new pipeline broadcast")
    got = ask({"command": "get pipeline"})
    check(got["pipeline id"] == pipeline_id, "get pipeline id")
    check(dict(got["pipeline"])["data"] == [["filename", "0.dat"]], "pipeline data: %r" % (got,))
    check(len(dict(got["pipeline"])["graph"]) == 2, "pipeline graph")
    check(ask({"command": "get pipeline"}) == {"pipeline": None}, "empty pipeline queue")

    # The legacy PipelineManager subscribes to "pipeline finished: id=ID" and parses the message.
    sub.setsockopt_string(zmq.SUBSCRIBE, "pipeline finished: id=" + pipeline_id)
    answer = ask({"command": "pipeline finished", "pipeline id": pipeline_id, "duration": 2.0})
    check(answer == {"answer": "good job!"}, "pipeline finished: %r" % (answer,))
    message = sub.recv_string()
    check(message == "pipeline finished: id=%s, duration=2.0" % pipeline_id, "broadcast: %r" % message)
    fields = dict(item.split("=") for item in message.split(": ")[1].split(", "))
    check(fields == {"id": pipeline_id, "duration": "2.0"} and float(fields["duration"]) == 2.0, "legacy parsing")

    # A pipeline of the legacy client that fails (reported by one of our pipeliners) or is
    # cancelled still ends for that client: "pipeline finished: id=ID" follows the extension's
    # broadcast, so it does not wait forever.
    for end in ("fail", "cancel"):
        answer = ask({"command": "add pipeline", "pipeline": pipeline})
        pipeline_id = answer["pipeline id"]
        check(sub.recv_string() == "new pipeline", "new pipeline broadcast")
        sub.setsockopt_string(zmq.SUBSCRIBE, "pipeline finished: id=" + pipeline_id)
        got = ask({"command": "get pipeline"})
        check(got["pipeline id"] == pipeline_id, "get pipeline id (%s)" % end)
        if end == "fail":
            answer = ask({"command": "pipeline failed", "pipeline id": pipeline_id, "job id": "j",
                          "worker": "Upper", "error": "boom", "duration": 1.5})
            check(answer == {"answer": "failure recorded"}, "pipeline failed: %r" % (answer,))
        else:
            answer = ask({"command": "cancel pipeline", "pipeline id": pipeline_id})
            check(answer["answer"] == "pipeline cancelled", "cancel pipeline: %r" % (answer,))
        message = sub.recv_string()
        check(message.startswith("pipeline finished: id=%s, duration=" % pipeline_id),
              "the legacy client heard no end of its %sed pipeline: %r" % (end, message))
        fields = dict(item.split("=") for item in message.split(": ")[1].split(", "))
        float(fields["duration"])
        status = ask({"command": "pipeline status", "pipeline ids": [pipeline_id]})
        check(status["pipelines"][pipeline_id]["state"] in ("failed", "cancelled"),
              "its status says how it ended: %r" % (status,))

    # Errors keep the legacy answers, and bad bytes do not kill the router.
    check(ask({"no": "command"}) == {"answer": "undefined command"}, "undefined command")
    check(ask({"command": "GET JOB"}) == {"answer": "unknown command"}, "unknown command")
    check(ask({"command": "job finished"}) ["answer"] == "syntax error", "syntax error")
    api.send(b"\xff not json")
    check(api.recv_json()["answer"] == "malformed request", "malformed request")
    check(ask({"command": "get job"}) == {"worker": None}, "served after malformed request")

