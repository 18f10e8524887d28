"""Every case of the image/zip bad-input corpus (tests/bad_inputs.py) gets its specific answer, and nothing stored changes.

For each case: build it under tmp_path, snapshot tmp_path (the source, its parent, an output folder
beside it), point the temporary-file folder at an empty scratch dir, run load_refs, then check the
answer and that the snapshot and the scratch dir are unchanged (a zip entry named `../evil.png` must not
land anywhere, and nothing is extracted to disk).
"""

from __future__ import annotations

import re
import tempfile

import pytest

try:
    from tests import bad_inputs
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    import bad_inputs

from train.captions import TriggerError, check_trigger
from train.dataset import DatasetError, RefSet, load_refs


def _problem_lines(error: DatasetError) -> list[str]:
    return [str(problem) for problem in error.problems]


@pytest.mark.parametrize("case", bad_inputs.CASES, ids=lambda case: case.name)
def test_bad_input_case(case: bad_inputs.Case, tmp_path, monkeypatch):
    source_root = tmp_path / "stored"
    source_root.mkdir()
    (source_root / "out").mkdir()  # an output folder beside the source: must stay empty
    source = case.build(source_root)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    before = bad_inputs.tree_snapshot(source_root)

    result: RefSet | DatasetError
    try:
        result = load_refs(source, **case.load_kwargs)
    except DatasetError as error:
        result = error

    assert bad_inputs.tree_snapshot(source_root) == before, "loading changed stored files"
    assert list(scratch.iterdir()) == [], "loading wrote temporary files"

    if case.expect == "error":
        assert isinstance(result, DatasetError), f"{case.name}: expected a DatasetError, got {result!r}"
        lines = _problem_lines(result)
        matching = [
            line for line, problem in zip(lines, result.problems)
            if re.search(case.message, line) and (case.file is None or problem.file == case.file)
        ]
        assert matching, f"{case.name}: no problem for {case.file!r} matches {case.message!r}:\n{result}"
        if case.file is None:
            assert any(problem.file == str(source) for problem in result.problems), str(result)
        for problem in result.problems:  # every problem says what to do
            assert problem.fix.strip(), problem
        assert str(result).count("\n  - ") == len(result.problems)  # the message lists every problem
        return

    assert isinstance(result, RefSet), f"{case.name}: expected to be accepted, got:\n{result}"
    for ref in result.refs:
        assert ref.image.mode == "RGB" and ref.image.size == (ref.width, ref.height)
    if case.expect == "warning":
        assert any(re.search(case.message, w) for w in result.warnings), (
            f"{case.name}: no warning matches {case.message!r}: {result.warnings}"
        )
    if case.check is not None:
        case.check(result)


def test_all_problems_are_reported_together(tmp_path):
    folder = bad_inputs.CASES_BY_NAME["all_problems_reported_together"].build(tmp_path)
    with pytest.raises(DatasetError) as caught:
        load_refs(folder)
    by_file = {problem.file: problem.problem for problem in caught.value.problems}
    assert "is truncated" in by_file["broken.png"]
    assert "is empty (0 bytes)" in by_file["empty.jpg"]
    assert "is not an image: it contains text" in by_file["notes.png"]
    assert str(caught.value).startswith("3 problems with the reference images in ")


def test_zip_slip_writes_nothing_outside(tmp_path, monkeypatch):
    inner = tmp_path / "a" / "b"
    inner.mkdir(parents=True)
    zip_path = bad_inputs.zip_with(inner, [("../../escaped.png", bad_inputs.png_bytes(bad_inputs.good_image(1)))])
    monkeypatch.chdir(inner)
    with pytest.raises(DatasetError, match="unsafe path"):
        load_refs(zip_path)
    assert not list(tmp_path.rglob("escaped.png"))


def test_zip_bomb_is_refused_before_decompressing(tmp_path, monkeypatch):
    zip_path = bad_inputs.CASES_BY_NAME["zip_bomb"].build(tmp_path)
    read_calls = []
    import zipfile

    original_read = zipfile.ZipFile.read
    monkeypatch.setattr(zipfile.ZipFile, "read", lambda self, *a, **k: read_calls.append(a) or original_read(self, *a, **k))
    with pytest.raises(DatasetError, match="zip bomb"):
        load_refs(zip_path)
    assert read_calls == []


@pytest.mark.parametrize("name,trigger,message", bad_inputs.TRIGGER_CASES, ids=[c[0] for c in bad_inputs.TRIGGER_CASES])
def test_bad_trigger(name, trigger, message):
    with pytest.raises(TriggerError, match=message):
        check_trigger(trigger)


def test_corpus_names_are_unique():
    names = [case.name for case in bad_inputs.CASES]
    assert len(names) == len(set(names))
