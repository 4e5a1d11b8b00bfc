"""Qwen2 tokenizer loading, and the small byte-level BPE tokenizer of the tiny test model.

``load_tokenizer(path) -> (tokenizer, special_ids)`` loads real Qwen2.5 tokenizer files (``vocab.json``,
``merges.txt``, ``tokenizer_config.json``, optionally ``tokenizer.json``) and the tiny one the same way, through
transformers' ``AutoTokenizer`` (``Qwen2Tokenizer``). As the reference ``add_special_tokens`` does, the four
tokens the context format needs are added when the files lack them. ``special_ids`` has the keys the
reference uses: ``bos_token_id`` (``<|im_start|>``), ``eos_token_id`` (``<|im_end|>``), ``start_of_image``
(``<|vision_start|>``), ``end_of_image`` (``<|vision_end|>``).

``build_tiny_tokenizer(out_dir, vocab_size)`` trains a byte-level BPE with ``tokenizers`` on a built-in text,
with Qwen2's pre-tokenizer (split regex + byte level, NFC), and saves it in Qwen2 format: ``vocab.json`` +
``merges.txt`` + ``tokenizer_config.json`` with Qwen2.5's 22 added tokens (``<|endoftext|>``, ``<|im_start|>``,
``<|im_end|>``, ..., ``<|vision_start|>``, ``<|vision_end|>``, ...) numbered right after the BPE vocabulary, as
in the real files. Training is deterministic: the same ``vocab_size`` gives the same files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from echo4o.logging import get_logger

log = get_logger(__name__)

# Qwen2's pre-tokenizer split (the same pattern as its tokenizer files and transformers' Qwen2Tokenizer)
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2.5's added tokens in id order after the BPE vocabulary: (content, special)
QWEN25_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
)

# special_ids key -> token
CONTEXT_TOKENS = {
    "bos_token_id": "<|im_start|>",
    "eos_token_id": "<|im_end|>",
    "start_of_image": "<|vision_start|>",
    "end_of_image": "<|vision_end|>",
}

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")

_TRAINING_TEXT = """\
A red panda sleeping on a wooden bed under a warm blanket, soft morning light through the window.
A photo of a cat wearing a tiny hat, sitting on a stack of old books in a quiet library.
An astronaut riding a horse across a desert at sunset, cinematic, highly detailed, 35mm film.
Put the dog from the first image on the sofa from the second image, keep the lighting natural.
Replace the background with a snowy mountain landscape and make the sky clear and blue.
A bowl of ramen with a soft boiled egg, green onions and chili oil, photographed from above.
Watercolor painting of a lighthouse on a rocky coast, waves crashing, seagulls in the distance.
The woman in the picture is holding a cup of coffee; add steam rising from the cup.
Two children flying a kite in a park full of cherry blossoms, spring afternoon, pastel colors.
A futuristic city at night with neon signs, rain on the streets, reflections, people with umbrellas.
Close-up portrait of an old fisherman with a grey beard, dramatic lighting, black and white.
Combine the shoes in image 1 with the dress in image 2 and show a model walking on a runway.
A small cabin in a pine forest, smoke from the chimney, a path covered with fresh snow.
Isometric illustration of a cozy bedroom with plants, a desk, a lamp and a sleeping cat.
A glass of orange juice on a kitchen table next to a plate of pancakes with berries and honey.
Make the car in the photo red, add a surfboard on its roof and place it by the beach.
An oil painting of a sailing ship in a storm, lightning in the dark clouds, rough sea.
A robot and a girl reading a book together under a big tree, storybook style, gentle colors.
Studio product photo of a white sneaker on a pastel pink background, soft shadows, 4k.
A bustling market in Marrakech with spices, lanterns, carpets and people bargaining.
The man from the first picture and the woman from the second picture shaking hands in an office.
Macro photo of a dewdrop on a green leaf reflecting the sun, shallow depth of field.
A vintage poster for a jazz festival with a saxophone player, bold typography, 1950s style.
Numbers and symbols: 1, 2, 3, 10, 42, 100, 2025, 3.14, 50%, $20, #1, @home, (a), [b], {c}.
Punctuation test: "quoted text", it's, we're, they've, I'm, you'll, she'd; what? yes! ok... -- end.
Multilingual: 一只在床上睡觉的小熊猫。Un chat sur une chaise. Ein Hund im Park. Un perro en la playa.
"""


def build_tiny_tokenizer(out_dir: Path, vocab_size: int = 1024) -> None:
    """Write a small Qwen2-format byte-level BPE tokenizer to ``out_dir`` (at most ``vocab_size`` tokens
    in all, the 22 added tokens included; ``len(load_tokenizer(out_dir)[0])`` tells the exact count)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    n_added = len(QWEN25_ADDED_TOKENS)
    if vocab_size < 256 + n_added + 1:
        raise ValueError(f"vocab_size must be at least {256 + n_added + 1} (256 bytes + {n_added} added tokens "
                         f"+ merges); got {vocab_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - n_added,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    lines = _TRAINING_TEXT.splitlines(keepends=True)
    tok.train_from_iterator(lines, trainer=trainer)
    tok.model.save(str(out_dir))  # vocab.json + merges.txt

    vocab = json.loads((out_dir / "vocab.json").read_text(encoding="utf-8"))
    if sorted(vocab.values()) != list(range(len(vocab))):  # pragma: no cover - a tokenizers change
        raise RuntimeError("trained BPE ids are not contiguous; cannot place the added tokens after them")
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(qwen2_tokenizer_config(len(vocab)), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    log.info("tiny tokenizer written", extra={"dir": str(out_dir), "bpe_tokens": len(vocab),
                                              "total_tokens": len(vocab) + n_added})


def qwen2_tokenizer_config(first_added_id: int) -> dict[str, Any]:
    """``tokenizer_config.json`` in Qwen2.5's form, its added tokens numbered from ``first_added_id``."""
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(first_added_id + i): {
                "content": content, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False, "special": special,
            }
            for i, (content, special) in enumerate(QWEN25_ADDED_TOKENS)
        },
        "additional_special_tokens": [c for c, s in QWEN25_ADDED_TOKENS if s and c != "<|endoftext|>"],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def load_tokenizer(path: str | Path) -> tuple[Any, dict[str, int]]:
    """``(tokenizer, special_ids)`` from a folder with Qwen2 tokenizer files (see the module doc)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer folder {path} does not exist: pass a model folder in the released "
                                "layout (echo4o download, or echo4o make-tiny DIR for a test model)")
    has_fast = (path / "tokenizer.json").is_file()
    missing = [name for name in TOKENIZER_FILES if not (path / name).is_file()]
    if missing and not (has_fast and "tokenizer_config.json" not in missing):
        raise FileNotFoundError(
            f"tokenizer files missing in {path}: {', '.join(missing)}. A model folder needs vocab.json, "
            "merges.txt and tokenizer_config.json (or tokenizer.json) from the released checkpoint: "
            "re-run `echo4o download`, or `echo4o make-tiny DIR` for a test model"
        )
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise ValueError(f"cannot load the tokenizer in {path} ({type(exc).__name__}: {exc}); its tokenizer files "
                         "are corrupt or not Qwen2's: re-run `echo4o download`") from exc

    vocab = tokenizer.get_vocab()
    new_tokens = [tok for tok in CONTEXT_TOKENS.values() if tok not in vocab]
    if new_tokens:
        # as the reference add_special_tokens: plain added tokens (the released files have all four)
        tokenizer.add_tokens(new_tokens)
        log.warning("tokenizer lacked context tokens; added", extra={"tokens": new_tokens, "dir": str(path)})
    special_ids = {key: int(tokenizer.convert_tokens_to_ids(tok)) for key, tok in CONTEXT_TOKENS.items()}
    return tokenizer, special_ids

