"""`ftplan pull RUN`: a run's artifacts from wherever they are, verified against their sha256 manifest.

The machine's watchdog uploads to the run's bucket (`bucket` in the run's config) when no launcher pulled
before it powered off; this fetches that upload. While the machine is still up, `ftplan attach RUN` pulls
over SSH as the launcher does.
"""

from __future__ import annotations

from pathlib import Path

import click

from ftplan.planner.errors import UserError


def bucket_url(config: dict, run_id: str) -> str | None:
    """Where the watchdog puts a run's final artifacts: <bucket>/<run id>/final."""
    bucket = (config or {}).get("bucket")
    return f"{str(bucket).rstrip('/')}/{run_id}/final" if bucket else None


@click.command()
@click.argument("run_id")
@click.option("--dest", type=click.Path(file_okay=False), help="Folder to write into (default runs/RUN/bucket).")
@click.option("--bucket", "bucket_override", help="s3://... or gs://... when the run record has none.")
@click.option("--store", "store_path", type=click.Path(dir_okay=False))
def pull(run_id, dest, bucket_override, store_path):
    """Fetch a run's artifacts from its bucket, verified."""
    from ftplan.planner.commands.report import _store

    store = _store(store_path)
    row = store.get_run(run_id)
    if row is None:
        raise UserError(f"no run {run_id!r} in the store; 'ftplan runs' lists the ids")
    url = f"{bucket_override.rstrip('/')}/{run_id}/final" if bucket_override else bucket_url(row.json("config_json"), run_id)
    if not url:
        raise UserError(f"run {run_id} has no bucket: while its machine is up, 'ftplan attach {run_id}' pulls over "
                        f"SSH; otherwise its artifacts are in {row.artifacts_dir or 'runs/' + run_id}")
    if url.startswith("s3://"):
        try:
            import boto3  # noqa: F401
        except ImportError:
            raise UserError("pulling from s3:// needs boto3: pip install 'ftplan[aws]'") from None
    from ftplan.remote_job import job_bucket

    target = Path(dest) if dest else Path(row.artifacts_dir or f"runs/{run_id}") / "bucket"
    try:
        manifest = job_bucket.download_tree(url, str(target))
    except ValueError as exc:
        raise UserError(f"the artifacts at {url} failed verification: {exc}") from None
    except Exception as exc:  # botocore/urllib errors: say where and why in one line
        from ftplan.providers.errors import scrub

        raise UserError(f"could not fetch {url}: {scrub(str(exc))}") from None
    size = sum(int(m.get("size", 0)) for m in manifest.values())
    click.echo(f"pulled {len(manifest)} files ({size / 2**20:.1f} MiB) from {url} into {target}, sha256 verified")
