"""Judge protocols: the checklist written from ``include``/``exclude``, and strict parsers of both reply formats."""

from __future__ import annotations

import pytest

from worker.evaluation.protocols import (
    CHECKLIST,
    IMAGINE,
    MalformedReply,
    checklist_lines,
    checklist_user_text,
    parse_checklist_reply,
    parse_imagine_reply,
    protocol_for,
)
from worker.evaluation.suites import PromptRecord


def _record(**kw) -> PromptRecord:
    base = {"id": "0001", "suite": "geneval_pp", "tag": "t", "category": "t", "prompt": "p", "line": 1}
    return PromptRecord(**{**base, **kw})


def test_checklist_states_every_attribute():
    include = ({"class": "bench", "count": 1, "size": "larger", "region": "above"},
               {"class": "clock", "count": 3, "color": "red", "region": "left"},
               {"class": "bus", "count": 2}, {"class": "skis", "count": 2}, {"class": "wine glass", "count": 4})
    assert checklist_lines(include, ({"class": "clock", "count": 7},)) == [
        "exactly one larger bench in the upper part of the image",
        "exactly three red clocks in the left part of the image",
        "exactly two buses",
        "exactly two skis",
        "exactly four wine glasses",
        "no more than 6 clocks",
    ]


def test_checklist_lines_plain():
    lines = checklist_lines(({"class": "cat", "count": 1, "color": "yellow"}, {"class": "dog", "count": 2}),
                            ({"class": "dog", "count": 3},))
    assert lines == ["exactly one yellow cat", "exactly two dogs", "no more than 2 dogs"]
    geneval = checklist_lines(({"class": "cup", "count": 1}, {"class": "fork", "count": 1,
                                                              "position": ["left of", 0]}))
    assert geneval == ["exactly one cup", "exactly one fork, left of the cup"]
    text = checklist_user_text(_record(prompt="a yellow cat", include=({"class": "cat", "count": 1},)))
    assert text.startswith("Instruction: a yellow cat\n\nChecklist:\n1. exactly one cat")


def test_messages_carry_the_image_and_the_note():
    rec = _record(suite="imagine", prompt="a blue monkey", note="the fur is blue")
    msgs = IMAGINE.messages(rec, "data:image/png;base64,AAAA")
    assert msgs[0]["role"] == "system"
    text, image = msgs[1]["content"]
    assert "Instruction: a blue monkey" in text["text"] and "the fur is blue" in text["text"]
    assert image == {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    assert protocol_for(rec) is IMAGINE
    assert protocol_for(_record()) is CHECKLIST
    assert protocol_for(_record(suite="geneval")) is None


@pytest.mark.parametrize("reply, correct, reason", [
    ('{"correct": 1, "reason": "all there"}', True, "all there"),
    ('```json\n{"correct": 0, "reason": "two cats, not one"}\n```', False, "two cats, not one"),
    ('Here you go: {"correct": true, "reason": "ok"}', True, "ok"),
])
def test_checklist_reply_parses(reply, correct, reason):
    assert parse_checklist_reply(reply) == {"correct": correct, "reason": reason}


@pytest.mark.parametrize("reply, problem", [
    ("The image is correct.", "no JSON object"),
    ('{"correct": 2, "reason": "x"}', "'correct' must be 0 or 1"),
    ('{"correct": 0.5, "reason": "x"}', "'correct' must be 0 or 1"),
    ('{"correct": 1}', "'reason' must be a string"),
    ('{"correct": 1, "reason": "x"', "no JSON object"),
    ('{"correct": 1, reason: x}', "does not parse"),
    ("", "no JSON object"),
])
def test_checklist_reply_malformed(reply, problem):
    with pytest.raises(MalformedReply, match=problem):
        parse_checklist_reply(reply)


def test_imagine_reply_parses_scores_and_reasons():
    reply = ("Fantasy Fulfillment: 8\nReason: the fur is ocean blue.\n\n"
             "**Identity Preservation:** 6/10\nReason: the face is smoothed.\n"
             "Aesthetic Quality: 9.5\nReason: crisp.")
    got = parse_imagine_reply(reply)
    assert (got["ff"], got["ip"], got["aq"]) == (8.0, 6.0, 9.5)
    assert got["reasons"]["Identity Preservation"] == "the face is smoothed."
    assert got["reason"].startswith("Fantasy Fulfillment: the fur is ocean blue.")


@pytest.mark.parametrize("reply, problem", [
    ("Fantasy Fulfillment: 8\nIdentity Preservation: 7", "no score for Aesthetic Quality"),
    ("Fantasy Fulfillment: 11\nIdentity Preservation: 7\nAesthetic Quality: 7", "between 0 and 10"),
    ("Fantasy Fulfillment: 8\nFantasy Fulfillment: 7\nIdentity Preservation: 7\nAesthetic Quality: 7",
     "scored twice"),
    ("Fantasy Fulfillment: high\nIdentity Preservation: 7\nAesthetic Quality: 7", "no score for Fantasy"),
    ('{"correct": 1, "reason": "x"}', "no score for"),
])
def test_imagine_reply_malformed(reply, problem):
    with pytest.raises(MalformedReply, match=problem):
        parse_imagine_reply(reply)
