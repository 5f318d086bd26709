"""`lazybench images ls|prune` on a fake cache (no building): one notion of "current"."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.cli import main
from harness.images import find_recipe
from harness.images.recipes import recipe_hash
from harness.images.source import IMPORT_FORMAT


def _entry(cache: Path, directory: str, **meta: object) -> Path:
    path = cache / "images" / directory
    (path / "layers").mkdir(parents=True)
    (path / "layers" / "0.tar").write_bytes(b"x" * 1000)
    data = {"name": "x", "hash": directory, "config": {}, "layers": [{"size": 1000}], **meta}
    (path / "image.json").write_text(json.dumps(data))
    return path


def test_prune_keeps_what_ls_shows_current_imports_included(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """prune once removed every imported image (it kept recipe hashes only) while ls showed
    them as current."""
    tiny = _entry(tmp_path, recipe_hash(find_recipe("tiny")), name="tiny")
    old_recipe = _entry(tmp_path, "0123456789abcdef", name="tiny")
    imported = _entry(tmp_path, "src-a", source="oci-archive:/app.tar", import_format=IMPORT_FORMAT)
    before_field = _entry(tmp_path, "src-b", source="docker://x/y:1")  # no format recorded
    old_import = _entry(tmp_path, "src-c", source="oci:/old", import_format=IMPORT_FORMAT - 1)

    assert main(["images", "ls", "--json", "--cache-dir", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    current = {row["hash"] for row in rows if row["current"]}
    assert current == {tiny.name, imported.name, before_field.name}

    assert main(["images", "prune", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    left = {p.name for p in (tmp_path / "images").iterdir()}
    assert left == current
    assert not old_recipe.exists() and not old_import.exists()
    assert "removed oci:/old src-c" in out


def test_ls_of_an_empty_cache_says_so_without_an_empty_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An empty cache printed an empty table's frame above "no images cached"."""
    assert main(["images", "ls", "--cache-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"no images cached under {tmp_path / 'images'}\n"
