"""Fixtures: our router, started as a real process on ephemeral ports.

The router binary comes from `PYPELININ_ROUTER` (router/tests/process.rs runs these tests
with it set to the binary cargo built). Every process started here is killed at the end.
"""
import os
import subprocess
import sys

import pytest


class Router:
    """A running router: its API and broadcast endpoints."""

    def __init__(self, process, api, broadcast):
        self.process = process
        self.api = api
        self.broadcast = broadcast


@pytest.fixture
def start_router(tmp_path):
    """`start_router(settings)` starts our router with `settings` as the `[router]` table of
    its settings file (durable, its data in a temporary folder) and returns a `Router`."""
    binary = os.environ.get("PYPELININ_ROUTER")
    if not binary:
        pytest.fail(
            "set PYPELININ_ROUTER to the pypelinin-router binary "
            "(`cargo nextest run -p pypelinin-router legacy` sets it)"
        )
    started = []

    def start(settings=""):
        config = tmp_path / "cluster-{}.toml".format(len(started))
        config.write_text("[router]\n" + settings)
        process = subprocess.Popen(
            [
                binary,
                "--config",
                str(config),
                "--api",
                "tcp://127.0.0.1:0",
                "--broadcast",
                "tcp://127.0.0.1:0",
                "--data-dir",
                str(tmp_path / "data-{}".format(len(started))),
            ],
            stdout=subprocess.PIPE,
            stderr=sys.stderr,
            env=dict(os.environ, RUST_LOG="warn"),
            text=True,
        )
        started.append(process)
        line = process.stdout.readline().strip()
        assert line.startswith("listening "), "router's first line: {!r}".format(line)
        fields = dict(part.split("=", 1) for part in line.split()[1:])
        return Router(process, fields["api"], fields["broadcast"])

    yield start
    for process in started:
        process.kill()
        process.wait()
