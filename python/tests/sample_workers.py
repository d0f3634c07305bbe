"""Workers for the tests, in both styles."""
from pypelinin import worker

# The original pypelinin 0.1.1's style, unchanged: classes named in __all__.
__all__ = ["Upper", "Counter"]


class Upper(object):
    requires = ["text"]

    def process(self, data):
        print("a stray print, which must not reach the protocol")
        return {"upper": data["text"].upper()}


class Counter(object):
    """Counts the jobs of its process: one instance serves them all."""

    requires = []

    def __init__(self):
        self.jobs = 0

    def process(self, data):
        self.jobs += 1
        return {"jobs": self.jobs}


@worker("CountWords", requires=["text"])
def count_words(data):
    if data["text"] == "boom":
        raise ValueError("cannot count a boom")
    return {"words": len(data["text"].split())}


@worker("NotADict")
def not_a_dict(data):
    return ["a", "list"]
