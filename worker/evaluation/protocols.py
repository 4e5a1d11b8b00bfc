"""Judge protocols: the messages a vision-language judge is sent, and strict parsers of its replies.

GenEval++ (``checklist``): the judge sees the instruction, a checklist written from the prompt's ``include`` (and
``exclude``) objects, and the image. It answers all-or-nothing: correct only when every object class, count,
colour, position and size is right and the image is one coherent photo-like scene (no collage, no panels, no
cartoon). Reply: one JSON object ``{"correct": 0 or 1, "reason": "..."}``.

Imagine-Bench (``imagine``): the judge sees the instruction, its explanation (``note``) and the image, and scores
Fantasy Fulfillment, Identity Preservation and Aesthetic Quality from 0 to 10. Reply: the three lines
``Fantasy Fulfillment: N``, ``Identity Preservation: N``, ``Aesthetic Quality: N``, each followed by a
``Reason: ...`` line.

Both follow the protocols published with Echo-4o (arXiv 2508.09987); the wording is ours. A reply that does not
follow the format raises :class:`MalformedReply`; the judge client retries it and, when retries run out, records a
failure: it is never read as a score. ``version`` names the wording, so a changed prompt never reuses cached
verdicts of the old one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from worker.evaluation.suites import PromptRecord


class MalformedReply(ValueError):
    """The judge's reply does not follow the protocol's format; the message says what is wrong."""


# ------------------------------------------------------------------------------------------------ checklist
_NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight",
                 9: "nine", 10: "ten"}
_REGIONS = {"left": "in the left part of the image", "right": "in the right part of the image",
            "above": "in the upper part of the image", "below": "in the lower part of the image",
            "top": "in the upper part of the image", "bottom": "in the lower part of the image"}

CHECKLIST_SYSTEM = """You judge whether a generated image satisfies an instruction exactly.

Check every item of the checklist against what is visible in the image:
- each object class is present, and with exactly the stated number of instances;
- each object has the stated colour;
- each object sits where stated, judged by its real position in the image's pixels (left, right, upper, lower);
- stated sizes hold relative to the other objects (a "larger" object looks larger than a "smaller" one).
The image must also be one coherent, natural, photo-like scene: a collage, a grid, several panels, a cartoon,
a sketch or an anime drawing fails.

This is all or nothing: one wrong or missing item makes the image incorrect. When in doubt, judge it incorrect.

Reply with one JSON object and nothing else:
{"correct": 1 or 0, "reason": "<what is right or what fails, briefly>"}"""


def _plural(name: str, count: int) -> str:
    if count == 1:
        return name
    if name.endswith(("ss", "sh", "ch", "x")) or name == "bus":
        return f"{name}es"
    return name if name.endswith("s") else f"{name}s"


def checklist_lines(include: tuple[dict[str, Any], ...], exclude: tuple[dict[str, Any], ...] = ()) -> list[str]:
    """The checklist, one line per object, written from GenEval-style ``include``/``exclude`` objects."""
    lines = []
    for obj in include:
        count = int(obj.get("count", 1))
        words = [_NUMBER_WORDS.get(count, str(count))]
        if obj.get("size"):
            words.append(str(obj["size"]))
        if obj.get("color"):
            words.append(str(obj["color"]))
        words.append(_plural(str(obj["class"]), count))
        line = f"exactly {' '.join(words)}"
        if obj.get("region"):
            line += " " + _REGIONS.get(str(obj["region"]), f"in the {obj['region']} part of the image")
        if obj.get("position"):  # GenEval style: ["left of", 0] relative to include[0]
            relation, anchor = obj["position"]
            line += f", {relation} the {include[int(anchor)]['class']}"
        lines.append(line)
    for obj in exclude:
        count = int(obj.get("count", 1))
        lines.append(f"no more than {count - 1} {_plural(str(obj['class']), count - 1)}")
    return lines


def checklist_user_text(record: PromptRecord) -> str:
    items = checklist_lines(record.include, record.exclude)
    if items:
        checklist = "\n".join(f"{i}. {line}" for i, line in enumerate(items, start=1))
    else:  # a custom prompt without a checklist: the instruction itself is the checklist
        checklist = "1. everything the instruction asks for, exactly as asked"
    return f"Instruction: {record.prompt}\n\nChecklist:\n{checklist}\n\nThe image follows."


_FENCE_RE = re.compile(r"^```(?:json)?\s*\n?(.*?)\n?```$", re.S)


def parse_checklist_reply(text: str) -> dict[str, Any]:
    """``{"correct": bool, "reason": str}`` from a reply holding exactly one JSON object with ``correct`` 0/1
    (or true/false) and a string ``reason``; a Markdown code fence around it is allowed."""
    body = (text or "").strip()
    fenced = _FENCE_RE.match(body)
    if fenced:
        body = fenced.group(1).strip()
    start, end = body.find("{"), body.rfind("}")
    if start < 0 or end < start:
        raise MalformedReply(f"no JSON object in the reply: {text[:120]!r}")
    try:
        obj = json.loads(body[start:end + 1])
    except json.JSONDecodeError as exc:
        raise MalformedReply(f"the reply's JSON does not parse ({exc.msg}): {text[:120]!r}") from None
    if not isinstance(obj, dict):
        raise MalformedReply(f"the reply's JSON is not an object: {text[:120]!r}")
    correct = obj.get("correct")
    if isinstance(correct, bool):
        correct = int(correct)
    if correct not in (0, 1) or isinstance(correct, float):
        raise MalformedReply(f"'correct' must be 0 or 1; got {obj.get('correct')!r}")
    reason = obj.get("reason")
    if not isinstance(reason, str):
        raise MalformedReply(f"'reason' must be a string; got {reason!r}")
    return {"correct": bool(correct), "reason": reason.strip()}


# ------------------------------------------------------------------------------------------------ imagine
IMAGINE_FIELDS = ("Fantasy Fulfillment", "Identity Preservation", "Aesthetic Quality")

IMAGINE_SYSTEM = """You are a demanding auditor of imaginative text-to-image results. Top scores are rare and
reserved for flawless images."""

IMAGINE_USER = """Score the image below on three criteria, each an integer from 0 to 10.

Fantasy Fulfillment: does the image carry out the imaginative change the instruction asks for?
0 = the change is absent or contradicted; 1-3 = misunderstood, or its key features missing or wrong;
4-6 = partly there, but vague, generic or misplaced; 7-9 = clearly there, small flaws in material, form or
how it blends in; 10 = exactly as intended, down to texture and shape.

Identity Preservation: is the original object (or person) still plainly recognisable, in realistic detail?
0 = unrecognisable; 1-3 = barely; 4-6 = partly, with many traits altered or stylised; 7-9 = well, small
issues; 10 = faithful in every major trait. A cartoon-like or symbolic rendering scores low here even when the
outline is right.

Aesthetic Quality: is the image clear, well composed and realistic?
0 = broken or unreadable; 1-3 = visible artefacts; 4-6 = acceptable with flaws; 7-9 = polished;
10 = excellent clarity, realism and balance.

Be strict: weak or confused fantasy lowers Fantasy Fulfillment; an unrecognisable or stylised object lowers
Identity Preservation; lost realism or appeal lowers Aesthetic Quality.

Answer in exactly this form, and nothing else:
Fantasy Fulfillment: <score>
Reason: <one sentence>
Identity Preservation: <score>
Reason: <one sentence>
Aesthetic Quality: <score>
Reason: <one sentence>

Instruction: {prompt}
What the instruction intends: {note}"""

_SCORE_RE = re.compile(r"^\W*(Fantasy Fulfillment|Identity Preservation|Aesthetic Quality)\W*\s*[:：]\s*\**\s*"
                       r"(\d+(?:\.\d+)?)\s*(?:/\s*10)?\W*$", re.I)
_REASON_RE = re.compile(r"^\W*Reason\W*\s*[:：]\s*(.*)$", re.I)


def parse_imagine_reply(text: str) -> dict[str, Any]:
    """The three 0-10 scores (keys ``ff``, ``ip``, ``aq``) and their reasons (``reasons``) from a reply with
    one ``<Criterion>: N`` line per criterion; a missing, repeated or out-of-range score is malformed."""
    scores: dict[str, float] = {}
    reasons: dict[str, str] = {}
    current = None
    for raw in (text or "").splitlines():
        line = raw.strip()
        if not line:
            continue
        m = _SCORE_RE.match(line)
        if m:
            name = next(f for f in IMAGINE_FIELDS if f.lower() == m.group(1).lower())
            if name in scores:
                raise MalformedReply(f"{name} is scored twice in the reply")
            value = float(m.group(2))
            if not 0 <= value <= 10:
                raise MalformedReply(f"{name} must be between 0 and 10; got {m.group(2)}")
            scores[name], current = value, name
            continue
        r = _REASON_RE.match(line)
        if r and current is not None and current not in reasons:
            reasons[current] = r.group(1).strip()
    missing = [f for f in IMAGINE_FIELDS if f not in scores]
    if missing:
        raise MalformedReply(f"no score for {', '.join(missing)} in the reply (expected lines like "
                             f"'Fantasy Fulfillment: 7'): {(text or '')[:120]!r}")
    ff, ip, aq = (scores[f] for f in IMAGINE_FIELDS)
    return {"ff": ff, "ip": ip, "aq": aq,
            "reason": " | ".join(f"{f}: {reasons[f]}" for f in IMAGINE_FIELDS if reasons.get(f)),
            "reasons": {f: reasons.get(f, "") for f in IMAGINE_FIELDS}}


# ------------------------------------------------------------------------------------------------ protocols
@dataclass(frozen=True)
class Protocol:
    """A judge protocol: its name and wording version (part of every cache key), how to build the chat messages
    for a record and an image, and how to parse the reply into a verdict dict."""

    name: str
    version: str
    max_tokens: int

    def messages(self, record: PromptRecord, image_url: str) -> list[dict[str, Any]]:
        if self.name == "checklist":
            system, text = CHECKLIST_SYSTEM, checklist_user_text(record)
        else:
            system, text = IMAGINE_SYSTEM, IMAGINE_USER.format(prompt=record.prompt, note=record.note or "")
        return [{"role": "system", "content": system},
                {"role": "user", "content": [{"type": "text", "text": text},
                                             {"type": "image_url", "image_url": {"url": image_url}}]}]

    def parse(self, text: str) -> dict[str, Any]:
        return parse_checklist_reply(text) if self.name == "checklist" else parse_imagine_reply(text)

    @property
    def key(self) -> str:
        return f"{self.name}/{self.version}"


CHECKLIST = Protocol("checklist", "1", max_tokens=300)
IMAGINE = Protocol("imagine", "1", max_tokens=600)


def protocol_for(record: PromptRecord) -> Protocol | None:
    """The judge protocol of a record: Imagine-style when it has a note, GenEval++-style otherwise; ``None`` for
    GenEval, which is scored by an object detector, not a judge."""
    if record.suite == "geneval":
        return None
    if record.suite == "imagine" or record.note:
        return IMAGINE
    return CHECKLIST
