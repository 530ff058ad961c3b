"""URLs and relative paths: which locations are remote, which relative paths are safe under a
root (no ``..``, no absolute paths), how a file's URL splits into its store's root and the path
in it, and how to show a URL or an error message without the credentials it may carry."""

from __future__ import annotations

import os
import re
from urllib.parse import unquote, urlsplit, urlunsplit


class UnsafePathError(ValueError):
    """A relative path that would read or write outside the storage root."""


_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(path: str) -> bool:
    """True for ``scheme://...`` locations (s3://, gs://, file://, ...); job files use it too."""
    return _URL_RE.match(path) is not None


def is_remote(url: str) -> bool:
    """A URL other than ``file://``: read and written through fsspec, not the local filesystem."""
    return is_url(url) and not url.startswith("file://")


def resolve_endpoint(endpoint_url: str | None = None) -> str | None:
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def check_url_rel(rel: str) -> str:
    """``rel`` if it is a safe path below an HTTP(S) root, with an optional ``?query``: the path
    part (percent-decoded, so ``%2e%2e`` counts as ``..``) must pass :func:`check_rel`; the query is
    sent as it is. A ``#fragment`` is refused (it is never sent to a server)."""
    path, sep, query = rel.partition("?")
    if "#" in rel:
        raise UnsafePathError(f"refusing {rel!r}: a URL fragment ('#') names no file")
    try:
        check_rel(unquote(path, errors="strict"))
    except UnicodeDecodeError as exc:
        raise UnsafePathError(f"refusing unsafe path {rel!r} (malformed percent-encoding)") from exc
    if "%2f" in path.lower() or "%5c" in path.lower():
        raise UnsafePathError(f"refusing unsafe path {rel!r} (an encoded '/' or '\\')")
    return rel


def check_rel(rel: str) -> str:
    """Return ``rel`` if it is a safe relative POSIX path, else raise :class:`UnsafePathError`."""
    # A drive letter ("c:/x.jpg") only means something on Windows; on POSIX and in S3 keys it
    # is an ordinary name.
    drive = os.name == "nt" and len(rel) > 1 and rel[1] == ":"
    if not rel or rel.startswith("/") or "\\" in rel or "\x00" in rel or drive:
        raise UnsafePathError(f"refusing unsafe path {rel!r} (absolute or malformed)")
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise UnsafePathError(f"refusing unsafe path {rel!r} (empty, '.' or '..' segment)")
    return rel


#: Secrets that travel inside URLs and connection strings: Azure SAS signatures (``sig=``), account
#: keys, presigned S3/GCS URLs' signatures (V4 and the older V2 ``Signature=``), CloudFront's signed
#: ``Policy=``, and bearer tokens.
_SECRET_PARAMS = re.compile(r"(?i)\b(sig|AccountKey|SharedAccessSignature|X-Amz-Signature|X-Amz-Credential|"
                            r"X-Amz-Security-Token|X-Goog-Signature|X-Goog-Credential|Signature|Policy|"
                            r"access_token|token)=[^&;\s'\"]+")


def redact_urls(text: str) -> str:
    """``text`` without any ``user:password@`` in the URLs it contains, nor the secrets that URLs
    and connection strings carry (``sig=``, ``AccountKey=``, presigned URLs' signatures)."""
    text = re.sub(r"://[^/\s@]+@", "://", text)
    return _SECRET_PARAMS.sub(lambda m: f"{m.group(1)}=<redacted>", text)


def _redact(exc: BaseException) -> str:
    return f"{type(exc).__name__}: " + redact_urls(str(exc))


def strip_userinfo(url: str | None) -> str | None:
    """``url`` without a ``user:password@`` part (safe to log or record)."""
    if not url or "@" not in url or "://" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return url.split("://", 1)[0] + "://<redacted>"
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def public_url(url: str | None) -> str | None:
    """``url`` without credentials: no ``user:password@``, no SAS signature or presigned-URL secret."""
    return redact_urls(strip_userinfo(url)) if url else url


def has_userinfo(url: str) -> bool:
    """True for a URL with a ``user:password@`` part (credentials, never to be stored or echoed)."""
    return is_url(url) and strip_userinfo(url) != url


_FAMILY = {"s3a": "s3", "gcs": "gs", "abfs": "az", "http": "https"}


def split_entry_url(url: str) -> tuple[str, str]:
    """(root URL, relative path) of one file's URL: ``gs://bucket/a/b.jpg`` -> (``gs://bucket``,
    ``a/b.jpg``); ``https://host/p/x.jpg?q=1`` -> (``https://host``, ``p/x.jpg?q=1``). The relative
    path is checked (:func:`check_rel`, or :func:`check_url_rel` for HTTP(S)): no ``..`` escapes."""
    if not is_remote(url):
        raise ValueError(f"{public_url(url)}: not a URL of an object store or web server")
    scheme, rest = url.split("://", 1)
    family = _FAMILY.get(scheme.lower(), scheme.lower())
    if family == "https":
        parts = urlsplit(url)
        if not parts.netloc:
            raise UnsafePathError(f"{public_url(url)}: no host")
        rel = parts.path.lstrip("/") + (f"?{parts.query}" if parts.query else "")
        if parts.fragment:
            raise UnsafePathError(f"{public_url(url)}: a URL fragment ('#') names no file")
        return f"{parts.scheme.lower()}://{parts.netloc}", check_url_rel(rel)
    bucket, _, rel = rest.partition("/")
    if not bucket:
        raise UnsafePathError(f"{public_url(url)}: no bucket")
    return f"{scheme}://{bucket}", check_rel(rel)
