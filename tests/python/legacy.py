"""Stand-ins of the original pypelinin 0.1.1 daemons, for the tests of this folder.

Each one does on the wire exactly what the original did (docs/protocol.md, "Mixing legacy
and new daemons", says what that is and where it came from): plain pyzmq REQ sockets with
send_json/recv_json, SUB sockets subscribed by prefix, the legacy serialized pipeline, and the
original's order of events — a pipeliner or client subscribes to the end of what it added only
once it has the reply, and the pipeliner keeps its pipelines by id, so two copies of one id
end in a KeyError, as the original's did. They differ from the original only where a test
needs a handle: a bounded `run_until` instead of an endless loop, hooks that let a test force
a race, and counters of what was sent.
"""
import time

import zmq

TIMEOUT_MS = 10_000


class Client:
    """The original's `Client`: a REQ socket to the API, a SUB socket to the broadcasts."""

    def __init__(self, api, broadcast=None):
        self.context = zmq.Context.instance()
        self.api = self.context.socket(zmq.REQ)
        self.api.setsockopt(zmq.LINGER, 0)
        self.api.setsockopt(zmq.RCVTIMEO, TIMEOUT_MS)
        self.api.setsockopt(zmq.SNDTIMEO, TIMEOUT_MS)
        self.api.connect(api)
        self.broadcast = None
        if broadcast is not None:
            self.broadcast = self.context.socket(zmq.SUB)
            self.broadcast.setsockopt(zmq.LINGER, 0)
            self.broadcast.connect(broadcast)
            self.poller = zmq.Poller()
            self.poller.register(self.broadcast, zmq.POLLIN)

    def ask(self, request):
        self.api.send_json(request)
        return self.api.recv_json()

    def broadcast_subscribe(self, prefix):
        self.broadcast.setsockopt_string(zmq.SUBSCRIBE, prefix)

    def broadcast_unsubscribe(self, prefix):
        self.broadcast.setsockopt_string(zmq.UNSUBSCRIBE, prefix)

    def broadcast_poll(self, ms):
        return bool(self.poller.poll(ms))

    def broadcast_receive(self):
        return self.broadcast.recv_string()

    def close(self):
        self.api.close()
        if self.broadcast is not None:
            self.broadcast.close()


def pairs(data):
    """The original's serialization of a dict: a list of [key, value] pairs."""
    return None if data is None else [[k, v] for k, v in data.items()]


def serialize(edges, data):
    """A pipeline in the original's serialized form: `edges` maps a worker name to the names
    that come after it (an empty list for a last job); every job carries the pipeline's data.
    """

    def job(name):
        item = [["worker_name", name]]
        if data is not None:
            item.append(["data", pairs(data)])
        return item

    graph = []
    for source, targets in edges.items():
        if not targets:
            graph.append([job(source), None])
        for target in targets:
            graph.append([job(source), job(target)])
    return [["graph", graph], ["data", pairs(data)]]


class Job:
    """A job of a pipeline: equal to another when their worker names are equal."""

    def __init__(self, worker_name, data):
        self.worker_name = worker_name
        self.data = data
        self.pipeline = None

    def __eq__(self, other):
        return isinstance(other, Job) and self.worker_name == other.worker_name

    def __hash__(self):
        return hash(self.worker_name)


class PipelineForPipeliner:
    """The original's `PipelineForPipeliner`, from its serialized form."""

    def __init__(self, serialized):
        info = dict(serialized)
        data = info["data"]
        self.data = None if data is None else dict(data)
        self.jobs = []
        self._dependencies = {}
        for source, target in info["graph"]:
            for item in (source, target):
                if item is None:
                    continue
                job = Job(dict(item)["worker_name"], self.data)
                if job not in self._dependencies:
                    job.pipeline = self
                    self.jobs.append(job)
                    self._dependencies[job] = set()
            if target is not None:
                self._dependencies[Job(dict(target)["worker_name"], None)].add(
                    Job(dict(source)["worker_name"], None)
                )
        self._finished_jobs = set()
        self.sent_jobs = set()
        self.id = None
        self.started_at = None

    @property
    def starters(self):
        return [job for job in self.jobs if not self._dependencies[job]]

    def add_finished_job(self, job):
        if job not in self.jobs:
            raise ValueError("Job {} not in pipeline".format(job.worker_name))
        if job in self._finished_jobs:
            raise RuntimeError("Job {} was already declared as finished".format(job.worker_name))
        self._finished_jobs.add(job)

    def finished(self):
        return set(self.jobs) == self._finished_jobs

    def available_jobs(self):
        return {
            job
            for job in self.jobs
            if self._dependencies[job].issubset(self._finished_jobs)
            and job not in self._finished_jobs
        }


class LegacyPipeliner(Client):
    """The original's `Pipeliner`, step for step.

    `after_add_reply(job_id)` runs between the reply to an `add job` and the subscription to
    that job's end (the original ran a log call there): a test makes it wait for the job to
    finish, to force the race of a fast broker. `added` counts the jobs it added, by worker.
    """

    def __init__(self, api, broadcast, poll_time=50, after_add_reply=None):
        super().__init__(api, broadcast)
        self.poll_time = poll_time
        self._new_pipelines = None
        self._messages = []
        self._pipelines = {}
        self._jobs = {}
        self.after_add_reply = after_add_reply or (lambda job_id: None)
        self.added = []
        self.pipelines_taken = []
        self.finished_replies = []
        self.broadcast_subscribe("new pipeline")

    def _update_broadcast(self):
        if self.broadcast_poll(self.poll_time):
            message = self.broadcast_receive()
            if message.startswith("new pipeline"):
                self._new_pipelines = (self._new_pipelines or 0) + 1
            else:
                self._messages.append(message)

    def router_has_new_pipeline(self):
        self._update_broadcast()
        return bool(self._new_pipelines and self._new_pipelines > 0)

    def ask_for_a_pipeline(self):
        message = self.ask({"command": "get pipeline"})
        if "pipeline" in message:
            if message["pipeline"] is not None:
                self._new_pipelines = 0 if self._new_pipelines is None else self._new_pipelines - 1
                return message
            self._new_pipelines = 0
            return None
        return None

    def get_a_pipeline(self):
        definition = 42
        while definition is not None:
            definition = self.ask_for_a_pipeline()
            if definition is not None:
                pipeline = PipelineForPipeliner(definition["pipeline"])
                pipeline.id = definition["pipeline id"]
                pipeline.started_at = time.time()
                self.pipelines_taken.append(pipeline.id)
                self._pipelines[pipeline.id] = pipeline
                self.start_pipeline_jobs(pipeline, pipeline.starters)

    def _start_job(self, job):
        message = self.ask({"command": "add job", "worker": job.worker_name, "data": job.data})
        job_id = message["job id"]
        self.added.append(job.worker_name)
        self.after_add_reply(job_id)
        self.broadcast_subscribe("job finished: {}".format(job_id))
        return job_id

    def start_pipeline_jobs(self, pipeline, jobs):
        for job in jobs:
            job_id = self._start_job(job)
            self._jobs[job_id] = job
            pipeline.sent_jobs.add(job)

    def verify_jobs(self):
        self._update_broadcast()
        for message in self._messages:
            if message.startswith("job finished: "):
                job_id = message.split(": ")[1].split(" ")[0]
                if job_id in self._jobs:
                    job = self._jobs[job_id]
                    pipeline = job.pipeline
                    pipeline.add_finished_job(job)
                    del self._jobs[job_id]
                    if pipeline.finished():
                        total_time = time.time() - pipeline.started_at
                        reply = self.ask(
                            {
                                "command": "pipeline finished",
                                "pipeline id": pipeline.id,
                                "duration": total_time,
                            }
                        )
                        self.finished_replies.append((pipeline.id, reply))
                        # The original's line, and its KeyError when two copies of one id end.
                        del self._pipelines[pipeline.id]
                        self.get_a_pipeline()
                    else:
                        jobs_to_send = pipeline.available_jobs() - pipeline.sent_jobs
                        if jobs_to_send:
                            self.start_pipeline_jobs(pipeline, jobs_to_send)
                # The original unsubscribed with the whole message: a no-op.
                self.broadcast_unsubscribe(message)
            elif message == "new pipeline":
                self.get_a_pipeline()
        self._messages = []

    def run_until(self, done, timeout, what, also=None):
        """The original's main loop, until `done()` or `timeout` seconds (then it fails,
        saying `what` it waited for); `also()` runs once per turn (a broker's step)."""
        deadline = time.monotonic() + timeout
        self.get_a_pipeline()
        while not done():
            assert time.monotonic() < deadline, "legacy pipeliner: no {} within {} s".format(
                what, timeout
            )
            if self.router_has_new_pipeline():
                self.get_a_pipeline()
            self.verify_jobs()
            if also is not None:
                also()


class PipelineManager(Client):
    """The original's (0.1.1) `PipelineManager`: it subscribes to a pipeline's end only once
    it has the reply to `add pipeline`, counts every `pipeline finished` it hears, and has no
    other way to learn that a pipeline ended.

    `after_add_reply(pipeline_id)` runs between that reply and the subscription.
    """

    def __init__(self, api, broadcast, poll_time=50, after_add_reply=None):
        super().__init__(api, broadcast)
        self.poll_time = poll_time
        self._pipelines = {}
        self.started_pipelines = 0
        self.finished_pipelines = 0
        self.after_add_reply = after_add_reply or (lambda pipeline_id: None)

    def start(self, edges, data):
        result = self.ask({"command": "add pipeline", "pipeline": serialize(edges, data)})
        pipeline_id = str(result["pipeline id"])
        self._pipelines[pipeline_id] = {"finished": False, "duration": None}
        self.started_pipelines += 1
        self.after_add_reply(pipeline_id)
        self.broadcast_subscribe("pipeline finished: id=" + pipeline_id)
        return pipeline_id

    def update(self, timeout):
        start_time = time.time()
        while self.broadcast_poll(self.poll_time) and time.time() - start_time < timeout:
            message = self.broadcast_receive()
            if message.startswith("pipeline finished: "):
                try:
                    data = message.split(": ")[1].split(", ")
                    pipeline_id = data[0].split("=")[1]
                    duration = float(data[1].split("=")[1])
                except (IndexError, ValueError):
                    continue
                pipeline = self._pipelines[pipeline_id]
                pipeline["duration"] = duration
                pipeline["finished"] = True
                self.finished_pipelines += 1
                self.broadcast_unsubscribe("pipeline finished: id=" + pipeline_id)

    def wait_all(self, timeout):
        """What the original's callers did: `update` until every started pipeline ended."""
        deadline = time.monotonic() + timeout
        while self.finished_pipelines < self.started_pipelines:
            assert time.monotonic() < deadline, "legacy client: {} of {} pipelines ended within {} s".format(
                self.finished_pipelines, self.started_pipelines, timeout
            )
            self.update(0.5)


class InstantBroker(Client):
    """A broker that takes every job with `get job` (never renewing a lease, as the original's)
    and reports it finished at once; `ran` lists the job ids it ran. Driven by `step`, so a
    test can run it between the pipeliner's steps, or in a thread of its own."""

    def __init__(self, api, broadcast):
        super().__init__(api, broadcast)
        self.broadcast_subscribe("new job")
        self.ran = []

    def step(self, wait_ms=10):
        """Runs every queued job; then waits up to `wait_ms` for a `new job`."""
        while True:
            job = self.ask({"command": "get job"})
            if job.get("worker") is None:
                break
            self.ran.append(job["job id"])
            self.ask({"command": "job finished", "job id": job["job id"], "duration": 0.001})
        if self.broadcast_poll(wait_ms):
            self.broadcast_receive()


def wait_for(condition, timeout, what, step=None):
    """Polls `condition` (running `step()` between tries, or waiting 10 ms on nothing) until
    it holds; fails saying `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    poller = zmq.Poller()
    while not condition():
        assert time.monotonic() < deadline, "no {} within {} s".format(what, timeout)
        if step is not None:
            step()
        else:
            poller.poll(10)
