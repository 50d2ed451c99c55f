"""imagepipe's Invoke entry point: wiring only. The tasks live in pipeline/tasks/."""

from pathlib import Path

from pipeline.tasks import collection

ns = collection()
ns.configure({"project_root": str(Path(__file__).resolve().parent)})
