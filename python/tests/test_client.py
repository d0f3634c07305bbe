"""The client against a real cluster: the example's my_router, my_broker (no-op workers) and
my_pipeliner, from PYPELININ_ROUTER, PYPELININ_BROKER and PYPELININ_PIPELINER (set by
example/tests/python.rs)."""
import os
import subprocess

import pytest
import zmq

from pypelinin import Job, Pipeline, PipelineManager, RouterError


@pytest.fixture
def cluster(tmp_path):
    binaries = {}
    for name in ("PYPELININ_ROUTER", "PYPELININ_BROKER", "PYPELININ_PIPELINER"):
        binaries[name] = os.environ.get(name) or pytest.fail(
            "set {} (`cargo nextest run -p pypelinin-example python` sets it)".format(name))
    started = []
    env = dict(os.environ, RUST_LOG="warn")
    try:
        router = subprocess.Popen(
            [binaries["PYPELININ_ROUTER"], "--api", "tcp://127.0.0.1:0", "--broadcast",
             "tcp://127.0.0.1:0", "--home", str(tmp_path), "--no-store"],
            stdout=subprocess.PIPE, stderr=open(tmp_path / "router.log", "w"), text=True, env=env)
        started.append(router)
        line = router.stdout.readline().split()
        assert line and line[0] == "listening", line
        endpoints = dict(part.split("=", 1) for part in line[1:])
        api, broadcast = endpoints["api"], endpoints["broadcast"]
        for name, extra in (("PYPELININ_BROKER", ["--noop-workers", "2"]), ("PYPELININ_PIPELINER", [])):
            started.append(subprocess.Popen(
                [binaries[name], "--api", api, "--broadcast", broadcast] + extra,
                stdout=subprocess.DEVNULL, stderr=open(tmp_path / (name + ".log"), "w"), env=env))
        yield api, broadcast
    finally:
        for process in started:
            process.kill()
            process.wait()


def chain(n, *workers):
    jobs = [Job(w) for w in workers]
    graph = {jobs[i]: jobs[i + 1] for i in range(len(jobs) - 1)}
    graph[jobs[-1]] = None
    return Pipeline(graph, data={"filename": "doc-{}".format(n)})


def test_the_originals_loop_sees_every_pipeline_end(cluster):
    manager = PipelineManager(*cluster)
    pipelines = [chain(i, "Noop0", "Noop1") for i in range(20)]
    for pipeline in pipelines:
        manager.start(pipeline)
    with pytest.raises(ValueError):
        manager.start(pipelines[0])
    # What the original's callers wrote.
    for _ in range(400):
        if manager.finished_pipelines == manager.started_pipelines:
            break
        manager.update(0.5)
    assert manager.finished_pipelines == manager.started_pipelines == 20
    assert all(p.finished and p.state == "finished" and p.duration >= 0 for p in pipelines)


def test_a_failure_ends_the_wait_with_its_job_and_error(cluster):
    manager = PipelineManager(*cluster)
    # The Downloader finds no URL in the data: it fails (after the router's retries).
    failing = chain(0, "Downloader", "Noop1")
    manager.start(failing)
    manager.wait([failing], timeout=60)
    assert failing.state == "failed"
    assert failing.failure["worker"] == "Downloader"
    assert "url" in failing.failure["error"]


def test_wait_times_out_and_cancel_ends_a_pipeline(cluster):
    manager = PipelineManager(*cluster)
    stuck = chain(0, "NobodyRunsThis")
    manager.start(stuck)
    with pytest.raises(TimeoutError):
        manager.wait([stuck], timeout=1)
    assert manager.status([stuck])[stuck.id]["state"] in ("queued", "running")
    manager.cancel(stuck)
    manager.wait([stuck], timeout=30)
    assert stuck.state == "cancelled"
    with pytest.raises(RouterError):
        manager.cancel(stuck)


def test_missed_broadcasts_are_caught_up_from_the_router(cluster):
    manager = PipelineManager(*cluster, resync_secs=0.5)
    # Deaf: it hears no broadcast at all.
    for prefix in PipelineManager.ENDS:
        manager._sub.setsockopt_string(zmq.UNSUBSCRIBE, prefix)
    pipeline = chain(0, "Noop0", "Noop1")
    manager.start(pipeline)
    manager.wait([pipeline], timeout=30)
    assert pipeline.state == "finished"


def test_pipelines_export_to_dot_and_refuse_cycles(tmp_path):
    a, b, c = Job("A"), Job("B"), Job("C")
    pipeline = Pipeline({a: (b, c), (b, c): None})
    assert pipeline.starters == (a,)
    path = tmp_path / "p.dot"
    pipeline.save_dot(str(path))
    assert '"A" -> "B";' in path.read_text()
    with pytest.raises(ValueError):
        Pipeline({a: b, b: a})
    with pytest.raises(ValueError):
        Pipeline({a: "not a job"})
