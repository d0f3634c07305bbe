#!/usr/bin/env python3
"""A Python process worker doing nothing (for `bench --worker-language python-process`): it
serves the workers named on its command line and answers every job with an empty result."""
import json
import sys

names = sys.argv[1:]
out = sys.stdout
out.write(json.dumps({"hello": "pypelinin worker", "protocol": 1, "workers": names}) + "\n")
out.flush()
for line in sys.stdin:
    job = json.loads(line)
    out.write(json.dumps({"job id": job["job id"], "result": {}}) + "\n")
    out.flush()
