"""File helpers of the dataset loaders: gzip-transparent reads, MD5 checks, downloads.

A gzipped file is told by its magic bytes, not by its name, and checksums are of the
*decompressed* content, so a re-gzipped copy of a standard file still passes.
"""
from __future__ import annotations

import gzip
import hashlib
import http.client
import urllib.request
import zlib

DOWNLOAD_TIMEOUT_S = 60


def md5_hex(content: bytes) -> str:
    return hashlib.md5(content, usedforsecurity=False).hexdigest()


def gunzip(raw: bytes, where: str) -> bytes:
    """`raw` decompressed if gzipped (told by the gzip magic bytes, not by a file name)."""
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"{where}: corrupt or truncated gzip file ({exc}); delete it and fetch it again") from exc


def read_file(path: str) -> bytes:
    """The content of `path`, decompressed if it is gzipped."""
    with open(path, "rb") as f:
        return gunzip(f.read(), path)


def check_md5(path: str, content: bytes, expected: str) -> None:
    got = md5_hex(content)
    if got != expected:
        raise ValueError(f"{path}: checksum mismatch: the MD5 of its (decompressed) content is {got}, expected "
                         f"{expected} for the standard file. It is corrupt or not the standard file: delete it "
                         f"and fetch it again")


def fetch(urls: list[str]) -> tuple[str, bytes]:
    """(url, body) from the first of `urls` that answers; OSError listing every failure otherwise."""
    errors = []
    for url in urls:
        request = urllib.request.Request(url, headers={"User-Agent": "dvp_fast"})
        try:
            with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response:
                return url, response.read()
        except (OSError, http.client.HTTPException, ValueError) as exc:  # URLError is an OSError
            errors.append(f"{url}: {exc}")
    raise OSError("; ".join(errors))


def no_network_error(dataset: str, folder: str, names: list[str], reason: str) -> FileNotFoundError:
    return FileNotFoundError(f"{dataset}: could not download {', '.join(names)} ({reason}). Without a network, "
                             f"put these files in {folder}: {', '.join(names)}")
