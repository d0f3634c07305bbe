#!/usr/bin/env python3
"""A pypelinin process worker in Python: text statistics.

Started once by the broker, it serves job after job over the line protocol of
docs/workers.md: a hello line first, then for each job line on stdin (its "input" holds
"text") one answer line on stdout. Anything on stderr shows in the error of a job it fails
by dying.
"""
import json
import re
import sys


def stats(text):
    words = re.findall(r"\w+", text)
    sentences = [s for s in re.split(r"[.!?]+", text) if s.strip()]
    return {
        "stats": {
            "characters": len(text),
            "sentences": len(sentences),
            "average word length": round(sum(map(len, words)) / len(words), 2) if words else 0,
        }
    }


print(json.dumps({"hello": "pypelinin worker", "protocol": 1, "workers": ["TextStats"]}), flush=True)
for line in sys.stdin:
    job = json.loads(line)
    try:
        answer = {"job id": job["job id"], "result": stats(job["input"]["text"])}
    except Exception as e:  # the job fails with the error; the process goes on
        answer = {"job id": job["job id"], "error": repr(e)}
    print(json.dumps(answer), flush=True)
