"""The client: describe pipelines and run them on a pypelinin cluster (needs ``pyzmq``).

The names and behaviour of the original pypelinin 0.1.1's client (``Job``, ``Pipeline``,
``PipelineManager`` with ``start``, ``update``, ``finished``, ``finished_pipelines``), so its
users' scripts keep working, plus what this project adds: a failed or cancelled pipeline ends
too (``pipeline.state``, ``pipeline.failure``), ``wait`` with a timeout, ``status``,
``cancel``, and a re-sync from the router when a broadcast was missed.
"""
import json
import time
import uuid

try:
    import zmq
except ImportError:  # pragma: no cover - said when a client is made
    zmq = None

__all__ = ["Job", "Pipeline", "PipelineManager", "RouterError"]


class RouterError(Exception):
    """The router refused a request, or could not be reached."""


class Job(object):
    """A job of a pipeline: the worker that runs it. Jobs are equal when their workers are."""

    def __init__(self, worker_name, data=None):
        self.worker_name = worker_name
        self.data = data

    def __repr__(self):
        return "Job({!r})".format(self.worker_name)

    def __eq__(self, other):
        return type(self) == type(other) and self.worker_name == other.worker_name

    def __ne__(self, other):
        return not self.__eq__(other)

    def __hash__(self):
        return hash(self.worker_name)

    def serialize(self):
        """The job in the original's serialized form (pairs)."""
        item = [["worker_name", self.worker_name]]
        if self.data is not None:
            item.append(["data", [[k, v] for k, v in self.data.items()]])
        return item


class Pipeline(object):
    """A DAG of jobs: ``{Job("A"): [Job("B"), Job("C")], Job("B"): Job("D"), Job("D"): None}``
    (a key may also be a tuple of jobs), or a list of ``(job, job_or_None)`` edges. Every job
    carries the pipeline's ``data``. Raises ``ValueError`` for a graph with a cycle or without
    a starting job."""

    def __init__(self, pipeline, data=None):
        self.data = data
        self.id = None
        self.finished = False
        self.duration = None
        self.state = None
        self.failure = None
        self.started_at = None
        edges = []
        if isinstance(pipeline, dict):
            for keys, values in pipeline.items():
                keys = list(keys) if isinstance(keys, (tuple, list)) else [keys]
                values = list(values) if isinstance(values, (tuple, list)) else [values]
                values = [v for v in values if v is not None]
                for key in keys:
                    if not values:
                        edges.append((key, None))
                    for value in values:
                        edges.append((key, value))
        else:
            edges = [tuple(edge) for edge in pipeline]
        for key, value in edges:
            if not isinstance(key, Job) or not isinstance(value, (Job, type(None))):
                raise ValueError("Only `Job` objects are accepted")
        self._graph = edges
        nodes = []
        for key, value in edges:
            for job in (key, value):
                if job is not None and job not in nodes:
                    nodes.append(job)
        self.jobs = tuple(nodes)
        targets = {value for _, value in edges if value is not None}
        self.starters = tuple(job for job in self.jobs if job not in targets)
        if not self.starters or self._has_cycle():
            raise ValueError("The pipeline graph have cycles or do not have a starter job")
        if data is not None:
            for job in self.jobs:
                job.data = data

    def _has_cycle(self):
        children = {job: [v for k, v in self._graph if k == job and v is not None] for job in self.jobs}
        state = {}

        def visit(job):
            state[job] = "open"
            for child in children[job]:
                if state.get(child) == "open" or (child not in state and visit(child)):
                    return True
            state[job] = "done"
            return False

        return any(job not in state and visit(job) for job in self.jobs)

    def __repr__(self):
        return "Pipeline({!r}, id={!r}, state={!r})".format(
            [(k.worker_name, v.worker_name if v else None) for k, v in self._graph], self.id, self.state)

    def serialize(self):
        """The pipeline in the original's serialized form (pairs), as ``add pipeline`` sends it."""
        graph = [[key.serialize(), value.serialize() if value is not None else None]
                 for key, value in self._graph]
        data = None if self.data is None else [[k, v] for k, v in self.data.items()]
        return [["graph", graph], ["data", data]]

    def to_dot(self):
        """The DAG in Graphviz DOT."""
        lines = ["digraph pipeline {"]
        for job in self.jobs:
            lines.append('    "{}";'.format(job.worker_name))
        for key, value in self._graph:
            if value is not None:
                lines.append('    "{}" -> "{}";'.format(key.worker_name, value.worker_name))
        lines.append("}")
        return "\n".join(lines) + "\n"

    def save_dot(self, filename):
        """Writes the DAG in Graphviz DOT to ``filename``."""
        with open(filename, "w") as f:
            f.write(self.to_dot())


class PipelineManager(object):
    """Starts pipelines and follows them to their end.

    It subscribes to every pipeline end before it adds any pipeline, so none is missed, and
    asks the router for the state of pipelines it has not heard of for ``resync_secs``.
    """

    ENDS = ("pipeline finished: ", "pipeline failed: ", "pipeline cancelled: ")

    def __init__(self, api, broadcast, poll_time=50, token=None, timeout_secs=10.0, resync_secs=2.0):
        if zmq is None:
            raise ImportError("the client needs pyzmq: pip install 'pypelinin[client]'")
        self.poll_time = poll_time
        self.token = token
        self.timeout_ms = int(timeout_secs * 1000)
        self.resync_secs = resync_secs
        self._api_address = api
        self._context = zmq.Context.instance()
        self._api = None
        self._sub = self._context.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.connect(broadcast)
        for prefix in self.ENDS:
            self._sub.setsockopt_string(zmq.SUBSCRIBE, prefix)
        self._pipelines = {}
        self.started_pipelines = 0
        self.finished_pipelines = 0
        self._heard_at = time.monotonic()

    # The API socket: a REQ socket made again after a request that got no answer.
    def _request(self, request):
        if self.token:
            request = dict(request, token=self.token)
        for attempt in range(2):
            if self._api is None:
                self._api = self._context.socket(zmq.REQ)
                self._api.setsockopt(zmq.LINGER, 0)
                self._api.setsockopt(zmq.RCVTIMEO, self.timeout_ms)
                self._api.setsockopt(zmq.SNDTIMEO, self.timeout_ms)
                self._api.connect(self._api_address)
            try:
                self._api.send_json(request)
                return self._api.recv_json()
            except zmq.Again:
                self._api.close()
                self._api = None
        raise RouterError("the router at {} did not answer within {} s".format(
            self._api_address, self.timeout_ms / 1000))

    @property
    def pipelines(self):
        """The pipelines started by this manager."""
        return iter(list(self._pipelines.values()))

    def start(self, pipeline):
        """Adds ``pipeline`` to the cluster; returns its id. Raises ``ValueError`` if it was
        started already, ``RouterError`` if the router refuses it."""
        if pipeline.id is not None:
            raise ValueError("This pipeline was already started")
        # A request id makes a retried request add one pipeline, not two.
        answer = self._request({"command": "add pipeline", "pipeline": pipeline.serialize(),
                                "request id": uuid.uuid4().hex})
        if answer.get("answer") != "pipeline accepted":
            raise RouterError("the router refused the pipeline: {}".format(answer.get("error") or answer))
        pipeline.id = str(answer["pipeline id"])
        pipeline.finished = False
        pipeline.state = "queued"
        pipeline.started_at = time.time()
        self._pipelines[pipeline.id] = pipeline
        self.started_pipelines += 1
        return pipeline.id

    def _ended(self, pipeline_id, state, duration=None, failure=None):
        pipeline = self._pipelines.get(pipeline_id)
        if pipeline is None or pipeline.finished:
            return
        pipeline.finished = True
        pipeline.state = state
        pipeline.duration = duration
        pipeline.failure = failure
        self.finished_pipelines += 1

    def _on_event(self, message):
        for prefix in self.ENDS:
            if message.startswith(prefix):
                break
        else:
            return
        fields = {}
        rest = message[len(prefix):]
        if prefix == "pipeline failed: ":
            # id=ID, job=J, worker=W, error=TEXT (the error text may hold commas)
            head, _, error = rest.partition(", error=")
            for part in head.split(", "):
                key, _, value = part.partition("=")
                fields[key] = value
            self._ended(fields.get("id"), "failed", failure={
                "job id": fields.get("job"), "worker": fields.get("worker"), "error": error})
            return
        for part in rest.split(", "):
            key, _, value = part.partition("=")
            fields[key] = value
        if prefix == "pipeline finished: ":
            try:
                duration = float(fields.get("duration"))
            except (TypeError, ValueError):
                duration = None
            self._ended(fields.get("id"), "finished", duration=duration)
        else:
            self._ended(fields.get("id"), "cancelled")

    def update(self, timeout=None):
        """Takes in the ends broadcast so far: reads while one arrives within ``poll_time`` ms
        (and ``timeout`` seconds have not passed), as the original did; then asks the router
        about pipelines not heard of for ``resync_secs``."""
        started = time.monotonic()
        while self._sub.poll(self.poll_time):
            self._on_event(self._sub.recv_string())
            self._heard_at = time.monotonic()
            if timeout is not None and time.monotonic() - started >= timeout:
                break
        if time.monotonic() - self._heard_at >= self.resync_secs:
            self.resync()

    def resync(self):
        """Asks the router how the pending pipelines stand, catching ends whose broadcast was
        missed."""
        self._heard_at = time.monotonic()
        pending = [p.id for p in self._pipelines.values() if not p.finished]
        for i in range(0, len(pending), 1000):
            statuses = self.status(pending[i:i + 1000])
            for pipeline_id, status in statuses.items():
                self._take_status(pipeline_id, status)

    def _take_status(self, pipeline_id, status):
        state = status.get("state")
        pipeline = self._pipelines.get(pipeline_id)
        if pipeline is not None and not pipeline.finished and state in ("queued", "running"):
            pipeline.state = state
        if state == "finished":
            self._ended(pipeline_id, "finished", duration=status.get("duration"))
        elif state == "failed":
            self._ended(pipeline_id, "failed", failure={
                "job id": status.get("job id"), "worker": status.get("worker"), "error": status.get("error")})
        elif state == "cancelled":
            self._ended(pipeline_id, "cancelled")

    def finished(self, pipeline):
        """Deprecated (the original's): whether ``pipeline`` ended, after an ``update``."""
        if pipeline.id is None or pipeline.id not in self._pipelines:
            raise ValueError("This pipeline is not being managed by this PipelineManager")
        self.update(self.poll_time * 10 / 1000.0)
        return pipeline.finished

    def wait(self, pipelines=None, timeout=None):
        """Waits until ``pipelines`` (default: every one started) have ended — finished, failed
        or cancelled — and returns them. Raises ``TimeoutError`` after ``timeout`` seconds."""
        pipelines = list(self._pipelines.values()) if pipelines is None else list(pipelines)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not all(p.finished for p in pipelines):
            if deadline is not None and time.monotonic() >= deadline:
                left = [p.id for p in pipelines if not p.finished]
                raise TimeoutError("{} pipeline(s) did not end within {} s: {}".format(
                    len(left), timeout, ", ".join(left[:5])))
            self.update(0.5)
        return pipelines

    def status(self, pipeline_ids):
        """The router's status of ``pipeline_ids`` (pipelines or ids): {id: {"state": ...}}."""
        ids = [p.id if isinstance(p, Pipeline) else p for p in pipeline_ids]
        answer = self._request({"command": "pipeline status", "pipeline ids": ids})
        if answer.get("answer") != "status":
            raise RouterError("the router refused pipeline status: {}".format(answer.get("error") or answer))
        return answer.get("pipelines", {})

    def cancel(self, pipeline):
        """Cancels ``pipeline`` (or an id): its running jobs are stopped and it ends as
        cancelled. Raises ``RouterError`` when it ended already or is unknown."""
        pipeline_id = pipeline.id if isinstance(pipeline, Pipeline) else pipeline
        answer = self._request({"command": "cancel pipeline", "pipeline id": pipeline_id})
        if answer.get("answer") != "pipeline cancelled":
            raise RouterError(answer.get("error") or str(answer))

    def close(self):
        """Closes the sockets."""
        if self._api is not None:
            self._api.close()
        self._sub.close()
