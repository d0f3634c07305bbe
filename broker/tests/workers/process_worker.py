"""A process worker for the tests: speaks the line protocol, and misbehaves on request.

Its job input's "spec" (an object) has a "mode" that says what it does: "pid" (the default) answers its process id;
"error" answers an error with a traceback; "crash" dies, saying why on stderr; "garbage"
prints a line that is not an answer; "hang" starts a child, writes both pids to the input's
"pidfile", and waits forever; "big" answers a result of "bytes" bytes.
"""
import json
import os
import signal
import subprocess
import sys

print(json.dumps({"hello": "pypelinin worker", "protocol": 1, "workers": ["Py", "PyToo"]}), flush=True)
for line in sys.stdin:
    job = json.loads(line)
    data = job["input"]["spec"]
    mode = data.get("mode", "pid")
    answer = {"job id": job["job id"]}
    if mode == "crash":
        print("dying on purpose in job", job["job id"], file=sys.stderr, flush=True)
        os._exit(3)
    elif mode == "garbage":
        print("this is not an answer", flush=True)
        continue
    elif mode == "hang":
        child = subprocess.Popen(["sleep", "600"])
        with open(data["pidfile"], "w") as f:
            f.write("{} {}".format(os.getpid(), child.pid))
        signal.pause()
    elif mode == "error":
        answer.update({"error": "bad input", "traceback": "Traceback (most recent call last):\n  line 1"})
    elif mode == "big":
        answer["result"] = {"big": "x" * data["bytes"]}
    else:
        answer["result"] = {"pid": os.getpid(), "worker": job["worker"]}
    print(json.dumps(answer), flush=True)
