"""The bad-input corpus for reference images and zips, built in code (no binary blobs in the repo).

Each `Case` builds one source (a folder or a .zip) inside a directory it is given and says what
`train.dataset.load_refs` must answer:

- `error`: a DatasetError whose problems include one for `file` matching `message` (a regex);
- `accepted`: a RefSet; `check(refset)` asserts the conversion was right (valid-but-unusual images such
  as CMYK, 16-bit, EXIF-rotated and grayscale are accepted and converted, never refused);
- `warning`: a RefSet whose warnings include one matching `message`.

`TRIGGER_CASES` does the same for `train.captions.check_trigger`. `tree_snapshot` records every file
under a directory so a test can check that loading changed nothing stored.

Every picture is small (a few hundred px) so the whole corpus builds in about a second; the 64-megapixel
"bomb" is a PNG header that claims the size, never an allocation of it.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import stat
import struct
import unicodedata
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageDraw

# -- building blocks ------------------------------------------------------------------------------------


def good_image(seed: int, size: tuple[int, int] = (384, 320)) -> Image.Image:
    """A distinct, valid RGB picture: random shapes on a random ground (different seeds never near-match)."""
    rng = random.Random(seed)
    img = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    w, h = size
    for _ in range(12):
        x0, y0 = rng.uniform(-0.2, 1.0) * w, rng.uniform(-0.2, 1.0) * h
        x1, y1 = x0 + rng.uniform(0.1, 0.6) * w, y0 + rng.uniform(0.1, 0.6) * h
        colour = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    return img


def encode(img: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **params)
    return buffer.getvalue()


def png_bytes(img: Image.Image) -> bytes:
    return encode(img, "PNG")


def jpeg_bytes(img: Image.Image, quality: int = 92, **params: Any) -> bytes:
    return encode(img, "JPEG", quality=quality, **params)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def raw_png(width: int, height: int, bit_depth: int, colour_type: int, scanlines: bytes) -> bytes:
    """A PNG written chunk by chunk, for what PIL cannot save (16-bit RGB) or must not allocate (a bomb).

    `scanlines` is the filtered image data (filter byte 0 + raw pixels per row); it may be short for a
    header-only file, since the size is refused before any pixel is decoded.
    """
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(scanlines))
            + _png_chunk(b"IEND", b""))


def png_16bit_rgb(width: int, height: int, rgb16: tuple[int, int, int]) -> bytes:
    row = b"\x00" + struct.pack(">HHH", *rgb16) * width
    return raw_png(width, height, 16, 2, row * height)


def bomb_png_header(width: int, height: int) -> bytes:
    """A PNG that claims width×height RGB pixels but holds one row of them."""
    return raw_png(width, height, 8, 2, b"\x00" + b"\x00" * 3 * min(width, 64))


def exif_rotated_jpeg() -> bytes:
    """Stored 400×300 with a red block at the stored top-left; EXIF orientation 6 (display rotated 90° CW).

    Shown upright it is 300×400 with the red block at the top-right.
    """
    img = good_image(901, (400, 300))
    ImageDraw.Draw(img).rectangle([0, 0, 59, 59], fill=(255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    return jpeg_bytes(img, exif=exif.tobytes())


def cmyk_jpeg() -> bytes:
    """A CMYK JPEG: left half pure red in CMYK (0, 255, 255, 0), right half a good picture converted."""
    img = good_image(902, (384, 320)).convert("CMYK")
    ImageDraw.Draw(img).rectangle([0, 0, 191, 319], fill=(0, 255, 255, 0))
    return encode(img, "JPEG", quality=95)


def animated(fmt: str, frames: int = 3) -> bytes:
    images = [good_image(910 + k, (320, 320)) for k in range(frames)]
    if fmt == "GIF":
        images = [im.convert("P") for im in images]
    return encode(images[0], fmt, save_all=True, append_images=images[1:], duration=100, loop=0)


def write_good_refs(folder: Path, n: int = 3, start_seed: int = 100, prefix: str = "good") -> list[Path]:
    """n valid, distinct PNG refs, so the only problem in a case is the one under test."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n):
        path = folder / f"{prefix}_{k:02d}.png"
        path.write_bytes(png_bytes(good_image(start_seed + k)))
        paths.append(path)
    return paths


def good_files(n: int = 3, start_seed: int = 100) -> dict[str, bytes]:
    return {f"good_{k:02d}.png": png_bytes(good_image(start_seed + k)) for k in range(n)}


def folder_with(root: Path, files: dict[str, bytes], n_good: int = 3) -> Path:
    folder = root / "refs"
    write_good_refs(folder, n_good)
    for name, data in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return folder


def zip_with(root: Path, entries: list[tuple[str | zipfile.ZipInfo, bytes]], n_good: int = 3,
             name: str = "refs.zip") -> Path:
    path = root / name
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for good_name, data in good_files(n_good).items():
            zf.writestr(good_name, data)
        for entry, data in entries:
            zf.writestr(entry, data)
    return path


def symlink_entry(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # Unix: external_attr carries st_mode
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target.encode()


def mark_encrypted(zip_path: Path, entry_name: str) -> None:
    """Set the 'encrypted' flag of one entry (zipfile cannot write encrypted zips) in both its headers."""
    data = bytearray(zip_path.read_bytes())
    name = entry_name.encode()
    offset = data.find(b"PK\x01\x02")
    while offset != -1:
        name_len = struct.unpack_from("<H", data, offset + 28)[0]
        if bytes(data[offset + 46 : offset + 46 + name_len]) == name:
            data[offset + 8] |= 0x01
            local = struct.unpack_from("<I", data, offset + 42)[0]
            data[local + 6] |= 0x01
        offset = data.find(b"PK\x01\x02", offset + 4)
    zip_path.write_bytes(bytes(data))


def tree_snapshot(root: Path) -> dict[str, str]:
    """Every entry under root: files by sha256, links by target, folders by name. Equal snapshots = unchanged."""
    snapshot = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                snapshot[rel] = "link:" + os.readlink(path)
            elif path.is_dir():
                snapshot[rel] = "dir"
            else:
                snapshot[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return snapshot


# -- cases ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Path], Path]  # writes the source under the given dir, returns what load_refs gets
    expect: str  # "error" | "accepted" | "warning"
    message: str = ""  # regex the problem (error) or a warning must match
    file: str | None = None  # the file an error must name (None: the source itself)
    load_kwargs: dict[str, Any] = field(default_factory=dict)
    check: Callable[[Any], None] | None = None  # extra assertions on the RefSet (accepted/warning)


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _check_16bit_gray(refset: Any) -> None:
    ref = _ref(refset, "gray16.png")
    assert ref.original_mode.startswith("I;16"), ref.original_mode
    assert ref.image.mode == "RGB"
    assert ref.image.getpixel((10, 10)) == (128, 128, 128), ref.image.getpixel((10, 10))  # 0x8080 scaled, not clipped


def _check_16bit_rgb(refset: Any) -> None:
    ref = _ref(refset, "rgb16.png")
    r, g, b = ref.image.getpixel((5, 5))
    assert (abs(r - 0x12), abs(g - 0x80), abs(b - 0xFF)) <= (1, 1, 1), (r, g, b)


def _check_cmyk(refset: Any) -> None:
    ref = _ref(refset, "cmyk.jpg")
    assert ref.original_mode == "CMYK" and ref.image.mode == "RGB"
    r, g, b = ref.image.getpixel((60, 160))
    assert r > 220 and g < 40 and b < 40, (r, g, b)  # CMYK red came out red, not inverted or cyan


def _check_exif(refset: Any) -> None:
    ref = _ref(refset, "rotated.jpg")
    assert (ref.width, ref.height) == (300, 400) == ref.image.size
    r, g, b = ref.image.getpixel((300 - 20, 20))  # the stored top-left block is now top-right
    assert r > 200 and g < 60 and b < 60, (r, g, b)


def _check_gray(refset: Any) -> None:
    ref = _ref(refset, "gray.png")
    assert ref.original_mode == "L" and ref.image.mode == "RGB"
    pixels = np.asarray(ref.image)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()


def _check_alpha(refset: Any) -> None:
    for name in ("rgba.png", "palette.png"):
        ref = _ref(refset, name)
        assert ref.image.mode == "RGB"
        assert ref.image.getpixel((2, 2)) == (255, 255, 255), (name, ref.image.getpixel((2, 2)))


def _check_unicode(refset: Any) -> None:
    names = {ref.name for ref in refset.refs}
    nfc = unicodedata.normalize("NFC", "café.png")
    assert nfc in names and "日本の猫.png" in names and "ñandú.jpg" in names, names
    assert _ref(refset, nfc).sidecar_caption == "a cup on a table"


def _check_unicode_zip(refset: Any) -> None:
    names = {ref.name for ref in refset.refs}
    assert "日本の猫.png" in names and unicodedata.normalize("NFC", "café.png") in names, names


def _check_junk_ignored(refset: Any) -> None:
    assert sorted(ref.name for ref in refset.refs) == ["good_00.png", "good_01.png", "good_02.png"]
    assert not any("__MACOSX" in w or ".DS_Store" in w for w in refset.warnings), refset.warnings


def _check_exact_duplicate(refset: Any) -> None:
    assert len(refset.refs) == 3, [ref.name for ref in refset.refs]  # the copy is dropped


def _ref(refset: Any, name: str) -> Any:
    for ref in refset.refs:
        if ref.name == name:
            return ref
    raise AssertionError(f"{name} is not among the refs: {[ref.name for ref in refset.refs]}")


def _build_all_at_once(root: Path) -> Path:
    return folder_with(root, {
        "broken.png": _truncated(png_bytes(good_image(1))),
        "empty.jpg": b"",
        "notes.png": b"these are my notes, not a picture\n",
    })


def _build_broken_symlink(root: Path) -> Path:
    folder = folder_with(root, {})
    os.symlink(root / "missing.png", folder / "gone.png")
    return folder


def _build_too_many(root: Path) -> Path:
    folder = root / "refs"
    folder.mkdir()
    tiny = png_bytes(Image.new("RGB", (8, 8)))  # refused on the count before any is decoded
    for k in range(51):
        (folder / f"{k:03d}.png").write_bytes(tiny)
    return folder


def _build_empty_folder(root: Path) -> Path:
    folder = root / "refs"
    folder.mkdir()
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    return folder


def _build_unicode_folder(root: Path) -> Path:
    folder = root / "refs"
    folder.mkdir()
    # macOS writes decomposed names: the image in NFD, its caption in NFC must still pair up.
    (folder / unicodedata.normalize("NFD", "café.png")).write_bytes(png_bytes(good_image(301)))
    (folder / unicodedata.normalize("NFC", "café.txt")).write_text("a cup on a table", encoding="utf-8")
    (folder / "日本の猫.png").write_bytes(png_bytes(good_image(302)))
    (folder / "ñandú.jpg").write_bytes(jpeg_bytes(good_image(303)))
    return folder


def _build_near_duplicate(root: Path) -> Path:
    original = good_image(100)  # the same picture as good_00.png
    smaller = original.resize((336, 280), Image.Resampling.LANCZOS)
    return folder_with(root, {"good_00_small.jpg": jpeg_bytes(smaller, quality=70)})


def _build_exact_duplicate(root: Path) -> Path:
    # Same pixels as good_01.png, different file bytes (compression level, a text chunk).
    from PIL import PngImagePlugin

    meta = PngImagePlugin.PngInfo()
    meta.add_text("Software", "an editor")
    copy = encode(good_image(101), "PNG", pnginfo=meta, compress_level=1)
    return folder_with(root, {"good_01_copy.png": copy})


def _build_style_captions(root: Path) -> Path:
    folder = folder_with(root, {})
    (folder / "good_00.txt").write_text("a moody watercolor painting of a cat, vibrant blue, dramatic lighting")
    (folder / "good_01.txt").write_text("two boats in a harbour")
    return folder


def _build_encrypted_zip(root: Path) -> Path:
    path = zip_with(root, [("secret.png", png_bytes(good_image(7)))])
    mark_encrypted(path, "secret.png")
    return path


CASES: list[Case] = [
    # -- broken files: each refused, naming the file, saying what is wrong and what to do --
    Case("truncated_png", lambda d: folder_with(d, {"cut.png": _truncated(png_bytes(good_image(1)))}),
         "error", r"is truncated .*Fix: download or export it again", "cut.png"),
    Case("truncated_jpeg", lambda d: folder_with(d, {"cut.jpg": _truncated(jpeg_bytes(good_image(2)))}),
         "error", r"is truncated", "cut.jpg"),
    Case("truncated_webp", lambda d: folder_with(d, {"cut.webp": _truncated(encode(good_image(3), "WEBP"))}),
         "error", r"is truncated", "cut.webp"),
    Case("zero_bytes", lambda d: folder_with(d, {"empty.png": b""}),
         "error", r"is empty \(0 bytes\)", "empty.png"),
    Case("text_renamed_png", lambda d: folder_with(d, {"readme.png": b"# not a picture\nhello\n"}),
         "error", r"is not an image: it contains text", "readme.png"),
    Case("decompression_bomb_10_gigapixels", lambda d: folder_with(d, {"bomb.png": bomb_png_header(100_000, 100_000)}),
         "error", r"decompression bomb", "bomb.png"),
    Case("over_64_megapixels", lambda d: folder_with(d, {"huge.png": bomb_png_header(9_000, 8_000)}),
         "error", r"is 9000×8000 = 72 megapixels, over the 64-megapixel limit", "huge.png"),
    Case("animated_gif", lambda d: folder_with(d, {"loop.gif": animated("GIF")}),
         "error", r"is an animated GIF \(3 frames\).*export the one frame you want as PNG", "loop.gif"),
    Case("animated_webp", lambda d: folder_with(d, {"loop.webp": animated("WEBP")}),
         "error", r"is an animated WebP \(3 frames\)", "loop.webp"),
    Case("one_pixel", lambda d: folder_with(d, {"dot.png": png_bytes(Image.new("RGB", (1, 1)))}),
         "error", r"is 1×1; its shorter side \(1 px\) is under the 256 px minimum", "dot.png"),
    Case("strip_20000x20", lambda d: folder_with(d, {"strip.png": png_bytes(Image.new("RGB", (20_000, 20), "white"))}),
         "error", r"is 20000×20; its shorter side \(20 px\) is under the 256 px minimum", "strip.png"),
    Case("bmp_unsupported", lambda d: folder_with(d, {"scan.bmp": encode(good_image(4), "BMP")}),
         "error", r"is a BMP image; supported formats are PNG, JPEG and WebP.*convert it to PNG", "scan.bmp"),
    Case("zip_renamed_png", lambda d: folder_with(d, {"photos.png": _zip_bytes({"a.png": png_bytes(good_image(5))})}),
         "error", r"is a zip archive, not an image", "photos.png"),
    Case("caption_not_utf8", lambda d: folder_with(d, {"good_00.txt": "un caf\xe9".encode("latin-1")}),
         "error", r"is not UTF-8 text.*save the caption as UTF-8", "good_00.txt"),
    Case("broken_symlink_in_folder", _build_broken_symlink, "error", r"cannot be read", "gone.png"),
    Case("all_problems_reported_together", _build_all_at_once, "error", r"is empty \(0 bytes\)", "empty.jpg"),
    # -- counts --
    Case("one_ref", lambda d: folder_with(d, {}, n_good=1), "warning",
         r"only 1 reference image\(s\): nothing works reliably with 2 or fewer", None),
    Case("empty_folder", _build_empty_folder, "error", r"has no images; at least 1 is needed", None),
    Case("fifty_one_refs", _build_too_many, "error", r"has 51 images, over the limit of 50.*raise max_refs", None),
    # -- zips --
    Case("zip_slip", lambda d: zip_with(d, [("../evil.png", png_bytes(good_image(6)))]),
         "error", r"has an unsafe path", "../evil.png"),
    Case("zip_absolute_path", lambda d: zip_with(d, [("/tmp/evil.png", png_bytes(good_image(6)))]),
         "error", r"has an unsafe path", "/tmp/evil.png"),
    Case("zip_bomb", lambda d: zip_with(d, [("bomb.png", bytes(20 * 1024 * 1024))]),
         "error", r"zip bomb", "bomb.png"),
    Case("zip_over_upload_limit", lambda d: zip_with(d, []), "error", r"upload limit", None,
         load_kwargs={"max_upload_bytes": 2_000}),
    Case("nested_zip", lambda d: zip_with(d, [("more.zip", _zip_bytes({"a.png": png_bytes(good_image(8))}))]),
         "error", r"is a nested archive.*unpack it", "more.zip"),
    Case("symlink_in_zip", lambda d: zip_with(d, [symlink_entry("link.png", "/etc/passwd")]),
         "error", r"is a symbolic link", "link.png"),
    Case("encrypted_zip_entry", _build_encrypted_zip, "error", r"is encrypted", "secret.png"),
    Case("not_a_zip", lambda d: _write(d / "refs.zip", b"this is not a zip file at all"),
         "error", r"is not a valid zip file", None),
    # -- valid but unusual: accepted and converted correctly --
    Case("png_16bit_gray", lambda d: folder_with(d, {"gray16.png": encode(Image.new("I;16", (320, 300), 0x8080), "PNG")}),
         "accepted", check=_check_16bit_gray),
    Case("png_16bit_rgb", lambda d: folder_with(d, {"rgb16.png": png_16bit_rgb(300, 280, (0x1234, 0x8000, 0xFF00))}),
         "accepted", check=_check_16bit_rgb),
    Case("cmyk_jpeg", lambda d: folder_with(d, {"cmyk.jpg": cmyk_jpeg()}), "accepted", check=_check_cmyk),
    Case("exif_rotated_jpeg", lambda d: folder_with(d, {"rotated.jpg": exif_rotated_jpeg()}),
         "accepted", check=_check_exif),
    Case("grayscale", lambda d: folder_with(d, {"gray.png": png_bytes(good_image(9).convert("L"))}),
         "accepted", check=_check_gray),
    Case("alpha_and_palette", lambda d: folder_with(d, {
        "rgba.png": png_bytes(_with_transparent_corner(good_image(10).convert("RGBA"))),
        "palette.png": _palette_png_with_transparency(),
    }), "warning", r"transparent areas; they are filled with white", check=_check_alpha),
    Case("jpeg_named_png", lambda d: folder_with(d, {"photo.png": jpeg_bytes(good_image(11))}), "accepted"),
    Case("unicode_names", _build_unicode_folder, "accepted", check=_check_unicode),
    Case("unicode_names_in_zip", lambda d: _zip_only(d, {
        unicodedata.normalize("NFD", "café.png"): png_bytes(good_image(311)),
        "日本の猫.png": png_bytes(good_image(312)),
    }), "accepted", check=_check_unicode_zip),
    Case("macos_junk_in_zip", lambda d: zip_with(d, [("__MACOSX/._good_00.png", b"\x00\x05\x16\x07junk"),
                                                     (".DS_Store", b"Bud1"), ("sub/.hidden.png", b"")]),
         "accepted", check=_check_junk_ignored),
    # -- warnings --
    Case("exact_duplicate", _build_exact_duplicate, "warning",
         r"good_01_copy.png is the same picture as good_01.png \(identical pixels\)", check=_check_exact_duplicate),
    Case("near_duplicate", _build_near_duplicate, "warning",
         r"good_00.png and good_00_small.jpg are near-duplicates"),
    Case("captions_full_of_style_words", _build_style_captions, "warning",
         r"good_00.txt: the caption describes how the picture looks \(.*watercolor.*\)"),
    Case("two_refs", lambda d: folder_with(d, {}, n_good=2), "warning", r"nothing works reliably with 2"),
    Case("small_images", lambda d: folder_with(d, {}), "warning", r"good_00.png: is 384×320, under 1024 px"),
]

CASES_BY_NAME: dict[str, Case] = {case.name: case for case in CASES}

# check_trigger(trigger) must raise TriggerError matching the regex.
TRIGGER_CASES: list[tuple[str, str, str]] = [
    ("empty_trigger", "", r"trigger word is empty"),
    ("blank_trigger", "   ", r"trigger word is empty"),
    ("common_word_style", "style", r"common word.*'zxy_style'"),
    ("common_word_art", "Art", r"common word.*'zxy_art'"),
    ("common_word_painting", "painting", r"common word.*'zxy_painting'"),
    ("common_word_illustration", "illustration", r"common word.*'zxy_illustration'"),
    ("style_word_watercolor", "watercolor", r"common word"),
    ("two_words", "my style", r"whitespace.*'my_style'"),
    ("odd_characters", "stylé!", r"contains '!', 'é'.*'zxy_style'"),
]


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _zip_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def _zip_only(root: Path, files: dict[str, bytes]) -> Path:
    return _write(root / "refs.zip", _zip_bytes(files))


def _with_transparent_corner(img: Image.Image) -> Image.Image:
    ImageDraw.Draw(img).rectangle([0, 0, 40, 40], fill=(0, 0, 0, 0))
    return img


def _palette_png_with_transparency() -> bytes:
    img = good_image(12).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    ImageDraw.Draw(img).rectangle([0, 0, 40, 40], fill=0)
    return encode(img, "PNG", transparency=0)  # palette entry 0 is transparent


def build_corpus(out_dir: Path) -> dict[str, dict[str, Any]]:
    """Build every case into out_dir/<case name>/ and return {case: what load_refs must answer}."""
    index = {}
    for case in CASES:
        case_dir = Path(out_dir) / case.name
        case_dir.mkdir(parents=True, exist_ok=True)
        source = case.build(case_dir)
        index[case.name] = {"source": str(source.relative_to(out_dir)), "expect": case.expect,
                            "message": case.message, "file": case.file, "load_kwargs": case.load_kwargs}
    return index


if __name__ == "__main__":  # python tests/bad_inputs.py OUT_DIR: the corpus on disk, for a look by hand
    import json
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python tests/bad_inputs.py OUT_DIR")
    target = Path(sys.argv[1])
    target.mkdir(parents=True, exist_ok=True)
    corpus_index = build_corpus(target)
    (target / "expected.json").write_text(json.dumps(corpus_index, indent=2, ensure_ascii=False), encoding="utf-8")
    print(f"wrote {len(corpus_index)} cases to {target} (expected answers in expected.json)")
