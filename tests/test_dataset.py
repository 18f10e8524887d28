"""train/dataset (sources, captions, hashes, buckets) and train/captions (trigger, lint, prefix)."""

from __future__ import annotations

import io
import math
import random
import zipfile

import numpy as np
import pytest
from PIL import Image, ImageDraw

try:
    from tests import bad_inputs
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    import bad_inputs

from train.captions import (
    COMMON_TRIGGER_WORDS,
    TriggerError,
    check_trigger,
    lint_caption,
    with_trigger,
)
from train.dataset import (
    DatasetError,
    assign_buckets,
    bucket_grid,
    bucket_size,
    load_refs,
    near_duplicate_pairs,
    prepare_image,
)

good_image = bad_inputs.good_image
png_bytes = bad_inputs.png_bytes


def _folder(tmp_path, files: dict[str, bytes | str]):
    root = tmp_path / "refs"
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
    return root


def _five_refs() -> dict[str, bytes | str]:
    files: dict[str, bytes | str] = {f"img_{k}.png": png_bytes(good_image(200 + k)) for k in range(5)}
    files["img_0.txt"] = "a lighthouse on a rock\n"
    files["img_1.txt"] = "two cats on a sofa"
    return files


# -- load_refs: sources ---------------------------------------------------------------------------------


def test_folder_with_sidecar_captions(tmp_path):
    refset = load_refs(_folder(tmp_path, _five_refs()))
    assert [ref.name for ref in refset.refs] == [f"img_{k}.png" for k in range(5)]
    captions = {ref.name: ref.sidecar_caption for ref in refset.refs}
    assert captions["img_0.png"] == "a lighthouse on a rock"
    assert captions["img_1.png"] == "two cats on a sofa"
    assert captions["img_2.png"] is None
    ref = refset.refs[0]
    assert ref.image.mode == "RGB" and (ref.width, ref.height) == (384, 320) and ref.format == "PNG"
    assert len(ref.sha256) == 64
    assert not any("nothing works reliably" in w for w in refset.warnings)  # 5 refs: no count warning


def test_subfolders_hidden_files_and_other_files(tmp_path):
    files = _five_refs()
    files["more/deep.jpg"] = bad_inputs.jpeg_bytes(good_image(300))
    files["more/deep.txt"] = "a boat"
    files[".hidden/secret.png"] = b"not even an image"
    files["notes.md"] = "# my notes"
    files["orphan.txt"] = "a caption without its picture"
    refset = load_refs(_folder(tmp_path, files))
    names = [ref.name for ref in refset.refs]
    assert "more/deep.jpg" in names and not any("secret" in n for n in names)
    assert next(r for r in refset.refs if r.name == "more/deep.jpg").sidecar_caption == "a boat"
    assert any(w.startswith("notes.md: ignored") for w in refset.warnings)
    assert any(w.startswith("orphan.txt: ignored: no image") for w in refset.warnings)


def test_zip_with_a_top_folder_matches_the_folder(tmp_path):
    files = _five_refs()
    folder = _folder(tmp_path, files)
    zip_path = tmp_path / "refs.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        for name, data in files.items():
            zf.writestr(f"my refs/{name}", data)
        zf.writestr("my refs/", b"")  # a folder entry
    from_folder = load_refs(folder)
    from_zip = load_refs(zip_path)
    assert [ref.name for ref in from_zip.refs] == [f"my refs/img_{k}.png" for k in range(5)]
    assert from_zip.refs[1].sidecar_caption == "two cats on a sofa"
    # Names differ, pictures and captions do not: the dataset hash is the same.
    assert from_zip.dataset_hash == from_folder.dataset_hash


def test_dataset_hash_follows_pixels_and_captions(tmp_path):
    files = _five_refs()
    base = load_refs(_folder(tmp_path / "a", files)).dataset_hash
    renamed = {name.replace("img_", "pic_"): data for name, data in files.items()}
    assert load_refs(_folder(tmp_path / "b", renamed)).dataset_hash == base
    recaptioned = dict(files, **{"img_0.txt": "a lighthouse on a cliff"})
    assert load_refs(_folder(tmp_path / "c", recaptioned)).dataset_hash != base
    repixeled = dict(files, **{"img_4.png": png_bytes(good_image(999))})
    assert load_refs(_folder(tmp_path / "d", repixeled)).dataset_hash != base


def test_storage_prefix_and_zip_key(tmp_path):
    from cluster.storage import Storage

    storage = Storage.from_uri(tmp_path / "store")
    files = _five_refs()
    for name, data in files.items():
        storage.write_bytes(f"tenants/acme/refs/{name}", data.encode() if isinstance(data, str) else data)
    storage.write_bytes("tenants/acme/refs.zip", bad_inputs._zip_bytes(
        {name: data.encode() if isinstance(data, str) else data for name, data in files.items()}))
    from_prefix = load_refs("tenants/acme/refs", storage=storage)
    from_zip = load_refs("tenants/acme/refs.zip", storage=storage)
    assert [ref.name for ref in from_prefix.refs] == [f"img_{k}.png" for k in range(5)]
    assert from_prefix.dataset_hash == from_zip.dataset_hash
    assert from_prefix.refs[0].sidecar_caption == "a lighthouse on a rock"


def test_s3_uri_through_moto(tmp_path, monkeypatch):
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1",
                           "AWS_EC2_METADATA_DISABLED": "true", "KLEIN_S3_ENDPOINT": endpoint}.items():
            monkeypatch.setenv(key, value)
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket="style-refs")
        files = {k: (v.encode() if isinstance(v, str) else v) for k, v in _five_refs().items()}
        for name, data in files.items():
            s3.put_object(Bucket="style-refs", Key=f"acme/refs/{name}", Body=data)
        s3.put_object(Bucket="style-refs", Key="acme/refs.zip", Body=bad_inputs._zip_bytes(files))
        from_prefix = load_refs("s3://style-refs/acme/refs")
        from_zip = load_refs("s3://style-refs/acme/refs.zip")
        assert [ref.name for ref in from_prefix.refs] == [f"img_{k}.png" for k in range(5)]
        assert from_prefix.dataset_hash == from_zip.dataset_hash
    finally:
        server.stop()


def test_missing_path_single_file_and_unsupported_scheme(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_refs(tmp_path / "nowhere")
    single = tmp_path / "one.png"
    single.write_bytes(png_bytes(good_image(1)))
    with pytest.raises(DatasetError, match="is a single file, not a folder or a .zip"):
        load_refs(single)
    with pytest.raises(DatasetError, match="unsupported scheme ftp://"):
        load_refs("ftp://example.com/refs")


def test_max_refs_is_configurable(tmp_path):
    folder = _folder(tmp_path, _five_refs())
    with pytest.raises(DatasetError, match="has 5 images, over the limit of 4"):
        load_refs(folder, max_refs=4)
    assert len(load_refs(folder, max_refs=5).refs) == 5


def test_min_side_is_configurable(tmp_path):
    folder = _folder(tmp_path, _five_refs())
    with pytest.raises(DatasetError) as caught:
        load_refs(folder, min_side=330)
    assert len(caught.value.problems) == 6  # all five files, and then "no usable images"
    assert "shorter side (320 px) is under the 330 px minimum" in caught.value.problems[0].problem


def test_zip_unpacked_size_limit(tmp_path):
    # Entries that compress about 8:1 (under the bomb ratio) but unpack past the upload limit.
    rng = np.random.default_rng(0)
    half_random = lambda: rng.integers(0, 2, size=600_000, dtype=np.uint8).tobytes()  # noqa: E731
    zip_path = bad_inputs.zip_with(tmp_path, [(f"blob_{k}.png", half_random()) for k in range(3)])
    assert zip_path.stat().st_size < 1_000_000
    with pytest.raises(DatasetError, match=r"unpacks to 1\.\d MiB, over the 976\.6 KiB upload limit"):
        load_refs(zip_path, max_upload_bytes=1_000_000)


def test_too_many_zip_entries(tmp_path, monkeypatch):
    import train.dataset as dataset

    monkeypatch.setattr(dataset, "MAX_ZIP_ENTRIES", 5)
    zip_path = bad_inputs.zip_with(tmp_path, [(f"c{k}.txt", b"a cat") for k in range(3)])
    with pytest.raises(DatasetError, match="has 6 entries, over the limit of 5"):
        load_refs(zip_path)


def test_style_word_caption_lint_lands_on_the_ref(tmp_path):
    files = _five_refs()
    files["img_2.txt"] = "a vibrant neon cat"
    refset = load_refs(_folder(tmp_path, files))
    ref = refset.refs[2]
    assert ref.sidecar_caption == "a vibrant neon cat"  # kept as written: the lint warns, it does not edit
    assert any("img_2.txt: the caption describes how the picture looks" in w and "vibrant, neon" in w
               for w in ref.warnings)


def test_distinct_pictures_are_not_near_duplicates(tmp_path):
    refset = load_refs(_folder(tmp_path, {f"{k}.png": png_bytes(good_image(400 + k)) for k in range(12)}))
    assert near_duplicate_pairs(refset.refs) == []


# -- buckets --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size,bucket", [
    ((1024, 1024), (1024, 1024)),
    ((4096, 4096), (1024, 1024)),
    ((3000, 2000), (1264, 832)),
    ((2000, 3000), (832, 1264)),
    ((1920, 1080), (1360, 768)),
    ((800, 600), (768, 592)),  # smaller than its 1168×896 bucket: shrunk, never upscaled
    ((300, 300), (288, 288)),
    ((256, 256), (256, 256)),
])
def test_bucket_size_known_values(size, bucket):
    assert bucket_size(*size) == bucket


def test_bucket_grid_shape():
    grid = bucket_grid(1024)
    assert (1024, 1024) in grid
    for w, h in grid:
        assert w % 16 == 0 and h % 16 == 0
        assert 0.9 < w * h / 1024**2 < 1.1
        assert max(w / h, h / w) <= 4.0 + 1e-6


def test_bucket_size_properties_on_random_sizes():
    rng = random.Random(0)
    for _ in range(500):
        width, height = rng.randint(256, 6000), rng.randint(256, 6000)
        for resolution in (512, 1024):
            w, h = bucket_size(width, height, resolution)
            assert w % 16 == 0 and h % 16 == 0
            assert w <= width and h <= height, "never upscales"
            assert w * h <= resolution * resolution * 1.1
            aspect = min(max(width / height, 1 / 4), 4)
            assert abs(math.log((w / h) / aspect)) < 0.12, (width, height, w, h)


def test_bucket_size_refuses_what_no_bucket_fits():
    with pytest.raises(ValueError, match="too small"):
        bucket_size(10, 10)


def test_prepare_image_center_crops_to_the_exact_bucket():
    wide = Image.new("RGB", (800, 400), (0, 0, 255))
    ImageDraw.Draw(wide).rectangle([300, 0, 499, 399], fill=(255, 0, 0))  # the middle 200 px
    out = prepare_image(wide, (256, 256))
    assert out.size == (256, 256) and out.mode == "RGB"
    pixels = np.asarray(out).astype(int)
    # The 400×400 center crop keeps 100 px of blue each side of the 200-px red band, scaled by 0.64.
    assert pixels[128, 128, 0] > 240 and pixels[128, 128, 2] < 15
    assert pixels[128, 5, 2] > 240 and pixels[128, 250, 2] > 240


def test_prepare_image_for_every_ref_bucket(tmp_path):
    sizes = [(384, 320), (320, 600), (1000, 300), (512, 512)]
    files = {f"{k}.png": png_bytes(good_image(500 + k, size)) for k, size in enumerate(sizes)}
    refset = load_refs(_folder(tmp_path, files))
    buckets = assign_buckets(refset.refs, resolution=512)
    assert sorted(i for indices in buckets.values() for i in indices) == list(range(len(sizes)))
    for bucket, indices in buckets.items():
        for i in indices:
            ref = refset.refs[i]
            assert bucket == bucket_size(ref.width, ref.height, 512)
            assert prepare_image(ref.image, bucket).size == bucket


def test_small_image_warning_names_the_training_size(tmp_path):
    refset = load_refs(_folder(tmp_path, {f"{k}.png": png_bytes(good_image(600 + k, (800, 600))) for k in range(5)}))
    assert any(w.startswith("0.png: is 800×600, under 1024 px") and "trains at 768×592" in w for w in refset.warnings)
    # the job's own resolution decides the bucket: at 512 an 800×600 image is big enough, at 960 it trains smaller
    files = {f"{k}.png": png_bytes(good_image(600 + k, (800, 600))) for k in range(5)}
    at_512 = load_refs(_folder(tmp_path / "a", files), resolution=512)
    assert not any("under" in w for w in at_512.warnings)
    at_960 = load_refs(_folder(tmp_path / "b", files), resolution=960)
    used = bucket_size(800, 600, 960)
    assert any(w.startswith("0.png: is 800×600, under 960 px") and f"trains at {used[0]}×{used[1]}" in w
               for w in at_960.warnings)


# -- captions ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("trigger", ["zxy_ink", "  kl3in-style  ", "OHWX"])
def test_good_triggers(trigger):
    assert check_trigger(trigger) == trigger.strip()


def test_common_words_are_refused_with_a_suggestion():
    for word in ("style", "art", "painting", "illustration", "photo", "image", "picture", "drawing", "design"):
        assert word in COMMON_TRIGGER_WORDS
        with pytest.raises(TriggerError, match=f"use a rare token instead, e.g. 'zxy_{word}'"):
            check_trigger(word.upper())


def test_overlong_trigger():
    with pytest.raises(TriggerError, match="characters long"):
        check_trigger("x" * 41)


def test_lint_caption():
    assert lint_caption("a house beside two trees under the sun") == []
    [warning] = lint_caption("a moody watercolor of a red barn")
    assert "mood: moody" in warning and "medium: watercolor" in warning and "colour: red" in warning
    assert "never how it looks" in warning
    assert "empty" in lint_caption("  ")[0]
    assert any("characters long" in w for w in lint_caption("a cat " * 300))


@pytest.mark.parametrize("caption,expected", [
    ("a cat on a mat", "zxy_ink. a cat on a mat"),
    ("zxy_ink. a cat on a mat", "zxy_ink. a cat on a mat"),
    ("zxy_ink, a cat", "zxy_ink, a cat"),
    ("ZXY_INK, a cat", "zxy_ink, a cat"),
    ("zxy_inked cat", "zxy_ink. zxy_inked cat"),
    ("  a   cat\n", "zxy_ink. a cat"),
    ("", "zxy_ink"),
    (None, "zxy_ink"),
])
def test_with_trigger(caption, expected):
    assert with_trigger("zxy_ink", caption) == expected


def test_broken_colour_profile_warns_and_keeps_the_picture(tmp_path):
    buffer = io.BytesIO()
    good_image(700).save(buffer, "JPEG", icc_profile=b"not a real ICC profile")
    files = dict(_five_refs(), **{"odd_profile.jpg": buffer.getvalue()})
    refset = load_refs(_folder(tmp_path, files))
    assert "odd_profile.jpg" in [ref.name for ref in refset.refs]
    assert any(w.startswith("odd_profile.jpg: its colour profile could not be applied") for w in refset.warnings)


def test_srgb_profile_is_left_alone(tmp_path):
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    picture = good_image(701)
    files = dict(_five_refs(), **{"srgb.png": bad_inputs.encode(picture, "PNG", icc_profile=srgb)})
    refset = load_refs(_folder(tmp_path, files))
    ref = next(ref for ref in refset.refs if ref.name == "srgb.png")
    assert ref.image.tobytes() == picture.tobytes()


def test_empty_and_bom_captions(tmp_path):
    files = dict(_five_refs(), **{"img_2.txt": "   \n", "img_3.txt": "\ufeffa bridge over a river\r\n"})
    refset = load_refs(_folder(tmp_path, files))
    assert refset.refs[2].sidecar_caption is None
    assert any(w == "img_2.txt: is empty; img_2.png has no caption" for w in refset.warnings)
    assert refset.refs[3].sidecar_caption == "a bridge over a river"


def test_large_refs_are_kept_downscaled_with_the_original_size_and_hash(tmp_path, monkeypatch):
    import train.dataset as dataset

    files = {f"{k}.png": png_bytes(good_image(700 + k, (1000, 500))) for k in range(2)}
    full = load_refs(_folder(tmp_path / "a", files))
    monkeypatch.setattr(dataset, "KEEP_PIXELS", 300 * 300)  # as a 64 MP photo is to the real cap
    kept = load_refs(_folder(tmp_path / "b", files))
    for big, small in zip(full.refs, kept.refs):
        assert (small.width, small.height) == (1000, 500) and small.sha256 == big.sha256
        w, h = small.image.size
        assert w * h <= 300 * 300 and abs(w / h - 2.0) < 0.02  # aspect kept
    assert kept.dataset_hash == full.dataset_hash
    # The bucket is still cut from the kept image without upscaling, and looks like the full-size cut.
    bucket = bucket_size(1000, 500, 256)
    a = np.asarray(prepare_image(full.refs[0].image, bucket)).astype(float)
    b = np.asarray(prepare_image(kept.refs[0].image, bucket)).astype(float)
    assert kept.refs[0].image.size[0] >= bucket[0] and np.abs(a - b).mean() < 12
