"""``extends`` stays where the recipe is: a recipe never makes vitlab open, or quote, other files.

The threat: ``extends: /etc/shadow`` printed the file's first line in its error ("unknown field
'root:*:...'"). Each test writes the files it needs; the "secret" is text we planted ourselves.
"""
from __future__ import annotations

import pytest
import yaml

import vitlab
from vitlab.errors import SpecError

from conftest import TINY, invoke_cli, one_error

SECRET = "hunter2-not-for-your-eyes"


def _secret_files(folder):
    """Files that are not recipes, each holding SECRET somewhere a parser would quote it."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "shadow": f"root:{SECRET}:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n",
        "keys": f"{SECRET}: 1\n",
        "text": f"{SECRET} and more words\n",
        "broken": f"key: [unclosed\n  {SECRET}: x\n",
        "list": f"- {SECRET}\n",
    }
    for name, text in files.items():
        (folder / name).write_text(text)
    return sorted(files)


@pytest.mark.parametrize("name", ["shadow", "keys", "text", "broken", "list"])
def test_an_extended_file_that_is_not_a_recipe_is_never_quoted(tmp_path, name):
    _secret_files(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"extends: {name}\nname: r\n")
    with pytest.raises(SpecError) as err:
        vitlab.load_spec(recipe)
    text = "\n".join(err.value.lines())
    assert SECRET not in text and "extends" in text and "recipe" in text, text


def test_extends_outside_the_recipe_folder_needs_the_flag(tmp_path, monkeypatch):
    _secret_files(tmp_path / "elsewhere")
    (tmp_path / "elsewhere" / "parent.yaml").write_text(yaml.safe_dump({**TINY, "name": "parent"}))
    recipe = tmp_path / "mine" / "r.yaml"
    recipe.parent.mkdir()
    for ref in ("../elsewhere/parent.yaml", str(tmp_path / "elsewhere" / "shadow"), "/etc/passwd"):
        recipe.write_text(f"extends: {ref}\nname: r\n")
        line = one_error(invoke_cli("validate", recipe))
        assert "is outside the recipe's folder" in line and "--allow-extends-outside" in line and SECRET not in line
    # allowed explicitly, a real recipe outside loads; a file that is not a recipe is still not quoted
    recipe.write_text("extends: ../elsewhere/parent.yaml\nname: r\n")
    monkeypatch.setenv("VITLAB_ALLOW_EXTENDS_OUTSIDE", "1")
    assert vitlab.load_spec(recipe).name == "r"
    recipe.write_text(f"extends: {tmp_path / 'elsewhere' / 'shadow'}\nname: r\n")
    line = one_error(invoke_cli("validate", recipe))
    assert "is not a vitlab recipe" in line and SECRET not in line


def test_the_cli_flag_allows_extends_outside(tmp_path, monkeypatch):
    monkeypatch.setenv("VITLAB_ALLOW_EXTENDS_OUTSIDE", "0")  # the flag sets it for the process: undone after
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "parent.yaml").write_text(yaml.safe_dump({**TINY, "name": "parent"}))
    recipe = tmp_path / "kid" / "r.yaml"
    recipe.parent.mkdir()
    recipe.write_text("extends: ../base/parent.yaml\nname: r\n")
    assert invoke_cli("validate", recipe).exit_code == 2
    res = invoke_cli("--allow-extends-outside", "validate", recipe)
    assert res.exit_code == 0, res.output


def test_extends_in_the_folder_its_subfolders_and_the_bundled_recipes(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "parent.yaml").write_text(yaml.safe_dump({**TINY, "name": "parent", "depth": 3}))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("extends: sub/parent.yaml\nname: r\n")
    assert vitlab.load_spec(recipe).depth == 3
    recipe.write_text("extends: vit_tiny_patch16_224\nname: r\n")
    assert vitlab.load_spec(recipe).embed_dim == 192


def test_a_symlink_out_of_the_folder_counts_as_outside(tmp_path):
    _secret_files(tmp_path / "elsewhere")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "link.yaml").symlink_to(tmp_path / "elsewhere" / "shadow")
    recipe = tmp_path / "mine" / "r.yaml"
    recipe.write_text("extends: link.yaml\nname: r\n")
    with pytest.raises(SpecError, match="outside the recipe's folder"):
        vitlab.load_spec(recipe)
