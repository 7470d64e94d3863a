"""The docs site: the configuration reference matches the schema, and `mkdocs build --strict` passes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tuneforge import docs_reference
from tuneforge.config import Config, Section

ROOT = Path(__file__).resolve().parent.parent


def test_configuration_page_is_generated_from_the_schema():
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page == docs_reference.render(), (
        "docs/configuration.md is out of date: run `python -m tuneforge.docs_reference > docs/configuration.md`")


def _fields(cls: type[Section], prefix: str = ""):
    for name, field in cls.model_fields.items():
        yield f"{prefix}{name}", field
        sub = docs_reference._section_class(field.annotation)
        if sub is not None:
            yield from _fields(sub, f"{prefix}{name}.")


def test_every_key_has_a_description_on_the_page():
    page = (ROOT / "docs" / "configuration.md").read_text()
    keys = list(_fields(Config))
    assert len(keys) > 60
    for key, field in keys:
        assert field.description and field.description.strip(), f"{key}: no Field(description=...)"
        assert field.description.replace("|", "\\|") in page, key


def test_a_field_without_description_is_refused(monkeypatch):
    from pydantic import Field, create_model

    bare = create_model("Bare", __base__=Section, knob=(int, Field(3)))
    with pytest.raises(ValueError, match="Bare.knob has no Field"):
        docs_reference.section_table("bare", bare)


def test_mkdocs_build_strict(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or shutil.which("mkdocs")
    assert mkdocs, "mkdocs is missing: install the dev (or docs) extra"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run([mkdocs, "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path / "site")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "site" / "configuration" / "index.html").is_file()
    assert (tmp_path / "site" / "migration" / "index.html").is_file()
