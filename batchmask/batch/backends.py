"""One class per object store behind :class:`~batchmask.batch.storage.Storage`: S3, Google Cloud
Storage, Azure Blob Storage, HTTP(S), and any other fsspec filesystem.

Each backend knows how to open its fsspec filesystem (with timeouts and bounded retries), how to
list a prefix *one page at a time* (a bucket of ten million keys is never held in memory), and
how to read and write one object with a version tag under a condition (the output lock's
``If-None-Match`` / ``If-Match``). :data:`BACKENDS` maps a URL scheme to its backend.

Listing order: S3 (AWS, MinIO) and GCS return keys in UTF-8 byte order, which is code point
order; Azure Blob Storage returns them in lexicographic order too. Whatever the server's order,
a backend yields it unchanged, so a listing is repeatable; SeaweedFS, for one, lists folder by
folder. A filesystem without a paged listing (:class:`WholeListing`) is listed whole, sorted,
with a warning once per process.

The generic :class:`Backend`, :class:`WholeListing` and the errors are defined in
:mod:`.backendbase`; all are importable from here.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

from .backendbase import (  # noqa: F401  (defined there, part of this module's interface)
    Backend,
    MissingExtra,
    NoConditionalWrites,
    PreconditionFailed,
    WholeListing,
)

log = logging.getLogger(__name__)

#: S3 client limits (botocore): seconds to connect, seconds a socket read may stall, attempts per
#: request; s3fs retries a timed-out request ``S3FS_RETRIES`` times in all. Together they bound a
#: call to a stalled endpoint to about 2 minutes instead of hanging. ``storage_options``
#: (``config_kwargs``) may override the botocore values.
S3_CONNECT_TIMEOUT_S = 5
S3_READ_TIMEOUT_S = 20
S3_MAX_ATTEMPTS = 2
S3FS_RETRIES = 3
#: GCS: seconds one request may take (gcsfs retries a failed request itself, up to 6 times with
#: exponential backoff, on 5xx, 429 and connection errors).
GCS_REQUEST_TIMEOUT_S = 60
#: Azure: seconds to connect and seconds a read may stall (the Azure SDK retries 3 times).
AZURE_CONNECT_TIMEOUT_S = 5
AZURE_READ_TIMEOUT_S = 20
#: HTTP(S): seconds to connect, seconds a read may stall, and attempts per GET (connection
#: errors, timeouts and 5xx answers are retried, 0.5 s then 1 s apart; 404 never is).
HTTP_CONNECT_TIMEOUT_S = 5
HTTP_READ_TIMEOUT_S = 20
HTTP_ATTEMPTS = 3


class S3(Backend):
    name = "S3"

    def open_fs(self, url: str, options: dict[str, Any], endpoint_url: str | None) -> tuple[Any, str]:
        cfg = dict(options.get("config_kwargs") or {})
        cfg.setdefault("connect_timeout", S3_CONNECT_TIMEOUT_S)
        cfg.setdefault("read_timeout", S3_READ_TIMEOUT_S)
        cfg.setdefault("retries", {"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"})
        options = dict(options, config_kwargs=cfg)
        if endpoint_url:
            ck = dict(options.get("client_kwargs") or {})
            ck.setdefault("endpoint_url", endpoint_url)
            options["client_kwargs"] = ck
        fs, root = super().open_fs("s3://" + url.split("://", 1)[1], options, endpoint_url)
        fs.retries = S3FS_RETRIES
        return fs, root

    def pages(self, fs: Any, bucket: str, key_prefix: str, page_size: int) -> Iterator[list[str]]:
        token = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": key_prefix, "MaxKeys": page_size}
            if token:
                kwargs["ContinuationToken"] = token
            page = fs.call_s3("list_objects_v2", **kwargs)
            yield [obj["Key"] for obj in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")

    def ping(self, fs: Any, bucket: str) -> None:
        fs.call_s3("list_objects_v2", Bucket=bucket, MaxKeys=1)

    def get_tagged(self, fs: Any, path: str) -> tuple[bytes | None, str | None]:
        from fsspec.asyn import sync

        bucket, key = path.split("/", 1)

        async def get() -> tuple[bytes, str]:
            r = await fs._call_s3("get_object", Bucket=bucket, Key=key)
            async with r["Body"] as body:
                return await body.read(), r.get("ETag")

        try:
            return sync(fs.loop, get)
        except FileNotFoundError:
            return None, None

    def put_tagged(self, fs: Any, path: str, body: bytes, if_none_match: bool = False,
                   if_match: str | None = None) -> str | None:
        bucket, key = path.split("/", 1)
        cond = {"IfNoneMatch": "*"} if if_none_match else {"IfMatch": if_match} if if_match else {}
        try:
            return fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body, **cond).get("ETag")
        except OSError as exc:
            # only 412: a 409 (a concurrent conditional write, to be retried) stays s3fs's error
            if cond and _s3_status(exc) == 412:
                raise PreconditionFailed(f"{path}: precondition failed") from exc
            raise


def _s3_status(exc: BaseException) -> int:
    """HTTP status of an s3fs error, from the botocore error it was translated from."""
    for e in (exc, exc.__cause__, exc.__context__):
        resp = getattr(e, "response", None)
        if isinstance(resp, dict):
            code = resp.get("Error", {}).get("Code", "")
            if code == "PreconditionFailed":
                return 412
            return int(resp.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return 0


class GCS(Backend):
    """Google Cloud Storage through gcsfs's JSON-API filesystem. (gcsfs >= 2025.x's default class
    first asks a gRPC control API whether a bucket is zonal or hierarchical, per bucket and with a
    60 s timeout where that API is absent, as in emulators; plain buckets need none of it.)"""

    name = "GCS"
    extra, package = "gcs", "gcsfs"

    def open_fs(self, url: str, options: dict[str, Any], endpoint_url: str | None) -> tuple[Any, str]:
        from gcsfs.core import GCSFileSystem

        options = dict(options)
        options.setdefault("requests_timeout", GCS_REQUEST_TIMEOUT_S)
        if os.environ.get("STORAGE_EMULATOR_HOST") or options.get("endpoint_url"):
            options.setdefault("token", "anon")  # emulators take no credentials
        fs = GCSFileSystem(**options)
        return fs, GCSFileSystem._strip_protocol(url)

    def pages(self, fs: Any, bucket: str, key_prefix: str, page_size: int) -> Iterator[list[str]]:
        token = None
        while True:
            kw: dict[str, Any] = {"prefix": key_prefix, "maxResults": page_size,
                                  "fields": "items(name),nextPageToken"}
            if token:
                kw["pageToken"] = token
            page = fs.call("GET", "b/{}/o", bucket, json_out=True, **kw)
            yield [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken")
            if not token:
                return

    def ping(self, fs: Any, bucket: str) -> None:
        fs.call("GET", "b/{}/o", bucket, json_out=True, maxResults=1, fields="nextPageToken")

    def get_tagged(self, fs: Any, path: str) -> tuple[bytes | None, str | None]:
        bucket, key = path.split("/", 1)
        try:
            headers, data = fs.call("GET", f"{fs._location}/download/storage/v1/b/{quote(bucket, safe='')}/o/"
                                    f"{quote(key, safe='')}", alt="media")
        except FileNotFoundError:
            return None, None
        return data, headers.get("x-goog-generation")

    def put_tagged(self, fs: Any, path: str, body: bytes, if_none_match: bool = False,
                   if_match: str | None = None) -> str | None:
        bucket, key = path.split("/", 1)
        kw: dict[str, Any] = {}
        if if_none_match:
            kw["ifGenerationMatch"] = "0"
        elif if_match and if_match != "*":
            if not if_match.isdigit():  # not a generation: no object has it (GCS would answer 400)
                raise PreconditionFailed(f"{path}: precondition failed")
            kw["ifGenerationMatch"] = if_match
        elif if_match:  # "*" (exists): GCS has no such condition; the current generation instead
            kw["ifGenerationMatch"] = str(fs.info(path).get("generation"))
        try:
            out = fs.call("POST", f"{fs._location}/upload/storage/v1/b/{quote(bucket, safe='')}/o",
                          uploadType="media", name=key, data=body, json_out=True,
                          headers={"Content-Type": "application/octet-stream"}, **kw)
        except FileExistsError as exc:  # gcsfs's translation of 412 Precondition Failed
            raise PreconditionFailed(f"{path}: precondition failed") from exc
        fs.invalidate_cache(path)
        return str(out.get("generation")) if out.get("generation") is not None else None


class Azure(Backend):
    """Azure Blob Storage through adlfs; listing and conditional writes through its SDK client."""

    name = "Azure Blob"
    extra, package = "azure", "adlfs"

    def open_fs(self, url: str, options: dict[str, Any], endpoint_url: str | None) -> tuple[Any, str]:
        from adlfs import AzureBlobFileSystem

        options = dict(options)
        options.setdefault("connection_timeout", AZURE_CONNECT_TIMEOUT_S)
        options.setdefault("read_timeout", AZURE_READ_TIMEOUT_S)
        fs = AzureBlobFileSystem(**options)
        return fs, AzureBlobFileSystem._strip_protocol(url)

    def _sync(self, fs: Any, coro_fn: Any) -> Any:
        from fsspec.asyn import sync

        return sync(fs.loop, coro_fn)

    def pages(self, fs: Any, bucket: str, key_prefix: str, page_size: int) -> Iterator[list[str]]:
        container = fs.service_client.get_container_client(bucket)
        token: str | None = None
        while True:
            async def one_page(token: str | None = token) -> tuple[list[str], str | None]:
                it = container.list_blobs(name_starts_with=key_prefix or None, include=["metadata"],
                                          results_per_page=page_size).by_page(continuation_token=token)
                page = await it.__anext__()
                # Folders of accounts with a hierarchical namespace (ADLS Gen2) are blobs too
                return [b.name async for b in page if (b.metadata or {}).get("hdi_isfolder") != "true"], \
                    it.continuation_token

            try:
                names, token = self._sync(fs, one_page)
            except StopAsyncIteration:
                return
            yield names
            if not token:
                return

    def ping(self, fs: Any, bucket: str) -> None:
        from azure.core.exceptions import ResourceNotFoundError

        container = fs.service_client.get_container_client(bucket)
        try:
            self._sync(fs, container.get_container_properties)
        except ResourceNotFoundError as exc:
            raise FileNotFoundError(f"container {bucket!r} not found") from exc

    def _blob(self, fs: Any, path: str) -> Any:
        bucket, key = path.split("/", 1)
        return fs.service_client.get_blob_client(bucket, key)

    def get_tagged(self, fs: Any, path: str) -> tuple[bytes | None, str | None]:
        from azure.core.exceptions import ResourceNotFoundError

        blob = self._blob(fs, path)

        async def get() -> tuple[bytes, str]:
            dl = await blob.download_blob()
            return await dl.readall(), dl.properties.etag

        try:
            return self._sync(fs, get)
        except ResourceNotFoundError:
            return None, None

    def put_tagged(self, fs: Any, path: str, body: bytes, if_none_match: bool = False,
                   if_match: str | None = None) -> str | None:
        from azure.core import MatchConditions
        from azure.core.exceptions import ResourceExistsError, ResourceModifiedError

        blob = self._blob(fs, path)
        kw: dict[str, Any] = {"overwrite": not if_none_match}  # overwrite=False: If-None-Match: *
        if if_match:
            kw.update(etag=if_match, match_condition=MatchConditions.IfNotModified)

        async def put() -> dict:
            return await blob.upload_blob(body, **kw)

        try:
            out = self._sync(fs, put)
        except (ResourceExistsError, ResourceModifiedError) as exc:
            raise PreconditionFailed(f"{path}: precondition failed") from exc
        fs.invalidate_cache(path)
        return out.get("etag")


class HTTP(Backend):
    """Plain HTTP(S) servers: read-only, never listed (a URL names one file)."""

    name = "HTTP"
    writable = listable = False
    max_key_bytes = None

    def open_fs(self, url: str, options: dict[str, Any], endpoint_url: str | None) -> tuple[Any, str]:
        import aiohttp
        from fsspec.implementations.http import HTTPFileSystem

        options = dict(options)
        ck = dict(options.pop("client_kwargs", None) or {})
        ck.setdefault("timeout", aiohttp.ClientTimeout(total=None, connect=HTTP_CONNECT_TIMEOUT_S,
                                                       sock_connect=HTTP_CONNECT_TIMEOUT_S,
                                                       sock_read=HTTP_READ_TIMEOUT_S))
        return HTTPFileSystem(client_kwargs=ck, **options), url.rstrip("/")

    def pages(self, fs: Any, bucket: str, key_prefix: str, page_size: int) -> Iterator[list[str]]:
        raise NotImplementedError("cannot list http(s) URLs; use --input-list")

    def ping(self, fs: Any, bucket: str) -> None:
        raise NotImplementedError("http(s) URLs are read-only")

    def read(self, fs: Any, path: str, max_bytes: int | None) -> tuple[bytes, int | None]:
        """One GET (retried on connection errors, timeouts and 5xx), read up to ``max_bytes`` + 1."""
        import aiohttp
        from fsspec.asyn import sync

        async def get() -> tuple[bytes, int | None]:
            session = await fs.set_session()
            async with session.get(fs.encode_url(path), **fs.kwargs) as r:
                if r.status == 404:
                    raise FileNotFoundError(f"{path}: 404 Not Found")
                r.raise_for_status()
                size = r.content_length
                if max_bytes is not None and size is not None and size > max_bytes:
                    return b"", size
                return await r.content.read(-1 if max_bytes is None else max_bytes + 1), size

        for attempt in range(HTTP_ATTEMPTS):
            try:
                return sync(fs.loop, get)
            except (TimeoutError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
                err: Exception = exc
            except aiohttp.ClientResponseError as exc:
                if exc.status < 500:
                    raise
                err = exc
            if attempt + 1 < HTTP_ATTEMPTS:
                log.debug("GET failed (%s); retrying", err)
                time.sleep(0.5 * 2**attempt)
        raise ConnectionError(f"no answer after {HTTP_ATTEMPTS} attempts ({type(err).__name__}: {err})") from err

    def get_tagged(self, fs: Any, path: str) -> tuple[bytes | None, str | None]:
        raise NotImplementedError("http(s) URLs are read-only")

    def put_tagged(self, fs: Any, path: str, body: bytes, if_none_match: bool = False,
                   if_match: str | None = None) -> str | None:
        raise NotImplementedError("http(s) URLs are read-only")


#: URL scheme -> backend. Schemes fsspec knows but not named here get :class:`WholeListing`.
BACKENDS: dict[str, Backend] = {
    "s3": S3(), "s3a": S3(),
    "gs": GCS(), "gcs": GCS(),
    "az": Azure(), "abfs": Azure(),
    "http": HTTP(), "https": HTTP(),
}


def backend_for(scheme: str) -> Backend:
    return BACKENDS.get(scheme.lower(), WholeListing())
