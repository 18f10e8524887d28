"""Storage addressed by URI, on pyarrow.fs: a local path, s3:// or gs://.

Every write is atomic: bytes go to a temporary name beside the target and are then renamed (copy then
delete on object stores, where a rename is not atomic but the temporary name is never read). Readers
therefore see the old file or the new one, never half of one.

Keys are '/'-separated paths relative to the storage root, e.g. `tenants/acme/loras/<id>/lora.safetensors`.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs


class StorageError(RuntimeError):
    """A storage operation failed; the message names the key and what to do."""


class IntegrityError(StorageError):
    """A file does not match the sha256 its manifest recorded."""


_TMP_MARK = ".tmp-"


def _check_key(key: str) -> str:
    if not key or key.startswith("/") or "\\" in key:
        raise StorageError(f"invalid storage key {key!r}: keys are relative '/'-separated paths")
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise StorageError(f"invalid storage key {key!r}: empty, '.' or '..' segments are not allowed")
    return key


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Storage:
    """A root URI and the pyarrow filesystem that serves it."""

    uri: str
    fs: pafs.FileSystem
    root: str  # path inside `fs`
    is_local: bool

    @classmethod
    def from_uri(cls, uri: str | os.PathLike, *, s3_endpoint: str | None = None) -> "Storage":
        """`uri` is a local path, `file://...`, `s3://bucket/prefix` or `gs://bucket/prefix`.

        For S3-compatible servers (MinIO, moto) pass `s3_endpoint` or set `KLEIN_S3_ENDPOINT`.
        """
        uri = str(uri)
        parsed = urlparse(uri)
        if parsed.scheme in ("", "file"):
            path = Path(parsed.path if parsed.scheme == "file" else uri).expanduser().resolve()
            path.mkdir(parents=True, exist_ok=True)
            return cls(uri=str(path), fs=pafs.LocalFileSystem(), root=str(path), is_local=True)
        if parsed.scheme == "s3":
            endpoint = s3_endpoint or os.environ.get("KLEIN_S3_ENDPOINT")
            kwargs: dict[str, Any] = {}
            if endpoint:
                ep = urlparse(endpoint)
                kwargs.update(endpoint_override=ep.netloc or ep.path, scheme=ep.scheme or "http")
            if os.environ.get("AWS_REGION"):
                kwargs["region"] = os.environ["AWS_REGION"]
            fs = pafs.S3FileSystem(**kwargs)
            return cls(uri=uri, fs=fs, root=(parsed.netloc + parsed.path).rstrip("/"), is_local=False)
        if parsed.scheme == "gs":
            fs = pafs.GcsFileSystem()
            return cls(uri=uri, fs=fs, root=(parsed.netloc + parsed.path).rstrip("/"), is_local=False)
        raise StorageError(f"unsupported storage URI {uri!r}: use a local path, s3://bucket/prefix or gs://bucket/prefix")

    # -- paths ---------------------------------------------------------------------------------------
    def path(self, key: str) -> str:
        return posixpath.join(self.root, _check_key(key))

    def local_path(self, key: str) -> Path:
        """The filesystem path of `key`; only for local storage (e.g. to hand a folder to a library)."""
        if not self.is_local:
            raise StorageError(f"{self.uri} is not local storage; read {key!r} with read_bytes instead")
        return Path(self.path(key))

    def uri_of(self, key: str) -> str:
        return self.path(key) if self.is_local else f"{urlparse(self.uri).scheme}://{self.path(key)}"

    # -- reads ---------------------------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        return self.fs.get_file_info(self.path(key)).type != pafs.FileType.NotFound

    def read_bytes(self, key: str) -> bytes:
        try:
            with self.fs.open_input_stream(self.path(key)) as f:
                return f.read()
        except FileNotFoundError as e:
            raise StorageError(f"{self.uri_of(key)} does not exist") from e

    def read_json(self, key: str) -> Any:
        data = self.read_bytes(key)
        try:
            return json.loads(data)
        except json.JSONDecodeError as e:
            raise StorageError(f"{self.uri_of(key)} is not valid JSON: {e}") from e

    def list(self, prefix: str = "", *, recursive: bool = False) -> list[str]:
        """Keys under `prefix` (files and folders; temporaries of unfinished writes are hidden)."""
        base = self.path(prefix) if prefix else self.root
        sel = pafs.FileSelector(base, allow_not_found=True, recursive=recursive)
        keys = []
        for info in self.fs.get_file_info(sel):
            name = info.path[len(self.root) :].lstrip("/")
            if _TMP_MARK in posixpath.basename(name):
                continue
            keys.append(name)
        return sorted(keys)

    # -- writes --------------------------------------------------------------------------------------
    def write_bytes(self, key: str, data: bytes) -> str:
        """Atomically write `data` at `key`; returns its sha256."""
        target = self.path(key)
        parent = posixpath.dirname(target)
        self.fs.create_dir(parent, recursive=True)
        tmp = posixpath.join(parent, f"{_TMP_MARK}{uuid.uuid4().hex}-{posixpath.basename(target)}")
        try:
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            if self.is_local:
                os.replace(tmp, target)  # atomic on POSIX
            else:
                self.fs.move(tmp, target)  # object stores: copy then delete
        except BaseException:
            try:
                self.fs.delete_file(tmp)
            except Exception:
                pass
            raise
        return sha256_bytes(data)

    def write_json(self, key: str, obj: Any) -> str:
        return self.write_bytes(key, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def delete(self, key: str) -> None:
        p = self.path(key)
        info = self.fs.get_file_info(p)
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(p)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(p)

    # -- manifests -----------------------------------------------------------------------------------
    def read_verified(self, key: str, expected_sha256: str) -> bytes:
        """Read `key` and check it against the sha256 a manifest recorded."""
        data = self.read_bytes(key)
        actual = sha256_bytes(data)
        if actual != expected_sha256:
            raise IntegrityError(
                f"{self.uri_of(key)} is corrupt: sha256 {actual[:12]}… does not match the manifest's "
                f"{expected_sha256[:12]}…; re-run the job that wrote it"
            )
        return data
