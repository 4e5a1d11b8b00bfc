"""Suites: the shared prompt files load into typed records; bad lines are named; --limit keeps every tag;
the pinned download is checked against its sha256 (served by a local HTTP server)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import pytest

from tests.evaluation.servers import serve_files
from tests.support.benchmarks import shared_benchmarks_dir
from worker.evaluation.suites import (
    GENEVAL_PP_TAGS,
    IMAGINE_CATEGORIES,
    SOURCES,
    SuiteFileError,
    fetch_suite_file,
    limit_per_group,
    load_suite,
)

SHARED = shared_benchmarks_dir()
FILES = {"geneval_pp": SHARED / "geneval_plus_plus.jsonl", "imagine": SHARED / "imagine_bench.jsonl",
         "geneval": SHARED / "geneval_evaluation_metadata.jsonl"}


def test_geneval_pp_has_seven_tags_of_forty_and_is_the_pinned_file():
    records, source = load_suite("geneval_pp", FILES["geneval_pp"])
    assert len(records) == 280
    assert Counter(r.tag for r in records) == {tag: 40 for tag in GENEVAL_PP_TAGS}
    assert source.matches_pinned is True
    first = records[0]
    assert (first.id, first.line, first.category) == ("0001", 1, "color_attr")
    assert first.prompt == "A photo of a brown bus, a green truck, and a red skateboard"
    assert [o["class"] for o in first.include] == ["bus", "truck", "skateboard"]
    counting = next(r for r in records if r.tag == "counting")
    assert counting.exclude == ({"class": "clock", "count": 7},)


def test_imagine_maps_types_to_categories():
    records, source = load_suite("imagine", FILES["imagine"])
    assert len(records) == 270 and source.matches_pinned is True
    assert Counter(r.category for r in records) == {"Attribute shift": 90, "Hybridization": 60,
                                                     "Spatiotemporal": 60, "Multi-Object": 60}
    first = records[0]
    assert (first.tag, first.category) == ("COLOR", "Attribute shift")
    assert first.note.startswith("The fantasy element required")
    assert set(IMAGINE_CATEGORIES) == {r.tag for r in records}


def test_geneval_has_553_prompts():
    records, source = load_suite("geneval", FILES["geneval"])
    assert len(records) == 553 and source.matches_pinned is True
    assert Counter(r.tag for r in records)["position"] == 100


def test_limit_takes_the_first_n_of_each_tag_in_file_order():
    records, _ = load_suite("imagine", FILES["imagine"])
    subset = limit_per_group(records, 2)
    assert len(subset) == 16  # 8 types x 2
    assert [r.id for r in subset[:4]] == ["0001", "0002", "0031", "0032"]
    assert limit_per_group(records, None) == records
    with pytest.raises(ValueError, match="positive integer"):
        limit_per_group(records, 0)


def test_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"tag": "color_attr", "include": [{"class": "cat", "count": 1}], "prompt": "a cat"}\n'
                   '\n'
                   '{"tag": "color_attr", "include": [{"class": "cat", "count": 0}], "prompt": "a cat"}\n')
    with pytest.raises(SuiteFileError, match=r"p\.jsonl:3: include\[0\]\.count must be a positive integer"):
        load_suite("geneval_pp", bad)
    bad.write_text('{"tag": "nope", "include": [{"class": "cat"}], "prompt": "a cat"}\n')
    with pytest.raises(SuiteFileError, match=r"p\.jsonl:1: unknown geneval_pp tag 'nope'"):
        load_suite("geneval_pp", bad)
    bad.write_text('{"instruction": "x", "note": "y", "type": "COLOUR"}\n')
    with pytest.raises(SuiteFileError, match=r"p\.jsonl:1: unknown Imagine-Bench type 'COLOUR'"):
        load_suite("imagine", bad)
    bad.write_text("not json\n")
    with pytest.raises(SuiteFileError, match=r"p\.jsonl:1: not valid JSON"):
        load_suite("custom", bad)


def test_custom_ids_references_and_checks(tmp_path):
    (tmp_path / "refs").mkdir()
    (tmp_path / "refs" / "a.png").write_bytes(b"png")
    good = tmp_path / "mine.jsonl"
    good.write_text(json.dumps({"id": "cat-1", "prompt": "a cat", "reference_images": ["refs/a.png"]}) + "\n"
                    + json.dumps({"prompt": "two dogs", "tag": "dogs", "include": [{"class": "dog", "count": 2}]})
                    + "\n")
    records, source = load_suite("custom", good)
    assert [r.id for r in records] == ["cat-1", "0002"]
    assert records[0].reference_images == (str((tmp_path / "refs" / "a.png").resolve()),)
    assert records[1].tag == "dogs" and records[1].include[0]["count"] == 2
    assert source.matches_pinned is None
    good.write_text(json.dumps({"prompt": "a cat", "reference_images": ["missing.png"]}) + "\n")
    with pytest.raises(SuiteFileError, match=r"mine\.jsonl:1: reference image 'missing.png' not found"):
        load_suite("custom", good)
    good.write_text(json.dumps({"id": "../x", "prompt": "a cat"}) + "\n")
    with pytest.raises(SuiteFileError, match="id must be"):
        load_suite("custom", good)
    good.write_text(json.dumps({"id": "a", "prompt": "p"}) + "\n" + json.dumps({"id": "a", "prompt": "q"}) + "\n")
    with pytest.raises(SuiteFileError, match="duplicate prompt ids"):
        load_suite("custom", good)


def test_download_checks_the_pinned_sha256(tmp_path):
    source = SOURCES["geneval_pp"]
    body = FILES["geneval_pp"].read_bytes()
    assert hashlib.sha256(body).hexdigest() == source.sha256
    path = f"/{source.repo}/{source.revision}/test_scripts/Geneval%2B%2B.jsonl"
    with serve_files({path: body}) as (base_url, hits):
        got = fetch_suite_file("geneval_pp", tmp_path / "cache", base_url=base_url)
        assert got.read_bytes() == body
        again = fetch_suite_file("geneval_pp", tmp_path / "cache", base_url=base_url)
        assert again == got and hits == [path]  # the cached, verified file is not downloaded again
        records, info = load_suite("geneval_pp", cache_dir=tmp_path / "cache", base_url=base_url)
        assert len(records) == 280 and info.matches_pinned

    with serve_files({path: body + b"\n"}) as (base_url, _):
        with pytest.raises(SuiteFileError, match="not the pinned"):
            fetch_suite_file("geneval_pp", tmp_path / "other", base_url=base_url)
    assert not (tmp_path / "other" / "geneval_pp" / "Geneval++.jsonl").exists()
    assert source.url == ("https://raw.githubusercontent.com/yejy53/Echo-4o/"
                          "28f36d76558e5f53b9deceda78bf025ef0d0ea24/test_scripts/Geneval%2B%2B.jsonl")
