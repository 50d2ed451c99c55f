"""`invoke doctor`: check this host (tools, accelerator, firmware, disk) against the config."""

from __future__ import annotations

from invoke import Context, Exit

from pipeline.tasks.common import load_config, task


@task(help={"json": "print the report as JSON"})
def doctor(c: Context, json: bool = False) -> None:
    """Check tools, accelerator, UEFI firmware and disk space for the configured images."""
    import json as _json

    from pipeline import doctor as doc
    from pipeline.host import existing_parent, probe

    cfg = load_config(c)
    facts = probe(disk_path=str(existing_parent(cfg.output_dir)))
    report = doc.report(cfg, facts)
    print(_json.dumps(report.as_json(), indent=2) if json else doc.format_text(report))
    if not report.ok:
        raise Exit(code=1)
