#!/usr/bin/env python3
"""A pypelinin command worker in Python: text statistics.

Reads the worker input (a JSON object with "text") on stdin, prints the result (a JSON
object) on stdout. Anything on stderr shows in the job's error if it fails.
"""
import json
import re
import sys

document = json.load(sys.stdin)
text = document["text"]
words = re.findall(r"\w+", text)
sentences = [s for s in re.split(r"[.!?]+", text) if s.strip()]
print(json.dumps({
    "stats": {
        "characters": len(text),
        "sentences": len(sentences),
        "average word length": round(sum(map(len, words)) / len(words), 2) if words else 0,
    }
}))
