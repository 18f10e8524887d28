"""Reference images for one style: load, validate, orient, convert, dedupe and bucket.

`load_refs(source)` takes a folder, a `.zip` file, or a storage URI (s3://, gs://, or a key inside a
`Storage` passed as `storage=`) and returns a `RefSet`: every usable image as RGB with its EXIF
orientation applied, the sidecar `.txt` caption beside it if there is one, and warnings. Every file is
checked before anything is refused, and a `DatasetError` lists each problem with the file it is in,
what is wrong, and what to do about it.

Decisions worth knowing:

- Nothing is written anywhere. Zip entries are read into memory, never extracted to disk, so a hostile
  zip cannot place a file anywhere. A zip that fails the structural checks (`../` or absolute names,
  symlinks, nested archives, encryption, bomb-sized or bomb-ratio entries, too many entries) is refused
  before any entry is decompressed.
- Formats: PNG, JPEG (MPO from cameras too: its first picture) and WebP, decided by the content, not the
  file name. Animated PNG/WebP and GIF are refused (a style ref is one still picture; taking frame 0 in
  silence could train on a frame the user never looked at).
- `Ref.sha256` is over the decoded RGB pixels (after orientation) and the size, not over the file bytes:
  the same picture saved with other metadata hashes the same, and the hash names exactly what trains.
  Two refs with the same pixels are exact duplicates: the second (by name) is dropped with a warning.
  Near-duplicates (perceptual hash) are kept, with a warning naming both files.
- CMYK and non-sRGB images go through their ICC profile to sRGB when they carry one; 16-bit images are
  scaled (not clipped) to 8 bits; transparency is composited onto white.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import math
import os
import re
import stat
import struct
import unicodedata
import warnings as pywarnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from train.captions import lint_caption

# -- limits and names ---------------------------------------------------------------------------------

GiB = 1024**3
MiB = 1024**2

SUPPORTED_FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "MPO": "JPEG", "WEBP": "WebP"}
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp"})
# Image files we recognise by name but do not train on: they get a "convert it" error, not silence.
UNSUPPORTED_IMAGE_SUFFIXES = frozenset(
    {".gif", ".bmp", ".tif", ".tiff", ".heic", ".heif", ".avif", ".jxl", ".psd", ".svg", ".ico",
     ".dng", ".cr2", ".cr3", ".nef", ".arw", ".raw"}
)
ARCHIVE_SUFFIXES = frozenset({".zip", ".7z", ".rar", ".tar", ".gz", ".tgz", ".bz2", ".xz"})
CAPTION_SUFFIX = ".txt"
# OS litter that is never a ref and never worth a warning.
IGNORED_NAMES = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini"})

MAX_ZIP_ENTRIES = 1000
# Images are already compressed, so a zip barely shrinks them; a 100:1 entry is a bomb, not a photo.
MAX_ZIP_RATIO = 100
ZIP_RATIO_MIN_BYTES = 1 * MiB  # small entries (captions) may compress well and cannot hurt
MAX_CAPTION_BYTES = 64 * 1024
MIN_REFS = 1  # the seeds' 1–3 band trains B_r128 (with a warning)
FEW_REFS_WARN_BELOW = 4  # 1-3 refs: DESIGN.md, "2 refs: nothing works reliably"
TARGET_SIDE = 1024  # the training resolution the "small image" warning compares against
MAX_ASPECT = 4.0  # buckets stop at 4:1; wider images are center-cropped to it
BUCKET_WIDTH_STEP = 64  # coarse bucket grid so similar shapes share a bucket (and a batch)
# Kept in memory per ref: at most 4 × the largest training bucket (2048²). Every bucket is then still cut
# from at least as many pixels as it has (no upscaling), while 50 refs of up to 64 MP stay ~2.5 GB, not ~10.
KEEP_PIXELS = 4 * 2048 * 2048
# Near-duplicates: pHash (64 bits) within this distance, confirmed by 32×32 thumbnail correlation. Measured on
# resized / JPEG-50 / contrast-changed copies (distance 0-8, correlation >= 0.98) against different pictures
# of one style board (closest pairs: correlation 0.90 at most).
NEAR_DUPLICATE_PHASH_BITS = 10
NEAR_DUPLICATE_MIN_CORRELATION = 0.93

_ZIP_MAGIC = b"PK\x03\x04"
_SRGB_HINT = "srgb"


# -- errors -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileProblem:
    """One thing wrong with one file: which file, what is wrong, what to do."""

    file: str
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"{self.file}: {self.problem}. Fix: {self.fix}"


class DatasetError(ValueError):
    """The refs cannot be used. `.problems` lists every problem found (all files are checked)."""

    def __init__(self, problems: Sequence[FileProblem], source: str = ""):
        self.problems: list[FileProblem] = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        count = len(self.problems)
        header = f"{count} problem{'s' if count != 1 else ''} with the reference images{where}:"
        super().__init__("\n".join([header, *(f"  - {p}" for p in self.problems)]))


# -- results ------------------------------------------------------------------------------------------


@dataclass
class Ref:
    """One usable reference image."""

    name: str  # '/'-separated path relative to the source (folder, zip or storage prefix), NFC
    image: Image.Image  # RGB, EXIF orientation applied; downscaled to at most KEEP_PIXELS (width/height are the file's)
    sha256: str  # of the decoded RGB pixels and the size (see module docstring), not of the file bytes
    sidecar_caption: str | None
    width: int
    height: int
    warnings: list[str] = field(default_factory=list)
    format: str = ""  # "PNG" | "JPEG" | "WebP": what the content was
    original_mode: str = ""  # PIL mode before conversion, e.g. "CMYK", "I;16", "P"


@dataclass
class RefSet:
    refs: list[Ref]
    warnings: list[str]  # dataset-level warnings followed by every ref's warnings (each names its file)
    source: str = ""

    @property
    def dataset_hash(self) -> str:
        """sha256 over the sorted (pixel sha256, caption) pairs: independent of names and order."""
        lines = sorted(f"{ref.sha256}\t{ref.sidecar_caption or ''}\n" for ref in self.refs)
        return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()

    @property
    def sidecar_captions(self) -> dict[str, str]:
        """{ref name: sidecar caption} for the refs that have one (what `gemini.captions.caption_images` takes)."""
        return {ref.name: ref.sidecar_caption for ref in self.refs if ref.sidecar_caption}

    def __len__(self) -> int:
        return len(self.refs)


# -- sources: folder, zip, storage --------------------------------------------------------------------


@dataclass
class _SourceFile:
    name: str  # '/'-separated, relative to the source, NFC
    size: int | None  # None when unknown until read (storage)
    read: Callable[[], bytes]


@dataclass
class _Listing:
    display: str
    files: list[_SourceFile] = field(default_factory=list)
    problems: list[FileProblem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _nfc(name: str) -> str:
    # macOS writes decomposed (NFD) names; compare and report names in one form.
    return unicodedata.normalize("NFC", name)


def _is_ignored(name: str) -> bool:
    """Hidden files, hidden folders and OS litter (`__MACOSX`, `.DS_Store`, `Thumbs.db`)."""
    parts = [p for p in name.split("/") if p]
    return any(p.startswith(".") or p in IGNORED_NAMES for p in parts)


def _list_folder(root: Path) -> _Listing:
    listing = _Listing(display=str(root))
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        for dirname in sorted(dirnames):
            if (here / dirname).is_symlink() and not _is_ignored(dirname):
                rel = _nfc((here / dirname).relative_to(root).as_posix())
                listing.warnings.append(f"{rel}: is a link to a folder and was not followed")
        dirnames[:] = sorted(d for d in dirnames if not _is_ignored(d))
        for filename in sorted(filenames):
            path = here / filename
            rel = _nfc(path.relative_to(root).as_posix())
            if _is_ignored(rel):
                continue
            try:
                size = path.stat().st_size  # follows a file symlink; a broken one fails here
            except OSError as e:
                listing.problems.append(
                    FileProblem(rel, f"cannot be read ({e.strerror or e})", "replace it with the image file itself")
                )
                continue
            listing.files.append(_SourceFile(rel, size, path.read_bytes))
    return listing


def _unsafe_zip_name(name: str) -> bool:
    normalized = name.replace("\\", "/")
    if normalized.startswith("/") or re.match(r"^[A-Za-z]:", normalized):
        return True
    return ".." in normalized.split("/")


def _zip_entry_is_symlink(info: zipfile.ZipInfo) -> bool:
    # Unix zips keep st_mode in the high 16 bits of external_attr.
    return stat.S_ISLNK(info.external_attr >> 16)


def _remake_zip_fix(display: str) -> str:
    stem = PurePosixPath(display).stem or "refs"
    return f"re-create the zip from the image files themselves (e.g. `cd {stem} && zip -r ../{stem}.zip .`)"


def _list_zip(zf: zipfile.ZipFile, display: str, max_upload_bytes: int) -> _Listing:
    """Check the zip's structure from its directory alone, then list its entries for lazy reading."""
    listing = _Listing(display=display)
    infos = zf.infolist()
    if len(infos) > MAX_ZIP_ENTRIES:
        raise DatasetError(
            [FileProblem(display, f"has {len(infos)} entries, over the limit of {MAX_ZIP_ENTRIES}",
                         "zip only the reference images (at most 50) and their .txt captions")],
            display,
        )
    total_uncompressed = 0
    structural: list[FileProblem] = []
    for info in infos:
        name = info.filename
        if _unsafe_zip_name(name):
            structural.append(FileProblem(
                name,
                "has an unsafe path (absolute or containing '..') that would land outside the folder it is unpacked into",
                _remake_zip_fix(display),
            ))
            continue
        if _zip_entry_is_symlink(info):
            structural.append(FileProblem(
                name, "is a symbolic link; links in zips are not followed",
                "put the image file itself in the zip, not a link to it (zip without --symlinks)",
            ))
            continue
        if info.is_dir() or _is_ignored(name):
            continue
        if info.flag_bits & 0x1:
            structural.append(FileProblem(
                name, "is encrypted (password-protected)", "zip the images without a password",
            ))
            continue
        if PurePosixPath(name).suffix.lower() in ARCHIVE_SUFFIXES:
            structural.append(FileProblem(
                name, "is a nested archive; archives inside the zip are not unpacked",
                "unpack it and put its images directly in the top-level zip",
            ))
            continue
        total_uncompressed += info.file_size
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > ZIP_RATIO_MIN_BYTES and ratio > MAX_ZIP_RATIO:
            structural.append(FileProblem(
                name,
                f"expands {ratio:.0f}:1 to {_human_bytes(info.file_size)} (zip bomb: images do not compress "
                f"more than {MAX_ZIP_RATIO}:1)",
                "upload the real image files; this entry is not a picture",
            ))
            continue
        listing.files.append(_SourceFile(_nfc(name), info.file_size, _zip_entry_reader(zf, info)))
    if total_uncompressed > max_upload_bytes:
        structural.append(FileProblem(
            display,
            f"unpacks to {_human_bytes(total_uncompressed)}, over the {_human_bytes(max_upload_bytes)} upload limit "
            "(zip bomb or far too much data)",
            "upload only the reference images, resized to about 2048 px on the long side",
        ))
    if structural:
        raise DatasetError(structural, display)
    return listing


def _zip_entry_reader(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> Callable[[], bytes]:
    # zipfile never yields more than the declared file_size and checks the CRC at the end, so the size
    # limits checked above bound what this can allocate.
    return lambda: zf.read(info)


def _list_storage(storage: Any, prefix: str, display: str) -> _Listing:
    listing = _Listing(display=display)
    prefix = prefix.strip("/")
    for key in storage.list(prefix, recursive=True):
        rel = _nfc(key[len(prefix):].lstrip("/") if prefix else key)
        suffix = PurePosixPath(rel).suffix.lower()
        if not rel or _is_ignored(rel):
            continue
        if not suffix:
            continue  # storage lists folders too; a folder has no suffix
        listing.files.append(_SourceFile(rel, None, _storage_reader(storage, key)))
    return listing


def _storage_reader(storage: Any, key: str) -> Callable[[], bytes]:
    return lambda: storage.read_bytes(key)


_URI = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://(.*)$")


def _open_zip_bytes(data: bytes, display: str, max_upload_bytes: int, stack: contextlib.ExitStack) -> _Listing:
    if len(data) > max_upload_bytes:
        raise DatasetError([_over_upload_limit(display, len(data), max_upload_bytes)], display)
    try:
        zf = stack.enter_context(zipfile.ZipFile(io.BytesIO(data)))
    except zipfile.BadZipFile as e:
        raise DatasetError([_not_a_zip(display, e)], display) from e
    return _list_zip(zf, display, max_upload_bytes)


def _human_bytes(size: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


def _over_upload_limit(display: str, size: int, limit: int) -> FileProblem:
    return FileProblem(
        display, f"is {_human_bytes(size)}, over the {_human_bytes(limit)} upload limit",
        "upload only the reference images, resized to about 2048 px on the long side",
    )


def _not_a_zip(display: str, error: Exception) -> FileProblem:
    return FileProblem(display, f"is not a valid zip file ({error})", "re-create the zip, or upload the folder instead")


def _open_source(
    source: str | os.PathLike, storage: Any, max_upload_bytes: int, stack: contextlib.ExitStack
) -> _Listing:
    text = os.fspath(source)
    if storage is not None:
        key = str(text).strip("/")
        display = storage.uri_of(key) if hasattr(storage, "uri_of") and key else str(text)
        if key.lower().endswith(".zip"):
            return _open_zip_bytes(_read_storage_key(storage, key, display), display, max_upload_bytes, stack)
        return _list_storage(storage, key, display)

    uri = _URI.match(str(text))
    if uri and uri.group(1).lower() != "file":
        from cluster.storage import Storage  # pyarrow is only needed for remote sources

        if uri.group(1).lower() not in ("s3", "gs"):
            raise DatasetError([FileProblem(
                str(text), f"uses the unsupported scheme {uri.group(1)}://",
                "use a local folder or .zip, s3://bucket/prefix or gs://bucket/prefix",
            )], str(text))
        if text.lower().endswith(".zip"):
            parent, _, key = str(text).rstrip("/").rpartition("/")
            remote = Storage.from_uri(parent)
            return _open_zip_bytes(_read_storage_key(remote, key, text), text, max_upload_bytes, stack)
        return _list_storage(Storage.from_uri(text), "", text)

    path = Path(uri.group(2) if uri else text).expanduser()
    if not path.exists():
        raise DatasetError([FileProblem(str(path), "does not exist", "check the path")], str(path))
    if path.is_dir():
        listing = _list_folder(path)
        total = sum(f.size or 0 for f in listing.files)
        if total > max_upload_bytes:
            raise DatasetError([_over_upload_limit(str(path), total, max_upload_bytes)], str(path))
        return listing
    if path.suffix.lower() == ".zip":
        size = path.stat().st_size
        if size > max_upload_bytes:
            raise DatasetError([_over_upload_limit(str(path), size, max_upload_bytes)], str(path))
        try:
            zf = stack.enter_context(zipfile.ZipFile(path))
        except zipfile.BadZipFile as e:
            raise DatasetError([_not_a_zip(str(path), e)], str(path)) from e
        return _list_zip(zf, str(path), max_upload_bytes)
    raise DatasetError([FileProblem(
        str(path), "is a single file, not a folder or a .zip",
        "put the reference images (5-50 is best) in a folder or a .zip and pass that",
    )], str(path))


def _read_storage_key(storage: Any, key: str, display: str) -> bytes:
    try:
        return storage.read_bytes(key)
    except Exception as e:  # StorageError, FileNotFoundError, network errors: all mean "cannot read it"
        raise DatasetError([FileProblem(display, f"cannot be read ({e})", "check the URI and credentials")], display) from e


# -- one image: bytes -> RGB --------------------------------------------------------------------------


@dataclass
class DecodedImage:
    """One reference decoded by `decode_image`: RGB with EXIF orientation applied, and what was converted."""

    image: Image.Image  # RGB, oriented
    format: str
    original_mode: str
    warnings: list[str]


def _looks_like_text(data: bytes) -> bool:
    head = data[:512]
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(ch >= 0x20 or ch in (0x09, 0x0A, 0x0D) for ch in head)


def _webp_is_truncated(data: bytes) -> bool:
    # RIFF header: "RIFF" <u32 size of the rest> "WEBP"; a short file is missing part of its payload.
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return False
    (declared,) = struct.unpack("<I", data[4:8])
    return len(data) < declared + 8


def _is_truncation(error: Exception, data: bytes) -> bool:
    # PIL says "image file is truncated" (PNG, JPEG) or "Truncated File Read"; WebP only says it cannot decode,
    # so its RIFF header decides.
    return "truncat" in str(error).lower() or isinstance(error, EOFError) or _webp_is_truncated(data)


def _truncated(name: str) -> FileProblem:
    return FileProblem(name, "is truncated (the file ends before the image data does)", "download or export it again")


def _too_many_pixels(name: str, width: int, height: int, max_pixels: int) -> FileProblem:
    return FileProblem(
        name,
        f"is {width}×{height} = {width * height / 1e6:.0f} megapixels, over the {max_pixels / 1e6:.0f}-megapixel "
        "limit (a decompression bomb, or far larger than training needs)",
        "downscale it to about 2048 px on the long side",
    )


def decode_image(name: str, data: bytes, max_pixels: int) -> DecodedImage | FileProblem:
    """Open, check and convert one image; a FileProblem says what is wrong with it."""
    reexport = "re-export it as PNG or JPEG, or remove it"
    if len(data) == 0:
        return FileProblem(name, "is empty (0 bytes)", "upload the file again; it was not copied completely")
    if data.startswith(_ZIP_MAGIC):
        return FileProblem(name, "is a zip archive, not an image (nested zips are not unpacked)",
                           "unpack it and add its images directly")
    try:
        with pywarnings.catch_warnings():
            pywarnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies below
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        # PIL refuses before we see the size; its message carries the pixel count ("Image size (N pixels) ...").
        claimed = re.search(r"\((\d+) pixels\)", str(e))
        size = f"claims {int(claimed.group(1)) / 1e6:,.0f} megapixels" if claimed else "is far too large to open"
        return FileProblem(name, f"{size}, over the {max_pixels / 1e6:.0f}-megapixel limit (a decompression bomb, "
                           "or far larger than training needs)", "downscale it to about 2048 px on the long side")
    except UnidentifiedImageError:
        if _looks_like_text(data):
            return FileProblem(name, "is not an image: it contains text", f"replace it with the real image file ({reexport})")
        if _webp_is_truncated(data):
            return _truncated(name)
        return FileProblem(name, "is not an image (not PNG, JPEG or WebP data) or is damaged beyond reading", reexport)
    except Exception as e:  # header parsing raises OSError, SyntaxError, struct.error, ... on damage
        if _is_truncation(e, data):
            return _truncated(name)
        return FileProblem(name, f"cannot be read ({type(e).__name__}: {e})", reexport)

    fmt = img.format or "unknown"
    n_frames = getattr(img, "n_frames", 1)
    if fmt == "GIF":
        what = f"an animated GIF ({n_frames} frames)" if n_frames > 1 else "a GIF"
        return FileProblem(name, f"is {what}; GIF is not supported (256 colours at most, often animated)",
                           "export the one frame you want as PNG")
    if fmt not in SUPPORTED_FORMATS:
        return FileProblem(name, f"is a {fmt} image; supported formats are PNG, JPEG and WebP", "convert it to PNG")
    if n_frames > 1 and fmt != "MPO":  # MPO: a camera JPEG with a preview frame; the first picture is the photo
        return FileProblem(name, f"is an animated {SUPPORTED_FORMATS[fmt]} ({n_frames} frames); a reference must be "
                           "one still picture", "export the one frame you want as PNG")
    width, height = img.size
    if width * height > max_pixels:
        return _too_many_pixels(name, width, height, max_pixels)
    try:
        img.load()
    except Exception as e:
        if _is_truncation(e, data):
            return _truncated(name)
        return FileProblem(name, f"cannot be decoded ({type(e).__name__}: {e})", reexport)

    warnings: list[str] = []
    original_mode = img.mode
    try:
        oriented = ImageOps.exif_transpose(img)
    except Exception as e:  # a damaged EXIF block must not cost the picture
        oriented = img
        warnings.append(f"{name}: its EXIF orientation could not be read ({e}); used as stored")
    rgb = _to_rgb(oriented, img.info, name, warnings)
    return DecodedImage(rgb, SUPPORTED_FORMATS[fmt], original_mode, warnings)


def _to_rgb(img: Image.Image, info: dict, name: str, warnings: list[str]) -> Image.Image:
    """Any PNG/JPEG/WebP mode -> 8-bit sRGB RGB."""
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        return _sixteen_bit_gray_to_rgb(img)
    if mode == "F":
        arr = np.clip(np.asarray(img, dtype=np.float32), 0.0, 255.0)
        return Image.fromarray(arr.round().astype(np.uint8), "L").convert("RGB")
    if mode == "1":
        return img.convert("L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    elif mode in ("PA", "LA", "La", "RGBa"):
        img = img.convert("RGBA")
    if img.mode in ("RGB", "CMYK"):
        img = _icc_to_srgb(img, info.get("icc_profile"), name, warnings)
    if img.mode == "RGBA":
        return _flatten_alpha(img, name, warnings)
    return img if img.mode == "RGB" else img.convert("RGB")


def _sixteen_bit_gray_to_rgb(img: Image.Image) -> Image.Image:
    # PIL's convert("RGB") clips 16-bit values at 255 (a white picture); scale 0..65535 to 0..255 instead.
    arr = np.asarray(img).astype(np.uint32)
    eight_bit = ((arr * 255 + 32767) // 65535).clip(0, 255).astype(np.uint8)
    return Image.fromarray(eight_bit, "L").convert("RGB")


def _icc_to_srgb(img: Image.Image, icc: bytes | None, name: str, warnings: list[str]) -> Image.Image:
    """Through the embedded ICC profile to sRGB (CMYK, Display P3, Adobe RGB); plain convert without one."""
    if not icc:
        return img.convert("RGB")
    try:
        from PIL import ImageCms

        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        description = (ImageCms.getProfileDescription(profile) or "").lower()
        if img.mode == "RGB" and _SRGB_HINT in description.replace(" ", ""):
            return img
        return ImageCms.profileToProfile(img, profile, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except Exception as e:  # a broken profile: the naive conversion is still a usable picture
        warnings.append(f"{name}: its colour profile could not be applied ({e}); colours converted without it")
        return img.convert("RGB")


def _flatten_alpha(img: Image.Image, name: str, warnings: list[str]) -> Image.Image:
    alpha = img.getchannel("A")
    if alpha.getextrema()[0] < 255:
        warnings.append(f"{name}: has transparent areas; they are filled with white for training")
    background = Image.new("RGB", img.size, (255, 255, 255))
    background.paste(img.convert("RGB"), mask=alpha)
    return background


def _pixel_sha256(img: Image.Image) -> str:
    digest = hashlib.sha256(f"{img.width}x{img.height}\n".encode())
    digest.update(img.tobytes())
    return digest.hexdigest()


# -- captions -----------------------------------------------------------------------------------------


def _caption_key(name: str) -> str:
    """Images and captions pair up by folder + stem: `a/cat.png` <-> `a/cat.txt`."""
    path = PurePosixPath(name)
    return str(path.with_suffix("")).casefold()


def _decode_caption(name: str, data: bytes) -> str | FileProblem:
    if len(data) > MAX_CAPTION_BYTES:
        return FileProblem(name, f"is {len(data) // 1024} KiB, too long for a caption",
                           "keep the caption to one or two sentences about what is in the picture")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        return FileProblem(name, f"is not UTF-8 text ({e.reason} at byte {e.start})", "save the caption as UTF-8")
    return " ".join(text.split())


# -- perceptual hashes (near-duplicates) --------------------------------------------------------------


def _gray_thumbnail(img: Image.Image, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(img.convert("L").resize(size, Image.Resampling.BOX, reducing_gap=2.0), dtype=np.float64)


def _bits_to_int(bits: np.ndarray) -> int:
    value = 0
    for bit in bits.ravel():
        value = (value << 1) | int(bool(bit))
    return value


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    matrix = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2 / n)
    matrix[0] /= math.sqrt(2)
    return matrix


def phash(img: Image.Image, size: int = 8, oversample: int = 4) -> int:
    """Perceptual hash: the low-frequency 2D DCT of a 32×32 thumbnail, thresholded at its median."""
    n = size * oversample
    pixels = _gray_thumbnail(img, (n, n))
    dct = _dct_matrix(n)
    low = (dct @ pixels @ dct.T)[:size, :size]
    median = np.median(low.ravel()[1:])  # the DC term measures brightness, not structure
    return _bits_to_int(low > median)


def hamming(a: int, b: int) -> int:
    return bin(a ^ b).count("1")


def _normalized_thumbnail(img: Image.Image, side: int = 32) -> np.ndarray:
    """Zero-mean, unit-norm grayscale thumbnail: dot products between two are their correlation."""
    pixels = _gray_thumbnail(img, (side, side))
    pixels -= pixels.mean()
    norm = np.linalg.norm(pixels)
    return pixels / norm if norm > 1e-9 else pixels


def near_duplicate_pairs(refs: Sequence[Ref]) -> list[tuple[int, int, int]]:
    """(i, j, phash distance) for each pair of refs that are the same picture resized, recompressed or retouched.

    pHash alone over-matches pictures that merely share a layout (two different portraits, both a big
    blob in the middle, differ by 2-6 bits), so a close pHash is confirmed by correlating 32×32 thumbnails.
    """
    hashes = [phash(ref.image) for ref in refs]
    thumbnails = [_normalized_thumbnail(ref.image) for ref in refs]
    pairs = []
    for i in range(len(refs)):
        for j in range(i + 1, len(refs)):
            distance = hamming(hashes[i], hashes[j])
            if distance > NEAR_DUPLICATE_PHASH_BITS:
                continue
            if float((thumbnails[i] * thumbnails[j]).sum()) >= NEAR_DUPLICATE_MIN_CORRELATION:
                pairs.append((i, j, distance))
    return pairs


# -- buckets ------------------------------------------------------------------------------------------


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def _floor_to(value: float, multiple: int) -> int:
    return int(math.floor(value / multiple + 1e-9)) * multiple


@functools.lru_cache(maxsize=32)
def bucket_grid(resolution: int = 1024, multiple: int = 16) -> list[tuple[int, int]]:
    """The fixed buckets for `resolution`: area ≈ resolution², sides multiples of `multiple`, aspect ≤ 4:1."""
    step = max(multiple, _round_to(BUCKET_WIDTH_STEP * resolution / 1024, multiple))
    widest = resolution * math.sqrt(MAX_ASPECT)
    buckets = set()
    width = _round_to(resolution / math.sqrt(MAX_ASPECT), multiple)
    while width <= widest + 1e-9:
        height = _round_to(resolution * resolution / width, multiple)
        buckets.add((width, height))
        buckets.add((height, width))
        width += step
    buckets.add((_round_to(resolution, multiple), _round_to(resolution, multiple)))
    return sorted(buckets)


def full_bucket(width: int, height: int, resolution: int = 1024, multiple: int = 16) -> tuple[int, int]:
    """The grid bucket whose aspect ratio is closest to width:height (ties: the larger one), before any shrinking."""
    aspect = math.log(width / height)
    return min(bucket_grid(resolution, multiple), key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


def bucket_size(width: int, height: int, resolution: int = 1024, multiple: int = 16) -> tuple[int, int]:
    """The (w, h) an image of width×height trains at.

    The bucket from `bucket_grid` whose aspect ratio is closest to the image's; if the image is smaller
    than that bucket, the bucket shrinks (same aspect, sides floored to `multiple`) so nothing is upscaled.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}×{height}")
    bucket_w, bucket_h = full_bucket(width, height, resolution, multiple)
    if bucket_w <= width and bucket_h <= height:
        return bucket_w, bucket_h
    scale = min(width / bucket_w, height / bucket_h)
    small_w, small_h = _floor_to(bucket_w * scale, multiple), _floor_to(bucket_h * scale, multiple)
    if small_w < multiple or small_h < multiple:
        raise ValueError(f"a {width}×{height} image is too small for any {multiple}-px bucket")
    return small_w, small_h


def prepare_image(ref_image: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """Resize to cover `bucket` and center-crop to exactly bucket's (w, h); returns RGB."""
    bucket_w, bucket_h = bucket
    width, height = ref_image.size
    # The largest centered box with the bucket's aspect ratio, then one resize of that box.
    target_aspect = bucket_w / bucket_h
    if width / height > target_aspect:
        box_w, box_h = height * target_aspect, float(height)
    else:
        box_w, box_h = float(width), width / target_aspect
    left, top = (width - box_w) / 2, (height - box_h) / 2
    img = ref_image if ref_image.mode == "RGB" else ref_image.convert("RGB")
    return img.resize(
        (bucket_w, bucket_h), Image.Resampling.LANCZOS, box=(left, top, left + box_w, top + box_h), reducing_gap=3.0
    )


def assign_buckets(refs: Iterable[Any], resolution: int = 1024, multiple: int = 16) -> dict[tuple[int, int], list[int]]:
    """bucket (w, h) -> indices of the refs (anything with .width/.height) that train at that size."""
    buckets: dict[tuple[int, int], list[int]] = {}
    for index, ref in enumerate(refs):
        buckets.setdefault(bucket_size(ref.width, ref.height, resolution, multiple), []).append(index)
    return dict(sorted(buckets.items()))


# -- load_refs ----------------------------------------------------------------------------------------


def _kind_of(name: str) -> str:
    suffix = PurePosixPath(name).suffix.lower()
    if suffix in IMAGE_SUFFIXES or suffix in UNSUPPORTED_IMAGE_SUFFIXES:
        return "image"
    if suffix == CAPTION_SUFFIX:
        return "caption"
    if suffix in ARCHIVE_SUFFIXES:
        return "archive"
    return "other"


def _small_image_warning(ref_name: str, width: int, height: int, resolution: int = TARGET_SIDE) -> str | None:
    """Names the bucket the image actually trains at, for the job's own `resolution`."""
    ideal = full_bucket(width, height, resolution)
    actual = bucket_size(width, height, resolution)
    if actual == ideal:
        return None
    return (f"{ref_name}: is {width}×{height}, under {resolution} px for its shape; it trains at "
            f"{actual[0]}×{actual[1]} (never upscaled) instead of {ideal[0]}×{ideal[1]}; "
            f"a version {ideal[0]}×{ideal[1]} or larger is better")


def load_refs(
    source: str | os.PathLike,
    *,
    max_refs: int = 50,
    min_side: int = 256,
    max_pixels: int = 64_000_000,
    max_upload_bytes: int = 2 * GiB,
    storage: Any = None,
    resolution: int = TARGET_SIDE,
) -> RefSet:
    """Load and check the reference images in `source` (a folder, a .zip, s3://..., gs://...).

    With `storage` (a `cluster.storage.Storage`), `source` is a key inside it: a folder prefix or a .zip.
    Raises DatasetError listing every problem; returns a RefSet whose warnings the caller shows the user.
    """
    with contextlib.ExitStack() as stack:
        listing = _open_source(source, storage, max_upload_bytes, stack)
        return _build_refset(listing, max_refs=max_refs, min_side=min_side, max_pixels=max_pixels,
                             max_upload_bytes=max_upload_bytes, resolution=resolution)


def _build_refset(listing: _Listing, *, max_refs: int, min_side: int, max_pixels: int, max_upload_bytes: int,
                  resolution: int = TARGET_SIDE) -> RefSet:
    problems = list(listing.problems)
    warnings = list(listing.warnings)
    display = listing.display
    images, captions = _sort_by_kind(listing.files, problems, warnings)
    if len(images) > max_refs:  # refuse a huge upload before decoding any of it
        raise DatasetError([FileProblem(
            display, f"has {len(images)} images, over the limit of {max_refs}",
            f"pick the {max_refs} most representative images, or raise max_refs in the job config",
        )], display)
    reader = _BoundedReader(display, max_upload_bytes)
    sidecars = _read_captions(captions, reader, problems)
    decoded = _decode_refs(images, reader, sidecars, problems, min_side=min_side, max_pixels=max_pixels,
                           resolution=resolution)
    image_keys = {_caption_key(f.name) for f in images}
    warnings += [f"{sidecar.file}: ignored: no image with the same name beside it"
                 for key, sidecar in sidecars.items() if key not in image_keys]
    refs = _drop_exact_duplicates(decoded, warnings)
    warnings += _near_duplicate_warnings(refs)
    if len(refs) < MIN_REFS:
        problems.append(_too_few_refs(display, len(refs), any_problems=bool(problems)))
    if problems:
        raise DatasetError(problems, display)
    if len(refs) < FEW_REFS_WARN_BELOW:
        warnings.insert(0, f"only {len(refs)} reference image(s): nothing works reliably with 2 or fewer, and 3 is barely "
                           "better; add more in the same style (5 or more, 10-30 is best)")
    for ref in refs:
        warnings.extend(ref.warnings)
    return RefSet(refs=refs, warnings=warnings, source=display)


def _sort_by_kind(files: list[_SourceFile], problems: list[FileProblem], warnings: list[str]
                  ) -> tuple[list[_SourceFile], list[_SourceFile]]:
    """(images, captions), each sorted by name; archives are problems, anything else a warning."""
    images, captions = [], []
    for f in sorted(files, key=lambda f: f.name):
        kind = _kind_of(f.name)
        if kind == "image":
            images.append(f)
        elif kind == "caption":
            captions.append(f)
        elif kind == "archive":
            problems.append(FileProblem(f.name, "is an archive inside the refs; archives are not unpacked",
                                        "unpack it and add its images directly"))
        else:
            warnings.append(f"{f.name}: ignored (not a PNG, JPEG or WebP image, nor a .txt caption)")
    return images, captions


class _BoundedReader:
    """Reads source files, refusing the whole source once more than the upload limit has been read."""

    def __init__(self, display: str, max_bytes: int):
        self.display, self.max_bytes, self.bytes_read = display, max_bytes, 0

    def read(self, f: _SourceFile) -> bytes | FileProblem:
        try:
            data = f.read()
        except Exception as e:  # CRC errors in a zip, permission errors, storage errors
            return FileProblem(f.name, f"cannot be read ({type(e).__name__}: {e})", "upload the file again")
        self.bytes_read += len(data)
        if self.bytes_read > self.max_bytes:
            raise DatasetError([_over_upload_limit(self.display, self.bytes_read, self.max_bytes)], self.display)
        return data


@dataclass
class _Sidecar:
    file: str  # the caption file's name
    text: str | None  # None: the file is empty


def _read_captions(captions: list[_SourceFile], reader: _BoundedReader, problems: list[FileProblem]
                   ) -> dict[str, _Sidecar]:
    """Sidecar captions by `_caption_key` (folder + stem)."""
    sidecars: dict[str, _Sidecar] = {}
    for f in captions:
        data = reader.read(f)
        text = data if isinstance(data, FileProblem) else _decode_caption(f.name, data)
        if isinstance(text, FileProblem):
            problems.append(text)
            continue
        sidecars[_caption_key(f.name)] = _Sidecar(f.name, text or None)
    return sidecars


def _decode_refs(images: list[_SourceFile], reader: _BoundedReader, sidecars: dict[str, _Sidecar],
                 problems: list[FileProblem], *, min_side: int, max_pixels: int, resolution: int) -> list[Ref]:
    refs = []
    for f in images:
        data = reader.read(f)
        result = data if isinstance(data, FileProblem) else decode_image(f.name, data, max_pixels)
        if isinstance(result, FileProblem):
            problems.append(result)
            continue
        width, height = result.image.size
        if min(width, height) < min_side:
            problems.append(FileProblem(
                f.name, f"is {width}×{height}; its shorter side ({min(width, height)} px) is under the {min_side} px minimum",
                f"use a larger version (at least {min_side} px on each side, {TARGET_SIDE} px or more is best)",
            ))
            continue
        ref = Ref(name=f.name, image=_kept_image(result.image), sha256=_pixel_sha256(result.image), sidecar_caption=None,
                  width=width, height=height, warnings=list(result.warnings), format=result.format,
                  original_mode=result.original_mode)
        _attach_caption(ref, sidecars.get(_caption_key(f.name)))
        small = _small_image_warning(ref.name, width, height, resolution)
        if small:
            ref.warnings.append(small)
        refs.append(ref)
    return refs


def _kept_image(image: Image.Image) -> Image.Image:
    """The image as held for training: same aspect ratio, at most KEEP_PIXELS (the hash is of the original)."""
    width, height = image.size
    if width * height <= KEEP_PIXELS:
        return image
    scale = (KEEP_PIXELS / (width * height)) ** 0.5
    return image.resize((max(1, int(width * scale)), max(1, int(height * scale))), Image.Resampling.LANCZOS, reducing_gap=3.0)


def _near_duplicate_warnings(refs: list[Ref]) -> list[str]:
    return [
        f"{refs[i].name} and {refs[j].name} are near-duplicates (perceptual hash distance {distance}/64): "
        "one picture counts twice; remove one unless that is intended"
        for i, j, distance in near_duplicate_pairs(refs)
    ]


def _too_few_refs(display: str, count: int, any_problems: bool) -> FileProblem:
    if count or any_problems:
        have = f"only {count} usable image{'s' if count != 1 else ''}"
    else:
        have = "no images"
    return FileProblem(display, f"has {have}; at least {MIN_REFS} {'is' if MIN_REFS == 1 else 'are'} needed",
                       "add more reference images in the same style (5-50 works best)")


def _attach_caption(ref: Ref, sidecar: _Sidecar | None) -> None:
    if sidecar is None:
        return
    if sidecar.text is None:
        ref.warnings.append(f"{sidecar.file}: is empty; {ref.name} has no caption")
        return
    ref.sidecar_caption = sidecar.text
    for lint in lint_caption(sidecar.text):
        ref.warnings.append(f"{sidecar.file}: {lint}")


def _drop_exact_duplicates(refs: list[Ref], warnings: list[str]) -> list[Ref]:
    first_by_hash: dict[str, Ref] = {}
    kept = []
    for ref in refs:
        first = first_by_hash.get(ref.sha256)
        if first is None:
            first_by_hash[ref.sha256] = ref
            kept.append(ref)
            continue
        warnings.append(f"{ref.name} is the same picture as {first.name} (identical pixels); {ref.name} is skipped. "
                        "Remove one of them")
    return kept
