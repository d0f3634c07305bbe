"""The original's broker, pipeliner and client (stand-ins in legacy.py) against our router:
nothing runs twice, nothing waits forever, nothing crashes."""
from legacy import Client, InstantBroker, LegacyPipeliner, PipelineManager, wait_for

CHAIN = {"A": ["B"], "B": ["C"], "C": []}


def test_a_legacy_broker_that_never_renews_runs_a_long_job_once(start_router):
    # The usual job lease is 1 s; the legacy lease 20 s; the job takes 2.5 s.
    router = start_router("job_lease_secs = 1\nlegacy_lease_secs = 20\n")
    client = Client(router.api)
    broker = Client(router.api)
    other = Client(router.api, router.broadcast)
    other.broadcast_subscribe("new job")
    added = client.ask({"command": "add job", "worker": "Slow", "data": {"n": 1}})
    assert added["answer"] == "job accepted"
    job = broker.ask({"command": "get job"})
    assert job["job id"] == added["job id"]

    # While the broker "runs" the job, another legacy broker keeps asking, as the original's
    # loop did (it polls its broadcast socket between asks).
    asked = []

    def ask_again():
        again = other.ask({"command": "get job"})
        assert again == {"worker": None}, "the running job was handed out again: {}".format(again)
        asked.append(again)
        other.broadcast_poll(50)

    import time

    started = time.monotonic()
    wait_for(lambda: time.monotonic() - started >= 2.5, 10, "2.5 s of running", step=ask_again)
    assert len(asked) > 5
    done = broker.ask({"command": "job finished", "job id": job["job id"], "duration": 2.5})
    assert done == {"answer": "good job!"}


# The two tests below subscribe only after the work they wait for ended (the original's race
# at its worst). The router holds such ends for `legacy_subscribe_grace_secs` (0.2 s by
# default): they set it to 2 s, so a loaded machine (CI runs many tests at once) is not what
# decides whether the subscription comes in time.
LATE_SUBSCRIBER_GRACE = "legacy_subscribe_grace_secs = 2.0\n"


def test_a_legacy_pipeliner_hears_jobs_that_finished_before_it_subscribed(start_router):
    router = start_router(LATE_SUBSCRIBER_GRACE)
    broker = InstantBroker(router.api, router.broadcast)

    def finish_first(job_id):
        # The race at its worst: the broker took and finished the job before the pipeliner,
        # which has the reply to its `add job`, subscribes to the job's end.
        wait_for(lambda: job_id in broker.ran, 10, "run of job " + job_id, step=broker.step)

    pipeliner = LegacyPipeliner(router.api, router.broadcast, after_add_reply=finish_first)
    client = PipelineManager(router.api, router.broadcast)
    n = 5
    for i in range(n):
        client.start(CHAIN, {"filename": "{}.dat".format(i)})
    pipeliner.run_until(lambda: len(pipeliner.finished_replies) == n, 30, "end of every pipeline")

    assert sorted(pipeliner.added) == sorted("ABC" * n), "every job added once"
    assert len(set(broker.ran)) == len(broker.ran) == 3 * n, "every job ran once"
    assert len(set(pipeliner.pipelines_taken)) == n, "no pipeline handed out again"
    assert [reply for _, reply in pipeliner.finished_replies] == [{"answer": "good job!"}] * n
    client.wait_all(10)
    assert client.finished_pipelines == n


def test_a_legacy_client_hears_pipelines_that_ended_before_it_subscribed(start_router):
    router = start_router(LATE_SUBSCRIBER_GRACE)
    pipeliner = Client(router.api)
    ends = iter(["finished", "failed"])

    def end_first(pipeline_id):
        # One pipeline finishes and one fails before the client, which has the reply to its
        # `add pipeline`, subscribes to the end.
        taken = pipeliner.ask({"command": "get pipeline"})
        assert taken["pipeline id"] == pipeline_id
        if next(ends) == "finished":
            request = {"command": "pipeline finished", "duration": 0.002}
        else:
            request = {"command": "pipeline failed", "job id": "j", "worker": "A",
                       "error": "boom", "duration": 0.002}
        request["pipeline id"] = pipeline_id
        assert pipeliner.ask(request)["answer"] in ("good job!", "failure recorded")

    client = PipelineManager(router.api, router.broadcast, after_add_reply=end_first)
    client.start(CHAIN, {"filename": "0.dat"})
    client.start(CHAIN, {"filename": "1.dat"})
    client.wait_all(10)
    # Each end heard once: the original's client counts every one it hears.
    client.update(1.0)
    assert client.finished_pipelines == 2


def test_a_pipeline_handed_again_to_a_legacy_pipeliner_does_not_crash_it(start_router):
    # Leases of 1 s, so the pipeline, whose first job waits for a broker, is handed out again.
    router = start_router("pipeline_lease_secs = 1\nlegacy_lease_secs = 1\n")
    client = PipelineManager(router.api, router.broadcast)
    pipeline_id = client.start({"A": ["B"], "B": []}, {"filename": "0.dat"})
    pipeliner = LegacyPipeliner(router.api, router.broadcast)
    pipeliner.run_until(lambda: len(pipeliner.pipelines_taken) == 2, 15, "second hand-out")
    first, second = pipeliner.pipelines_taken
    assert first == pipeline_id
    assert second != pipeline_id, "handed out again under its own id"

    # Now a broker runs both copies' jobs; the pipeliner reports both copies' ends (the
    # original's died here with KeyError when both had one id).
    broker = InstantBroker(router.api, router.broadcast)
    pipeliner.run_until(
        lambda: len(pipeliner.finished_replies) >= 2, 15, "end of both copies",
        also=lambda: broker.step(0),
    )
    answers = [reply["answer"] for _, reply in pipeliner.finished_replies]
    assert answers.count("good job!") == 1, answers
    assert set(answers) == {"good job!", "unknown pipeline id"}, answers
    client.wait_all(10)
    client.update(0.5)
    assert client.finished_pipelines == 1
