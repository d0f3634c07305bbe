"""Workers in Python, served over the broker's line protocol (docs/workers.md, "Process
workers").

Two styles, in one module or several:

- a function decorated with ``@worker("Name", requires=["field"])``: it takes the job's input
  (a dict of the required fields) and returns a dict;
- a class named in the module's ``__all__`` with ``requires`` (a list, default empty) and
  ``process(self, data)`` returning a dict: how workers of the original pypelinin 0.1.1 are
  written, so they run unchanged. One instance serves every job of the process.

``python3 -m pypelinin.worker MODULE_OR_FILE [...]`` loads the modules (a path ending in ``.py``,
or a module name importable from the working directory), says hello with the workers found,
and serves jobs until stdin closes.
"""
import importlib
import importlib.util
import inspect
import json
import os
import sys
import traceback

PROTOCOL = 1
HELLO = "pypelinin worker"

# Functions registered by @worker, by module: {module name: {worker name: (function, requires)}}.
_decorated = {}


def worker(name, requires=()):
    """Registers the decorated function as the worker ``name``, needing ``requires``."""

    def register(function):
        _decorated.setdefault(function.__module__, {})[name] = (function, list(requires))
        function.pypelinin_worker = name
        return function

    return register


def load(target):
    """The module ``target``: a ``.py`` file, or a module name importable from the working
    directory."""
    if target.endswith(".py"):
        path = os.path.abspath(target)
        name = os.path.splitext(os.path.basename(path))[0]
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ImportError("cannot load {}".format(target))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    return importlib.import_module(target)


def collect(module):
    """The workers of ``module``: {name: (callable taking the input, requires)}."""
    found = {}
    for name, (function, requires) in _decorated.get(module.__name__, {}).items():
        found[name] = (function, requires)
    for name in getattr(module, "__all__", []):
        item = getattr(module, name, None)
        if inspect.isclass(item) and callable(getattr(item, "process", None)):
            instance = item()
            found[name] = (instance.process, list(getattr(item, "requires", [])))
    return found


def answer_for(workers, line):
    """The answer line (a dict) to the job ``line``."""
    job = json.loads(line)
    job_id = job.get("job id")
    entry = workers.get(job.get("worker"))
    if entry is None:
        return {"job id": job_id, "error": "this process does not serve worker {!r}".format(job.get("worker"))}
    function, _ = entry
    try:
        result = function(job.get("input", {}))
    except Exception as error:  # the job fails with it; the process goes on
        return {"job id": job_id, "error": "{}: {}".format(type(error).__name__, error),
                "traceback": traceback.format_exc()}
    if not isinstance(result, dict):
        return {"job id": job_id, "error": "the worker returned {} instead of a dict".format(type(result).__name__)}
    return {"job id": job_id, "result": result}


def serve(workers, stdin=None, stdout=None):
    """Says hello, then answers every job line of ``stdin`` on ``stdout`` until it closes. While
    a worker runs, ``sys.stdout`` is stderr: a stray print cannot garble the protocol."""
    stdin = stdin or sys.stdin
    protocol = stdout or sys.stdout
    sys.stdout = sys.stderr

    def send(obj):
        protocol.write(json.dumps(obj) + "\n")
        protocol.flush()

    send({"hello": HELLO, "protocol": PROTOCOL, "workers": sorted(workers),
          "requires": {name: requires for name, (_, requires) in workers.items()}})
    for line in stdin:
        if line.strip():
            send(answer_for(workers, line))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python3 -m pypelinin.worker MODULE_OR_FILE [...]", file=sys.stderr)
        return 2
    workers = {}
    for target in argv:
        workers.update(collect(load(target)))
    if not workers:
        print("no worker in {}: decorate functions with @worker, or list classes with a "
              "process method in __all__".format(", ".join(argv)), file=sys.stderr)
        return 1
    serve(workers)
    return 0


if __name__ == "__main__":
    # Run as `python3 -m pypelinin.worker`, this file is `__main__`; the workers register with
    # the package's copy (`from pypelinin import worker`), so that copy serves them.
    from pypelinin.worker import main as package_main

    sys.exit(package_main())
