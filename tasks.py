"""imagepipe's Invoke entry point: wiring only. The tasks live in pipeline/tasks/."""

import atexit
import gc
from pathlib import Path

from pipeline.tasks import collection
from pipeline.tasks.loading import guard_invoke_config

guard_invoke_config()  # before Invoke reads invoke.yaml: a YAML error is one line, not a traceback
root = Path(__file__).resolve().parent
ns = collection(root)
ns.configure({"project_root": str(root)})
# What is loaded by now lives until the process ends: keep the collector from walking it again,
# and at exit (before the interpreter's final collections, ~40 ms) freeze what the task loaded.
gc.freeze()
atexit.register(gc.freeze)
