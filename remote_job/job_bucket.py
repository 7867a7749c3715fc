"""Artifacts that survive the machine: upload a folder to s3:// or gs:// with a sha256 manifest, and fetch it back.

Every upload ends with `MANIFEST.sha256.json` ({relative path: {"sha256", "size"}}), written last, so a
reader knows the set is complete and can verify each file: the same guarantee as the SSH pull.

Credentials are the machine's own: S3 through boto3's default chain (the instance role first; endpoint from
`AWS_ENDPOINT_URL`, which boto3 honours); GCS through the JSON API with the service account's token from the
metadata server (or `GCS_OAUTH_TOKEN`), endpoint from `STORAGE_EMULATOR_HOST` as google-cloud-storage does.
Standard library only, except boto3 for s3:// (imported when needed).
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.parse
import urllib.request

MANIFEST = "MANIFEST.sha256.json"


def split(url: str) -> tuple[str, str, str]:
    """'s3://bucket/a/b' -> ('s3', 'bucket', 'a/b')."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("s3", "gs") or not parsed.netloc:
        raise ValueError(f"bucket URL {url!r} is not s3://BUCKET/PREFIX or gs://BUCKET/PREFIX")
    return parsed.scheme, parsed.netloc, parsed.path.strip("/")


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts if p)])


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def manifest_of(folder: str) -> dict[str, dict]:
    """Regular files only: symlinks and specials are never uploaded (they could point anywhere)."""
    out = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not os.path.islink(os.path.join(root, d)) and not d.startswith(".tmp-"))
        for name in sorted(files):
            path = os.path.join(root, name)
            if os.path.islink(path) or not os.path.isfile(path) or name == MANIFEST:
                continue
            rel = os.path.relpath(path, folder).replace(os.sep, "/")
            out[rel] = {"sha256": sha256_file(path), "size": os.path.getsize(path)}
    return out


def latest_checkpoint(out_dir: str) -> str | None:
    """Newest complete checkpoints/checkpoint-<step> folder (job_checkpoints' layout)."""
    root = os.path.join(out_dir, "checkpoints")
    try:
        names = [n for n in os.listdir(root) if n.startswith("checkpoint-") and n[11:].isdigit()]
    except OSError:
        return None
    names = [n for n in names if is_complete(os.path.join(root, n))]
    return os.path.join(root, max(names, key=lambda n: int(n[11:]))) if names else None


def is_complete(checkpoint: str) -> bool:
    return os.path.isfile(os.path.join(checkpoint, "COMPLETE"))


class _S3:
    def __init__(self, bucket: str):
        try:
            import boto3
        except ImportError as exc:
            raise RuntimeError("s3:// needs boto3 on the machine (pip install boto3)") from exc
        from botocore.config import Config

        # a bucket that does not answer costs seconds, not minutes (`ftplan runs --refresh` is bounded per run)
        config = Config(connect_timeout=10, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"})
        self.client, self.bucket = boto3.client("s3", config=config), bucket

    def put(self, key: str, path: str) -> None:
        self.client.upload_file(path, self.bucket, key)

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def get_to(self, key: str, path: str) -> None:
        self.client.download_file(self.bucket, key, path)

    def keys(self, prefix: str) -> list[str]:
        out = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            out += [o["Key"] for o in page.get("Contents", [])]
        return out


class _GCS:
    def __init__(self, bucket: str):
        host = os.environ.get("STORAGE_EMULATOR_HOST", "https://storage.googleapis.com").rstrip("/")
        self.base = host if "://" in host else "http://" + host
        self.bucket = bucket
        self.token = os.environ.get("GCS_OAUTH_TOKEN") or (None if "STORAGE_EMULATOR_HOST" in os.environ
                                                            else _metadata_token())

    def _req(self, url: str, data: bytes | None = None, method: str = "GET") -> bytes:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.read()

    def put(self, key: str, path: str) -> None:
        with open(path, "rb") as fh:
            data = fh.read()
        q = urllib.parse.urlencode({"uploadType": "media", "name": key})
        self._req(f"{self.base}/upload/storage/v1/b/{self.bucket}/o?{q}", data=data, method="POST")

    def get(self, key: str) -> bytes:
        return self._req(f"{self.base}/storage/v1/b/{self.bucket}/o/{urllib.parse.quote(key, safe='')}?alt=media")

    def get_to(self, key: str, path: str) -> None:
        with open(path, "wb") as fh:
            fh.write(self.get(key))

    def keys(self, prefix: str) -> list[str]:
        """objects.list with `prefix`, following nextPageToken."""
        out, token = [], None
        while True:
            q = {"prefix": prefix, **({"pageToken": token} if token else {})}
            page = json.loads(self._req(f"{self.base}/storage/v1/b/{self.bucket}/o?{urllib.parse.urlencode(q)}"))
            out += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken")
            if not token:
                return out


def _metadata_token() -> str:
    req = urllib.request.Request(
        "http://metadata.google.internal/computeMetadata/v1/instance/service-accounts/default/token",
        headers={"Metadata-Flavor": "Google"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())["access_token"]


def store_for(url: str):
    scheme, bucket, prefix = split(url)
    return (_S3(bucket) if scheme == "s3" else _GCS(bucket)), prefix


def put_file(path: str, url: str) -> None:
    """One file to `url` (the watchdog's status copy, read by `ftplan runs --refresh` once the machine is gone)."""
    store, key = store_for(url)
    store.put(key, path)


def get_json(url: str) -> dict | None:
    """A small JSON object at `url`; None when it is absent or not a JSON object."""
    store, key = store_for(url)
    try:
        value = json.loads(store.get(key))
    except Exception:  # noqa: BLE001 - absent (NoSuchKey / HTTP 404) or unreadable: nothing there
        return None
    return value if isinstance(value, dict) else None


def checkpoints_in(url: str) -> list[str]:
    """Names of the checkpoints under `<url>/checkpoints/` whose upload completed (their manifest is there),
    oldest first by step: what a resume can fetch with `download_tree`."""
    store, prefix = store_for(join(url, "checkpoints"))
    names = set()
    for key in store.keys(prefix + "/"):
        parts = key[len(prefix) + 1:].split("/")
        if len(parts) == 2 and parts[1] == MANIFEST and parts[0].startswith("checkpoint-") and parts[0][11:].isdigit():
            names.add(parts[0])
    return sorted(names, key=lambda n: int(n[11:]))


def upload_tree(folder: str, url: str) -> int:
    """Upload every regular file of `folder` under `url`, then the manifest; returns the file count."""
    store, prefix = store_for(url)
    manifest = manifest_of(folder)
    for rel in manifest:
        store.put(f"{prefix}/{rel}" if prefix else rel, os.path.join(folder, rel))
    tmp = os.path.join(folder, MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=0, sort_keys=True)
    store.put(f"{prefix}/{MANIFEST}" if prefix else MANIFEST, tmp)
    os.remove(tmp)
    return len(manifest)


def download_tree(url: str, dest: str) -> dict[str, dict]:
    """Fetch a manifest-complete upload into `dest`, verifying every file; raises ValueError on a mismatch.

    Files land in a staging folder beside `dest` that replaces it only once every file verified, so a
    failed or tampered fetch never costs an earlier good copy. Paths come from the manifest, which is data
    from the machine: anything absolute or climbing out of `dest` is refused."""
    import shutil
    import tempfile

    store, prefix = store_for(url)
    manifest = json.loads(store.get(f"{prefix}/{MANIFEST}" if prefix else MANIFEST))
    if not isinstance(manifest, dict):
        raise ValueError("bucket manifest is not a JSON object")
    final = os.path.realpath(dest)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".partial-", dir=os.path.dirname(final))
    try:
        _fetch_verified(store, prefix, manifest, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.replace(staging, final)
    return manifest


def _fetch_verified(store, prefix: str, manifest: dict, root: str) -> None:
    root = os.path.realpath(root)
    for rel, meta in manifest.items():
        target = os.path.realpath(os.path.join(root, rel))
        if os.path.isabs(rel) or not target.startswith(root + os.sep):
            raise ValueError(f"unsafe path in bucket manifest: {rel!r}")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        store.get_to(f"{prefix}/{rel}" if prefix else rel, target)
        if not isinstance(meta, dict) or sha256_file(target) != meta.get("sha256"):
            raise ValueError(f"{rel} does not match the bucket manifest's sha256")
