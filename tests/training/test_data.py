from __future__ import annotations

import pytest

from worker.training.data import (
    ECHO4O_SHARDS,
    MULTI_REFERENCE,
    TEXT_TO_IMAGE,
    DataError,
    TrainingData,
    detect_layout,
    encode_image,
    synthetic_image,
    write_parquet,
    write_test_dataset,
)


def test_text_to_image_rows_give_the_image_and_one_of_its_captions(tmp_path):
    write_test_dataset(tmp_path, TEXT_TO_IMAGE, num_rows=3)
    samples = list(TrainingData(tmp_path, repeat=False))
    assert len(samples) == 3
    assert samples[0].references == [] and samples[0].target.size == (32, 32)
    assert samples[0].text in ("a red square on a blue gradient", "a red square on a blue gradient, detailed")
    assert samples[1].target.tobytes() == synthetic_image(1, 32).tobytes()


def test_multi_reference_rows_split_references_and_target(tmp_path):
    write_test_dataset(tmp_path, MULTI_REFERENCE, num_rows=2, num_references=2)
    sample = next(iter(TrainingData(tmp_path, repeat=False)))
    assert len(sample.references) == 2
    assert sample.references[0].tobytes() == synthetic_image(0, 32).tobytes()
    assert sample.target.tobytes() == synthetic_image(2, 32).tobytes()
    assert sample.text == "combine the images: a red square on a blue gradient"


def test_echo4o_shards_read_keys_references_and_side_records(tmp_path):
    write_test_dataset(tmp_path, ECHO4O_SHARDS, num_rows=2, num_references=2, bad_rows=1)
    data = TrainingData(tmp_path, repeat=False)
    samples = list(data)
    assert [len(s.references) for s in samples] == [2, 2]
    assert samples[1].text == "combine: a cat wearing a tiny hat"
    assert samples[0].source.endswith("0-5000.tar.gz#00000")
    assert data.counts.to_dict() == {"seen": 3, "used": 2, "skipped": 1, "reasons": {"bad_image": 1}}


def test_corrupt_rows_are_skipped_and_counted(tmp_path):
    write_test_dataset(tmp_path, TEXT_TO_IMAGE, num_rows=2, bad_rows=2)
    data = TrainingData(tmp_path, repeat=False)
    assert len(list(data)) == 2
    assert data.counts.skipped == 2 and data.counts.reasons["bad_image"] == 2


def test_bad_caption_json_and_short_image_lists_are_counted(tmp_path):
    img = encode_image(synthetic_image(0))
    write_parquet(tmp_path / "a.parquet", [{"image": img, "captions": "{not json"},
                                           {"image": img, "captions": {"k": "fine"}}], TEXT_TO_IMAGE)
    write_parquet(tmp_path / "b.parquet", [{"image_list": [img], "instruction_list": ["x"]}], MULTI_REFERENCE)
    data = TrainingData(tmp_path, repeat=False)
    assert [s.text for s in data] == ["fine"]
    assert dict(data.counts.reasons) == {"bad_captions": 1, "too_few_images": 1}


def test_missing_columns_name_the_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"picture": [b"x"], "text": ["y"]}), tmp_path / "x.parquet")
    with pytest.raises(DataError, match=r"columns \['picture', 'text'\].*image', 'captions'"):
        list(TrainingData(tmp_path, repeat=False))
    with pytest.raises(DataError, match="multi-reference file"):
        detect_layout(["image_list"], "f")


def test_a_source_with_no_usable_row_is_an_error(tmp_path):
    write_test_dataset(tmp_path, TEXT_TO_IMAGE, num_rows=0, bad_rows=2)
    with pytest.raises(DataError, match=r"no usable row.*2 rows read.*bad_image"):
        list(TrainingData(tmp_path, repeat=False))


def test_an_empty_folder_or_missing_path_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no data files"):
        TrainingData(tmp_path)
    with pytest.raises(DataError, match="neither an existing file"):
        TrainingData(tmp_path / "nope" / "deeper")


def test_repeat_streams_again_in_the_same_order(tmp_path):
    write_test_dataset(tmp_path, TEXT_TO_IMAGE, num_rows=2)
    it = iter(TrainingData(tmp_path, repeat=True))
    sources = [next(it).source for _ in range(5)]
    assert sources[:2] == sources[2:4] and sources[4] == sources[0]
