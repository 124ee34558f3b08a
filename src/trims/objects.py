"""Every object-storage call the daemon makes: boto3 for ``s3://``, fsspec for other schemes.

One S3 library, not two: boto3 gives each thread its own connection and reads a range
straight into a buffer (``readinto``), and it does not fight s3fs's aiobotocore over which
botocore to install. Anything else fsspec reaches (``gs://``, ``az://``, ``https://``,
``file://``) goes through fsspec with one copy per read. Every call is retried; backend
errors come out as :class:`StorageError` naming the URL.
"""

from __future__ import annotations

import posixpath
import threading
import time
from pathlib import Path
from typing import Any, Callable

from .errors import IntegrityError, StorageError

RETRIES = 3


def location_problem(url: str) -> str | None:
    """Why ``url`` cannot be a place to keep objects (``scheme://bucket/prefix``, or
    ``file:///absolute/path``), or None. fsspec takes anything else for a path relative to the
    daemon's working directory, where uploads would land as files anyone could read."""
    scheme, sep, rest = url.partition("://")
    if not sep or not scheme.isascii() or not scheme.isalnum():
        return f"{url!r} is not a URL like s3://bucket/prefix"
    if scheme == "file":
        return None if rest.startswith("/") else f"{url!r}: a file:// location needs an absolute path, file:///..."
    if not rest.split("/", 1)[0]:
        return f"{url!r} names no bucket: write {scheme}://bucket/prefix"
    return None


class Objects:
    def __init__(self, connections: int = 16) -> None:
        self.connections = connections  # how many requests may be in flight at once
        self._s3 = None
        self._lock = threading.Lock()

    def size(self, url: str) -> int:
        return self.head(url)[0]

    def head(self, url: str) -> tuple[int, str | None]:
        """An object's size and version: S3's ETag, which :meth:`read_into` can require, so
        that reads made one after another all come from the same object; None elsewhere."""
        if _is_s3(url):
            bucket, key = _split(url)
            head = retry(lambda: self._s3_client().head_object(Bucket=bucket, Key=key), f"sizing {url}")
            return head["ContentLength"], head.get("ETag")
        fs, path = _filesystem(url)
        return int(retry(lambda: fs.size(path), f"sizing {url}")), None

    def list(self, url: str) -> list[str]:
        """Names of the objects directly under ``url``, as under a directory."""
        if _is_s3(url):
            bucket, key = _split(url)
            prefix = key.rstrip("/") + "/" if key else ""
            pages = self._s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
            keys = retry(lambda: [o["Key"] for page in pages for o in page.get("Contents", [])], f"listing {url}")
        else:
            fs, path = _filesystem(url)
            keys = retry(lambda: fs.ls(path, detail=False), f"listing {url}")
        return sorted(k.rsplit("/", 1)[-1] for k in keys)

    def read_into(self, url: str, start: int, view: memoryview, version: str | None = None) -> None:
        """Fill ``view`` with the object's bytes from ``start``; of that ``version`` of it (an
        ETag from :meth:`head`) or fail with IntegrityError."""
        if _is_s3(url):
            retry(lambda: self._s3_read_into(url, start, view, version), f"reading {url}")
            return
        fs, path = _filesystem(url)
        data = retry(lambda: fs.cat_file(path, start=start, end=start + len(view)), f"reading {url}")
        if len(data) != len(view):
            raise IntegrityError(f"{url} returned {len(data)} bytes for a {len(view)}-byte range: the object changed")
        view[:] = data

    def upload(self, path: Path, url: str) -> None:
        if _is_s3(url):
            from boto3.s3.transfer import TransferConfig

            bucket, key = _split(url)
            config = TransferConfig(max_concurrency=self.connections, multipart_chunksize=16 * 1024 * 1024)
            retry(lambda: self._s3_client().upload_file(str(path), bucket, key, Config=config), f"uploading to {url}")
            return
        fs, remote = _filesystem(url)

        def put() -> None:
            fs.makedirs(posixpath.dirname(remote), exist_ok=True)  # a no-op on object stores
            fs.put_file(str(path), remote)

        retry(put, f"uploading to {url}")

    def delete(self, url: str) -> None:
        if _is_s3(url):
            bucket, key = _split(url)
            retry(lambda: self._s3_client().delete_object(Bucket=bucket, Key=key), f"deleting {url}")
            return
        fs, path = _filesystem(url)
        retry(lambda: fs.rm_file(path), f"deleting {url}")

    def _s3_read_into(self, url: str, start: int, view: memoryview, version: str | None) -> None:
        bucket, key = _split(url)
        pinned = {"IfMatch": version} if version else {}
        response = self._s3_client().get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{start + len(view) - 1}",
                                                **pinned)
        body, done = response["Body"], 0
        try:
            while done < len(view):
                got = body.readinto(view[done:])
                if got == 0:
                    raise IntegrityError(f"{url} ended {len(view) - done} bytes short of a range: the object changed")
                done += got
        finally:
            body.close()

    def _s3_client(self):
        with self._lock:
            if self._s3 is None:
                try:
                    import boto3
                    from botocore.config import Config
                except ImportError:
                    raise StorageError("s3:// needs boto3: pip install 'trims[s3]'") from None
                config = Config(max_pool_connections=self.connections, retries={"max_attempts": RETRIES, "mode": "standard"})
                self._s3 = boto3.session.Session().client("s3", config=config)
            return self._s3


def retry(call: Callable[[], Any], doing: str) -> Any:
    """``call()``, tried up to RETRIES times; backend errors become StorageError."""
    for attempt in range(RETRIES):
        try:
            return call()
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 - any backend error may be transient
            if _missing(exc):
                raise StorageError(f"{doing}: no such object or bucket") from None
            if _error_code(exc) in ("PreconditionFailed", "412"):
                raise IntegrityError(f"{doing}: the object was replaced while it was being read; push it again "
                                     "once it stays as it is") from None
            if attempt == RETRIES - 1:
                raise StorageError(f"{doing} failed after {RETRIES} tries: {exc}") from None
            time.sleep(0.2 * 2**attempt)
    raise AssertionError("unreachable")  # pragma: no cover


def _missing(exc: Exception) -> bool:
    return isinstance(exc, FileNotFoundError) or _error_code(exc) in ("404", "NoSuchKey", "NoSuchBucket", "NotFound")


def _error_code(exc: Exception) -> str:
    return getattr(exc, "response", {}).get("Error", {}).get("Code", "")


def _is_s3(url: str) -> bool:
    return url.startswith("s3://")


def _split(url: str) -> tuple[str, str]:
    bucket, _, key = url[len("s3://"):].partition("/")
    return bucket, key


def _filesystem(url: str):
    try:
        import fsspec
    except ImportError:
        raise StorageError(f"{url.split('://')[0]}:// needs fsspec and its backend: pip install 'trims[gcs]' or similar") from None
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise StorageError(f"cannot reach {url}: {exc}") from None
