"""Our broker and pipeliner against a stand-in of the original's router (legacy_router.py),
which knows only the legacy commands: they fall back to those commands, say what is lost, and
pipelines finish. The binaries come from `PYPELININ_BROKER` and `PYPELININ_PIPELINER`
(example/tests/legacy.rs sets them to the example's `my_broker` and `my_pipeliner`)."""
import json
import os
import signal
import subprocess
import sys

import pytest

from legacy import PipelineManager, wait_for

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def processes():
    started = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()


def binary(name):
    path = os.environ.get(name)
    if not path:
        pytest.fail("set {} (`cargo nextest run -p pypelinin-example legacy` sets it)".format(name))
    return path


def test_our_broker_and_pipeliner_finish_pipelines_on_the_original_router(processes, tmp_path):
    router = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "legacy_router.py")],
        stdout=subprocess.PIPE, text=True,
    )
    processes.append(router)
    line = router.stdout.readline().split()
    assert line and line[0] == "listening", line
    endpoints = dict(part.split("=", 1) for part in line[1:])
    api, broadcast = endpoints["api"], endpoints["broadcast"]

    logs = {}
    for name, extra in (("PYPELININ_BROKER", ["--noop-workers", "2"]),
                        ("PYPELININ_PIPELINER", [])):
        logs[name] = tmp_path / "{}.log".format(name)
        with open(logs[name], "w") as log:
            processes.append(subprocess.Popen(
                [binary(name), "--api", api, "--broadcast", broadcast] + extra,
                stdout=log, stderr=subprocess.STDOUT,
                env=dict(os.environ, RUST_LOG="info", NO_COLOR="1"),
            ))

    client = PipelineManager(api, broadcast)
    n = 20
    for i in range(n):
        # Half with data large enough that, to our router, the pipeliner would send it as
        # "data from pipeline": to the original's it must send the data itself.
        data = {"filename": "{}.dat".format(i)}
        if i % 2:
            data["payload"] = "x" * 4000
        client.start({"Noop0": ["Noop1"], "Noop1": []}, data)
    # And pipelines whose first job fails (the Downloader has no URL to fetch): the original's
    # router knows no failure, so the broker reports it finished and the pipeline goes on, as
    # the original's broker did.
    failing = 3
    for i in range(failing):
        client.start({"Downloader": ["Noop0"], "Noop0": []}, {"filename": "f{}.dat".format(i)})
    try:
        client.wait_all(60)
    except AssertionError:
        for name, path in logs.items():
            print("---", name, "\n", path.read_text()[-4000:])
        raise

    # Both daemons said, once, what the fallback loses.
    for name, path in logs.items():
        wait_for(lambda: "the original pypelinin" in path.read_text(), 10,
                 "the fallback warning of " + name)
        assert path.read_text().count("the original pypelinin") == 1, path.read_text()

    # What the router answered: every job and pipeline finished once, nothing unknown.
    router.send_signal(signal.SIGTERM)
    counts = json.loads(router.stdout.readline())
    total = n + failing
    assert counts["add pipeline -> pipeline accepted"] == total
    assert counts["add job -> job accepted"] == 2 * total
    assert counts["job finished -> good job!"] == 2 * total
    assert counts["pipeline finished -> good job!"] == total
    assert logs["PYPELININ_BROKER"].read_text().count("job failed") >= failing
    assert not [k for k in counts if "unknown job id" in k or "unknown pipeline id" in k], counts
    assert "add job without data" not in counts, counts
