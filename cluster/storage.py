"""Storage addressed by URI, on pyarrow.fs: a local path, s3:// or gs://.

Every write is atomic: bytes go to a temporary name beside the target and are then renamed (copy then
delete on object stores, where a rename is not atomic but the temporary name is never read). Readers
therefore see the old file or the new one, never half of one.

Keys are '/'-separated paths relative to the storage root, e.g. `tenants/acme/loras/<id>/lora.safetensors`.

An artifact is a folder of files plus `manifest.json`, written last, whose `files` maps each file's name
(relative to the folder) to its sha256. A folder without a manifest is unfinished. Readers check files
against the manifest (`verify_manifest`, `read_listed`). Tenants' artifacts live under
`tenants/<tenant>/<kind>/<id>/`; `list_tenant(tenant, kind)` lists the finished ones.

S3-compatible servers (MinIO, moto) take an endpoint override: `s3_endpoint=` or `KLEIN_S3_ENDPOINT`
(credentials from the usual AWS_* variables). A GCS emulator takes `KLEIN_GCS_ENDPOINT`.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlparse

import pyarrow.fs as pafs


class StorageError(RuntimeError):
    """A storage operation failed; the message names the key and what to do."""


class IntegrityError(StorageError):
    """A file does not match the sha256 its manifest recorded."""


_TMP_MARK = ".tmp-"
MANIFEST_NAME = "manifest.json"
TENANTS_ROOT = "tenants"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_CHUNK = 8 * 1024 * 1024


def _check_key(key: str) -> str:
    if not key or key.startswith("/") or "\\" in key:
        raise StorageError(f"invalid storage key {key!r}: keys are relative '/'-separated paths")
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise StorageError(f"invalid storage key {key!r}: empty, '.' or '..' segments are not allowed")
    return key


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_name(value: str, what: str) -> str:
    """A tenant, kind or artifact id: one path segment of letters, digits, '.', '_' or '-'."""
    if not isinstance(value, str) or not _NAME_RE.match(value) or _TMP_MARK in value:
        raise StorageError(
            f"invalid {what} {value!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return value


def tenant_prefix(tenant: str, kind: str, artifact_id: str | None = None) -> str:
    """`tenants/<tenant>/<kind>[/<artifact_id>]`, each part checked."""
    parts = [TENANTS_ROOT, check_name(tenant, "tenant"), check_name(kind, "artifact kind")]
    if artifact_id is not None:
        parts.append(check_name(artifact_id, "artifact id"))
    return "/".join(parts)


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
            gcs_endpoint = os.environ.get("KLEIN_GCS_ENDPOINT")
            if gcs_endpoint:  # an emulator (fake-gcs-server): plain HTTP, no credentials
                ep = urlparse(gcs_endpoint)
                fs = pafs.GcsFileSystem(
                    endpoint_override=ep.netloc or ep.path, scheme=ep.scheme or "http", anonymous=True
                )
            else:
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
        return self._write_atomic(key, lambda out: out.write(data))

    def write_chunks(self, key: str, chunks: Iterable[bytes]) -> str:
        """Atomically write the chunks a producer yields (a large file made piece by piece).

        If the producer fails half-way, nothing new is visible at `key`: the old version stays.
        """

        def fill(out: Any) -> None:
            for chunk in chunks:
                out.write(chunk)

        return self._write_atomic(key, fill)

    def write_from_path(self, key: str, path: str | os.PathLike) -> str:
        """Atomically copy a local file (e.g. a large .safetensors) to `key`, streaming; returns its sha256."""
        with open(path, "rb") as src:
            return self._write_atomic(key, lambda out: _copy_stream(src, out))

    def _write_atomic(self, key: str, fill) -> str:
        """Write through `fill(stream)` into a temporary name beside `key`, then move it into place.

        The sha256 is computed from the bytes actually written. On any error the temporary is
        removed and the old version of `key` (if any) is left as it was.
        """
        target = self.path(key)
        parent = posixpath.dirname(target)
        tmp = posixpath.join(parent, f"{_TMP_MARK}{uuid.uuid4().hex}-{posixpath.basename(target)}")
        digest = hashlib.sha256()
        try:
            if self.is_local:
                Path(parent).mkdir(parents=True, exist_ok=True)
                with open(tmp, "wb") as raw:
                    fill(_HashingWriter(raw, digest))
                    raw.flush()
                    os.fsync(raw.fileno())  # the bytes are on disk before the name points at them
                os.replace(tmp, target)  # atomic on POSIX
                _fsync_dir(parent)
            else:
                self.fs.create_dir(parent, recursive=True)
                with self.fs.open_output_stream(tmp) as out:
                    fill(_HashingWriter(out, digest))
                self.fs.move(tmp, target)  # object stores: copy then delete; the temporary is never read
        except BaseException:
            self._remove_quietly(tmp)
            raise
        return digest.hexdigest()

    def _remove_quietly(self, path: str) -> None:
        try:
            if self.is_local:
                os.unlink(path)
            else:
                self.fs.delete_file(path)
        except (FileNotFoundError, OSError):
            pass

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

    def read_to_path(self, key: str, path: str | os.PathLike, expected_sha256: str | None = None) -> str:
        """Stream `key` to a local file (atomically), checking its sha256 when one is given; returns it."""
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f"{_TMP_MARK}{uuid.uuid4().hex}-{dest.name}")
        digest = hashlib.sha256()
        try:
            with self.fs.open_input_stream(self.path(key)) as src, open(tmp, "wb") as raw:
                _copy_stream(src, _HashingWriter(raw, digest))
            actual = digest.hexdigest()
            if expected_sha256 is not None and actual != expected_sha256:
                raise IntegrityError(
                    f"{self.uri_of(key)} is corrupt: sha256 {actual[:12]}… does not match the manifest's "
                    f"{expected_sha256[:12]}…; re-run the job that wrote it"
                )
            os.replace(tmp, dest)
        except FileNotFoundError as e:
            raise StorageError(f"{self.uri_of(key)} does not exist") from e
        finally:
            tmp.unlink(missing_ok=True)
        return actual

    # -- artifacts: a folder of files and its manifest ---------------------------------------------------
    def write_manifest(
        self, prefix: str, files: Mapping[str, str] | Iterable[str], **fields: Any
    ) -> dict[str, Any]:
        """Write `<prefix>/manifest.json` (atomically, so write it last) recording every file's sha256.

        `files` maps names relative to `prefix` to the sha256 that `write_bytes` returned, or lists
        names whose files are hashed here. Other fields (id, tenant, metrics…) go in as given.
        Every listed file must exist: a manifest never names a file that is not there.
        """
        _check_key(prefix)
        if isinstance(files, Mapping):
            hashes = {name: str(sha) for name, sha in files.items()}
        else:
            hashes = {name: sha256_bytes(self.read_bytes(f"{prefix}/{name}")) for name in files}
        if not hashes:
            raise StorageError(f"manifest for {self.uri_of(prefix)} lists no files")
        missing = [name for name in hashes if not self.exists(f"{prefix}/{_check_key(name)}")]
        if missing:
            raise StorageError(f"cannot write the manifest of {self.uri_of(prefix)}: missing files {sorted(missing)}")
        if MANIFEST_NAME in hashes:
            raise StorageError(f"a manifest cannot list itself ({self.uri_of(prefix)})")
        manifest = {**fields, "files": dict(sorted(hashes.items()))}
        self.write_json(f"{prefix}/{MANIFEST_NAME}", manifest)
        return manifest

    def read_manifest(self, prefix: str) -> dict[str, Any]:
        key = f"{_check_key(prefix)}/{MANIFEST_NAME}"
        if not self.exists(key):
            raise StorageError(
                f"{self.uri_of(prefix)} has no {MANIFEST_NAME}: the artifact is unfinished or was never written"
            )
        manifest = self.read_json(key)
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
            raise StorageError(f"{self.uri_of(key)} has no valid 'files' map of name -> sha256")
        return manifest

    def verify_manifest(self, prefix: str) -> dict[str, Any]:
        """Check every file the manifest lists against its sha256; returns the manifest.

        Raises IntegrityError naming every missing or changed file.
        """
        manifest = self.read_manifest(prefix)
        problems = []
        for name, expected in manifest["files"].items():
            key = f"{prefix}/{name}"
            if not self.exists(key):
                problems.append(f"{name}: missing")
                continue
            actual = self._sha256_of(key)
            if actual != expected:
                problems.append(f"{name}: sha256 {actual[:12]}… != {expected[:12]}…")
        if problems:
            raise IntegrityError(
                f"{self.uri_of(prefix)} does not match its manifest ({'; '.join(problems)}); "
                "re-run the job that wrote it"
            )
        return manifest

    def read_listed(self, prefix: str, name: str) -> bytes:
        """Read `<prefix>/<name>`, checked against the sha256 the manifest recorded for it."""
        files = self.read_manifest(prefix)["files"]
        if name not in files:
            raise StorageError(f"{name!r} is not listed in the manifest of {self.uri_of(prefix)}")
        return self.read_verified(f"{prefix}/{name}", files[name])

    def _sha256_of(self, key: str) -> str:
        digest = hashlib.sha256()
        with self.fs.open_input_stream(self.path(key)) as src:
            _copy_stream(src, _HashingWriter(None, digest))
        return digest.hexdigest()

    # -- tenants -----------------------------------------------------------------------------------------
    def list_tenant(self, tenant: str, kind: str, *, finished_only: bool = True) -> list[str]:
        """Artifact ids under `tenants/<tenant>/<kind>/`, sorted.

        With `finished_only` (the default) only folders that have a manifest are listed, so a job
        that is still writing (or died half-way) never shows up.
        """
        base = tenant_prefix(tenant, kind)
        selector = pafs.FileSelector(self.path(base), allow_not_found=True, recursive=False)
        ids = []
        for info in self.fs.get_file_info(selector):
            name = posixpath.basename(info.path.rstrip("/"))
            if info.type != pafs.FileType.Directory or _TMP_MARK in name or not _NAME_RE.match(name):
                continue
            if finished_only and not self.exists(f"{base}/{name}/{MANIFEST_NAME}"):
                continue
            ids.append(name)
        return sorted(ids)

    def list_tenants(self) -> list[str]:
        """Tenants that have anything stored."""
        selector = pafs.FileSelector(self.path(TENANTS_ROOT), allow_not_found=True, recursive=False)
        names = [posixpath.basename(i.path.rstrip("/")) for i in self.fs.get_file_info(selector)]
        return sorted(n for n in names if _NAME_RE.match(n))


class _HashingWriter:
    """Passes writes to `out` (if any) and feeds them to a sha256."""

    def __init__(self, out: Any, digest: "hashlib._Hash"):
        self._out = out
        self._digest = digest

    def write(self, data: bytes) -> int:
        self._digest.update(data)
        if self._out is not None:
            self._out.write(data)
        return len(data)


def _copy_stream(src: BinaryIO, out: Any) -> None:
    while True:
        chunk = src.read(_CHUNK)
        if not chunk:
            return
        out.write(chunk)


def _fsync_dir(path: str) -> None:
    """Make a rename durable (POSIX); harmless where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
