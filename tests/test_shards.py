"""``compare --merge`` reads shards as untrusted data: checked, bounded, consistent, or one error line.

Every shard here is written by the test: one real ``compare --format json`` output of a tiny recipe,
then altered. A case holds when the command exits 2 with one ``error:`` line naming the file, in
bounded time, and nothing is written.
"""
from __future__ import annotations

import copy
import json
import os
import threading

import pytest

from vitlab.analysis.shards import MAX_SHARD_BYTES, MAX_SHARD_NESTING, ShardRow, read_shard
from vitlab.errors import VitlabError

from conftest import invoke_cli, one_error

TINY = "vit_tiny_patch16_224"
SMALL = ("--set", "depth=1", "--set", "img_size=32")


@pytest.fixture(scope="module")
def good_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "whole.json"
    res = invoke_cli("compare", TINY, "--sweep", "mlp_ratio=2,4", *SMALL, "--format", "json", "-o", out)
    assert res.exit_code == 0, res.output
    return json.loads(out.read_text())


def _write(path, rows):
    path.write_text(rows if isinstance(rows, str) else json.dumps(rows))
    return path


def _merge_error(*paths) -> str:
    return one_error(invoke_cli("compare", "--merge", *paths, "--format", "json"))


def test_a_real_output_is_a_valid_shard(good_rows, tmp_path):
    assert [ShardRow.model_validate(r).name for r in good_rows] == [f"{TINY}[mlp_ratio=2]", f"{TINY}[mlp_ratio=4]"]
    a, b = _write(tmp_path / "a.json", good_rows[:1]), _write(tmp_path / "b.json", good_rows)
    res = invoke_cli("compare", "--merge", a, b, "--format", "json")
    assert res.exit_code == 0, res.output
    merged = json.loads(res.stdout)  # the output stays valid JSON
    assert [r["name"] for r in merged] == [r["name"] for r in good_rows]
    assert [r["flops"] for r in merged] == [r["flops"] for r in good_rows]


@pytest.mark.parametrize("change, says", [
    (lambda r: r.update(flops="many"), "flops"),
    (lambda r: r.update(params=-1), "params"),
    (lambda r: r.update(flops=1e308), "flops"),
    (lambda r: r.update(flops=10**30), "flops"),
    (lambda r: r.pop("name"), "name"),
    (lambda r: r.update(name=""), "name"),
    (lambda r: r.update(name="x" * 2000), "name"),
    (lambda r: r.update(img_size="224"), "img_size"),
    (lambda r: r.update(by_kind=[1, 2]), "by_kind"),
    (lambda r: r.update(measured={"device": "cpu", "batch_size": 1, "infer_ms": "fast"}), "measured"),
    (lambda r: r.update(unexpected=1), "unexpected"),
], ids=["str-flops", "negative-params", "1e308", "1e30", "no-name", "empty-name", "long-name", "img-size",
        "by-kind-list", "measured-type", "extra-key"])
def test_wrong_types_and_absurd_numbers_are_refused(good_rows, tmp_path, change, says):
    rows = copy.deepcopy(good_rows)
    change(rows[0])
    line = _merge_error(_write(tmp_path / "bad.json", rows))
    assert "bad.json is not a 'vitlab compare --format json' output" in line and says in line, line


@pytest.mark.parametrize("text, says", [
    ('[{"name": "x", "flops": NaN}]', "NaN"),
    ('[{"name": "x", "flops": Infinity}]', "Infinity"),
    ('[{"name": "x", "name": "y"}]', "appears twice"),
    ('{"name": "x"}', "non-empty list"),
    ("[]", "non-empty list"),
    ("[1, 2]", "[0]"),
    ("not json", "invalid JSON"),
    ("[" * 100_000 + "]" * 100_000, f"nested deeper than {MAX_SHARD_NESTING}"),
    ('[{"name": 1' + "0" * 5000 + "}]", "digits"),
], ids=["nan", "infinity", "repeated-key", "object", "empty", "not-objects", "not-json", "deep", "long-int"])
def test_bad_json_is_refused(tmp_path, text, says):
    line = _merge_error(_write(tmp_path / "bad.json", text))
    assert "bad.json" in line and says in line, line


def test_a_shard_over_the_size_limit_is_refused_before_reading(tmp_path):
    big = tmp_path / "big.json"
    with open(big, "wb") as fh:
        fh.truncate(MAX_SHARD_BYTES + 1)  # sparse: costs nothing to make, would cost a lot to parse
    assert "at most" in _merge_error(big)


@pytest.mark.parametrize("special", ["fifo", "/dev/zero"])
def test_special_files_are_refused_without_blocking(tmp_path, special):
    path = special
    if special == "fifo":
        path = tmp_path / "part.json"
        os.mkfifo(path)
    result = {}
    worker = threading.Thread(target=lambda: result.update(line=_merge_error(path)), daemon=True)
    worker.start()
    worker.join(30)
    assert not worker.is_alive(), "blocked on a special file"
    assert "not a regular file" in result["line"]


def test_a_variant_given_twice_with_different_results_names_both_files(good_rows, tmp_path):
    other = copy.deepcopy(good_rows)
    other[0]["flops"] += 1
    a, b = _write(tmp_path / "a.json", good_rows), _write(tmp_path / "b.json", other)
    line = _merge_error(a, b)
    assert "a.json" in line and "b.json" in line and "different results" in line


@pytest.mark.parametrize("field, value, says", [("batch_size", 2, "batch size"), ("dtype", "bf16", "dtype"),
                                                ("img_size", [64, 64], "image size"), ("method", "full", "method")])
def test_shards_of_different_settings_are_refused(good_rows, tmp_path, field, value, says):
    other = copy.deepcopy(good_rows[1:])
    for r in other:
        r[field] = value
    line = _merge_error(_write(tmp_path / "a.json", good_rows[:1]), _write(tmp_path / "b.json", other))
    assert "a.json" in line and "b.json" in line and says in line and "different settings" in line


def test_a_long_name_is_capped_in_the_table(good_rows, tmp_path):
    rows = copy.deepcopy(good_rows)
    rows[0]["name"] = "n" * 1000
    res = invoke_cli("compare", "--merge", _write(tmp_path / "a.json", rows), "--format", "md")
    assert res.exit_code == 0, res.output
    assert "n" * 199 + "…" in res.stdout and "n" * 201 not in res.stdout


def test_read_shard_is_usable_from_python(good_rows, tmp_path):
    assert read_shard(_write(tmp_path / "a.json", good_rows))[0].flops == good_rows[0]["flops"]
    with pytest.raises(VitlabError, match="a.json"):
        read_shard(_write(tmp_path / "a.json", "[]"))


# --- --shard: each shard validates its own variants and the baseline only -----------------------------

def test_a_shard_of_a_huge_sweep_validates_only_its_own_variants(monkeypatch):
    """316 x 317 = 100,172 variants in 100,172 shards: a shard loads the baseline and its one variant
    (and each recipe once, for names), not the whole sweep."""
    import vitlab.analysis.compare as compare
    import vitlab.recipes

    calls = []
    real = vitlab.recipes.load_spec
    monkeypatch.setattr(vitlab.recipes, "load_spec", lambda *a, **k: calls.append(a) or real(*a, **k))
    sweeps = [compare.parse_sweep("mlp_ratio=" + ",".join(str(1 + i / 100) for i in range(316))),
              compare.parse_sweep("drop_rate=" + ",".join(str(i / 1000) for i in range(317)))]
    mine, base = compare.expand_shard([TINY], sweeps, ["depth=1"], 100_171, 100_172)
    assert [v.name for v in mine] == [f"{TINY}[mlp_ratio=4.15,drop_rate=0.316]"] and base.name.endswith("drop_rate=0.0]")
    assert len(calls) == 2
    calls.clear()
    mine, base = compare.expand_shard([TINY], sweeps, ["depth=1"], 7, 100_172,
                                      baseline=f"{TINY}[mlp_ratio=2.0,drop_rate=0.005]")
    assert base.spec.mlp_ratio == 2.0 and base.spec.drop_rate == 0.005 and len(calls) == 3  # + one for names


def test_sharded_expansion_is_the_whole_list_sliced():
    import vitlab.analysis.compare as compare

    sweeps = [compare.parse_sweep("mlp_ratio=2,3,4"), compare.parse_sweep("depth=1,2")]
    whole = compare.expand([TINY, "vit_small_patch16_224"], sweeps, ["img_size=32"])
    for count in (1, 2, 5, 13):
        for index in range(count):
            mine, base = compare.expand_shard([TINY, "vit_small_patch16_224"], sweeps, ["img_size=32"], index, count)
            assert [v.name for v in mine] == [v.name for v in whole[index::count]]
            assert base.name == whole[0].name


def test_an_unknown_baseline_in_a_shard_is_one_line():
    line = one_error(invoke_cli("compare", TINY, "--sweep", "depth=1,2", "--shard", "0/2", "--baseline", "nope",
                                "--format", "json"))
    assert "unknown baseline 'nope'" in line and "of the 2" in line
