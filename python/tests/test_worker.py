"""`python3 -m pypelinin.worker` over the line protocol, as a broker drives it."""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE = os.path.dirname(HERE)


def start(*targets, cwd=HERE):
    env = dict(os.environ, PYTHONPATH=PACKAGE)
    return subprocess.Popen(
        [sys.executable, "-m", "pypelinin.worker", *targets],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, cwd=cwd, env=env,
    )


def ask(process, job_id, worker, data):
    process.stdin.write(json.dumps({"job id": job_id, "worker": worker, "input": data}) + "\n")
    process.stdin.flush()
    return json.loads(process.stdout.readline())


def test_it_says_hello_with_every_worker_of_both_styles_and_what_they_require():
    process = start("sample_workers.py")
    try:
        hello = json.loads(process.stdout.readline())
        assert hello["hello"] == "pypelinin worker" and hello["protocol"] == 1
        assert hello["workers"] == ["CountWords", "Counter", "NotADict", "Upper"]
        assert hello["requires"]["Upper"] == ["text"]
        assert hello["requires"]["Counter"] == []
        assert hello["requires"]["CountWords"] == ["text"]
    finally:
        process.kill()
        process.wait()


def test_jobs_are_answered_in_turn_errors_with_their_traceback():
    process = start("sample_workers")  # a module name, from the working directory
    try:
        process.stdout.readline()
        assert ask(process, "1", "Upper", {"text": "abc"}) == {"job id": "1", "result": {"upper": "ABC"}}
        assert ask(process, "2", "CountWords", {"text": "a b c"})["result"] == {"words": 3}
        failed = ask(process, "3", "CountWords", {"text": "boom"})
        assert failed["error"] == "ValueError: cannot count a boom"
        assert "count_words" in failed["traceback"]
        assert "instead of a dict" in ask(process, "4", "NotADict", {})["error"]
        assert "does not serve" in ask(process, "5", "Nobody", {})["error"]
        # One instance of a class serves every job of the process.
        assert ask(process, "6", "Counter", {})["result"] == {"jobs": 1}
        assert ask(process, "7", "Counter", {})["result"] == {"jobs": 2}
        # The process went on after the failures, and the stray print went to stderr.
        process.stdin.close()
        assert process.wait(10) == 0
        assert "a stray print" in process.stderr.read()
    finally:
        process.kill()
        process.wait()


def test_a_module_without_workers_is_refused_with_a_reason(tmp_path):
    (tmp_path / "empty.py").write_text("x = 1\n")
    process = start(str(tmp_path / "empty.py"))
    assert process.wait(10) == 1
    assert "no worker in" in process.stderr.read()
