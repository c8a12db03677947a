"""Booleans are ``true`` / ``false`` only: YAML 1.1's yes / no / on / off stay words and are refused.

The docs say plain ``bool`` params are strict; unquoted ``yes`` was read as True in recipe files and
in ``--set`` values alike.
"""
from __future__ import annotations

import pytest

import vitlab
from vitlab.errors import SpecError
from vitlab.parsing import load_yaml

from conftest import TINY, invoke_cli, one_error


@pytest.mark.parametrize("word", ["yes", "no", "on", "off", "Yes", "OFF", "y", "n"])
def test_yaml_words_are_not_booleans(word):
    assert load_yaml(f"a: {word}") == {"a": word}


@pytest.mark.parametrize("word, value", [("true", True), ("false", False), ("True", True), ("FALSE", False)])
def test_true_and_false_are(word, value):
    assert load_yaml(f"a: {word}") == {"a": value}


@pytest.mark.parametrize("key", ["class_token", "attention.params.qk_norm"])
def test_set_refuses_yes(key):
    line = one_error(invoke_cli("validate", "vit_tiny_patch16_224", "--set", f"{key}=yes"))
    assert f"{key}: input should be a valid boolean (got 'yes')" in line


def test_a_recipe_file_refuses_no(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("depth: 2\nembed_dim: 32\nnum_heads: 2\nattention: {name: mhsa, params: {qkv_bias: no}}\n")
    with pytest.raises(SpecError, match="attention.params.qkv_bias: input should be a valid boolean"):
        vitlab.load_spec(path)
    assert vitlab.load_spec({**TINY, "attention": {"name": "mhsa", "params": {"qkv_bias": False}}})
