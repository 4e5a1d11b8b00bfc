"""The tiny Qwen2-format tokenizer and the loader shared with real Qwen2.5 tokenizer files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from worker.engine.tokenizer import QWEN25_ADDED_TOKENS, build_tiny_tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def tiny_tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    build_tiny_tokenizer(out, vocab_size=1024)
    return out


def test_files_are_qwen2_format(tiny_tok_dir: Path):
    assert sorted(p.name for p in tiny_tok_dir.iterdir()) == ["merges.txt", "tokenizer_config.json", "vocab.json"]
    vocab = json.loads((tiny_tok_dir / "vocab.json").read_text(encoding="utf-8"))
    cfg = json.loads((tiny_tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["tokenizer_class"] == "Qwen2Tokenizer"
    # the 22 added tokens follow the BPE ids, in Qwen2.5's order
    added = {int(k): v["content"] for k, v in cfg["added_tokens_decoder"].items()}
    assert added == {len(vocab) + i: c for i, (c, _) in enumerate(QWEN25_ADDED_TOKENS)}
    assert len(vocab) + len(added) <= 1024
    assert (tiny_tok_dir / "merges.txt").read_text(encoding="utf-8").count("\n") > 100


def test_load_gives_reference_special_ids(tiny_tok_dir: Path):
    tok, ids = load_tokenizer(tiny_tok_dir)
    n_bpe = len(json.loads((tiny_tok_dir / "vocab.json").read_text(encoding="utf-8")))
    # Qwen2.5 order: <|endoftext|> +0, <|im_start|> +1, <|im_end|> +2, <|vision_start|> +9, <|vision_end|> +10
    assert ids == {
        "bos_token_id": n_bpe + 1,
        "eos_token_id": n_bpe + 2,
        "start_of_image": n_bpe + 9,
        "end_of_image": n_bpe + 10,
    }
    assert len(tok) == n_bpe + len(QWEN25_ADDED_TOKENS)


def test_encode_decode_round_trip_and_specials_are_single_tokens(tiny_tok_dir: Path):
    tok, ids = load_tokenizer(tiny_tok_dir)
    for text in ["a red panda on a bed", "Ünïcode, 一只 and digits 2025!", "  two  spaces\nnew line"]:
        enc = tok.encode(text)
        assert enc and all(0 <= i < len(tok) for i in enc)
        assert tok.decode(enc) == text
    # no BOS is added, as Qwen2 (the reference wraps text in <|im_start|> ... <|im_end|> itself)
    assert tok.encode("panda") == tok.encode("panda", add_special_tokens=False)
    assert tok.encode("<|im_start|>panda<|im_end|>") == [ids["bos_token_id"], *tok.encode("panda"),
                                                         ids["eos_token_id"]]
    # digits are split one by one, as Qwen2's pre-tokenizer does
    assert len(tok.encode("12345")) == 5


def test_build_is_deterministic(tiny_tok_dir: Path, tmp_path: Path):
    build_tiny_tokenizer(tmp_path, vocab_size=1024)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (tiny_tok_dir / name).read_bytes()


def test_smaller_vocab(tmp_path: Path):
    build_tiny_tokenizer(tmp_path, vocab_size=400)
    tok, ids = load_tokenizer(tmp_path)
    assert len(tok) <= 400
    assert max(ids.values()) < len(tok)
    with pytest.raises(ValueError, match="vocab_size"):
        build_tiny_tokenizer(tmp_path / "x", vocab_size=100)


def test_missing_context_tokens_are_added_as_the_reference_does(tiny_tok_dir: Path, tmp_path: Path):
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((tiny_tok_dir / name).read_bytes())
    cfg = json.loads((tiny_tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    keep = {k: v for k, v in cfg["added_tokens_decoder"].items() if v["content"] == "<|endoftext|>"}
    cfg["added_tokens_decoder"] = keep
    cfg["additional_special_tokens"] = []
    cfg["eos_token"] = "<|endoftext|>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    tok, ids = load_tokenizer(tmp_path)
    assert len(set(ids.values())) == 4
    assert tok.convert_ids_to_tokens(ids["start_of_image"]) == "<|vision_start|>"
    assert tok.encode("<|vision_start|>") == [ids["start_of_image"]]


def test_missing_files_are_named(tiny_tok_dir: Path, tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "vocab.json").write_bytes((tiny_tok_dir / "vocab.json").read_bytes())
    with pytest.raises(FileNotFoundError, match="merges.txt, tokenizer_config.json") as err:
        load_tokenizer(tmp_path)
    assert "echo4o download" in str(err.value)


def test_corrupt_files_are_a_clear_error(tiny_tok_dir: Path, tmp_path: Path):
    for name in ("merges.txt", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tiny_tok_dir / name).read_bytes())
    (tmp_path / "vocab.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="corrupt"):
        load_tokenizer(tmp_path)


def test_tokenizer_json_alone_loads_the_same(tiny_tok_dir: Path, tmp_path: Path):
    """Hub folders often ship tokenizer.json; without vocab.json/merges.txt it must give the same ids."""
    tok, ids = load_tokenizer(tiny_tok_dir)
    tok.save_pretrained(tmp_path)
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).unlink(missing_ok=True)
    assert (tmp_path / "tokenizer.json").is_file()
    tok2, ids2 = load_tokenizer(tmp_path)
    assert ids2 == ids
    text = "a red panda, 2025 <|im_start|>x<|im_end|>"
    assert tok2.encode(text) == tok.encode(text)
