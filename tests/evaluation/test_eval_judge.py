"""The chat-completions judge against a local server: retries on malformed replies, 429 and 5xx; immediate failure
on a refused key; the verdict cache (per image, prompt, judge model and protocol version); concurrency; rate limit."""

from __future__ import annotations

import io
from dataclasses import replace

import pytest
from PIL import Image

from tests.evaluation.servers import judge_server
from worker.evaluation.judge import Judge, JudgeConfig, RateLimiter, VerdictCache
from worker.evaluation.protocols import CHECKLIST, IMAGINE
from worker.evaluation.suites import PromptRecord

ONE_CAT = PromptRecord(id="0001", suite="geneval_pp", tag="t", category="t", prompt="a red cat", line=1,
                       include=({"class": "cat", "count": 1, "color": "red"},))
TWO_CATS = replace(ONE_CAT, id="0002", prompt="two cats", include=({"class": "cat", "count": 2},))
MONKEY = PromptRecord(id="0001", suite="imagine", tag="COLOR", category="Attribute shift",
                      prompt="A blue monkey", line=1, note="the fur is blue")


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (value, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def _config(url: str, **kw) -> JudgeConfig:
    return JudgeConfig(base_url=url, model="judge-test", retry_wait_s=0, **kw)


def test_malformed_first_reply_is_retried_then_parsed(tmp_path):
    with judge_server(malformed_first=True, imagine_scores={"A blue monkey": (8, 6, 9)}) as (url, log):
        with Judge(_config(url), VerdictCache(tmp_path / "v.sqlite")) as judge:
            good = judge.judge(ONE_CAT, _png(1), CHECKLIST)
            bad = judge.judge(TWO_CATS, _png(2), CHECKLIST)
            monkey = judge.judge(MONKEY, _png(3), IMAGINE)
    assert (good.status, good.attempts, good.verdict["correct"]) == ("ok", 2, True)
    assert good.verdict["reason"] == "exactly one red cat"
    assert (bad.status, bad.verdict["correct"]) == ("ok", False)
    assert (monkey.verdict["ff"], monkey.verdict["ip"], monkey.verdict["aq"]) == (8, 6, 9)
    assert len(log.requests) == 6 and all(r["model"] == "judge-test" for r in log.requests)


def test_malformed_until_attempts_run_out_is_a_recorded_failure(tmp_path):
    cache = VerdictCache(tmp_path / "v.sqlite")
    with judge_server(malformed_first=True) as (url, log):
        with Judge(_config(url, max_attempts=1), cache) as judge:
            verdict = judge.judge(ONE_CAT, _png(1), CHECKLIST)
    assert verdict.status == "failed" and verdict.verdict is None
    assert "malformed reply: no JSON object" in verdict.error and "after 1 attempts" in verdict.error
    assert verdict.raw == "I believe the image is fine."
    assert len(cache) == 0  # failures are not cached: a later run asks again


def test_429_and_500_are_retried(tmp_path):
    with judge_server(statuses=[429, 500, 503]) as (url, log):
        with Judge(_config(url, max_attempts=4)) as judge:
            verdict = judge.judge(ONE_CAT, _png(1), CHECKLIST)
        assert verdict.status == "ok" and verdict.attempts == 4
        assert [r["status"] for r in log.requests] == [429, 500, 503, 200]
    with judge_server(statuses=[500, 500]) as (url, log):
        with Judge(_config(url, max_attempts=2)) as judge:
            verdict = judge.judge(ONE_CAT, _png(1), CHECKLIST)
    assert verdict.status == "failed" and "judge HTTP 500" in verdict.error


def test_refused_key_fails_at_once_naming_the_key(tmp_path):
    with judge_server(api_key="sk-right") as (url, log):
        with Judge(_config(url, api_key="sk-wrong")) as judge:
            verdict = judge.judge(ONE_CAT, _png(1), CHECKLIST)
        assert verdict.status == "failed" and verdict.attempts == 1
        assert "judge HTTP 401: Incorrect API key provided (check the judge API key)" == verdict.error
        with Judge(_config(url, api_key="sk-right")) as judge:
            assert judge.judge(ONE_CAT, _png(1), CHECKLIST).status == "ok"


def test_cache_is_keyed_by_image_prompt_model_and_protocol(tmp_path):
    path = tmp_path / "v.sqlite"
    with judge_server() as (url, log):
        with Judge(_config(url), VerdictCache(path)) as judge:
            first = judge.judge(ONE_CAT, _png(1), CHECKLIST)
            again = judge.judge(ONE_CAT, _png(1), CHECKLIST)
            assert not first.cached and again.cached and again.verdict == first.verdict
            assert len(log.requests) == 1
            judge.judge(ONE_CAT, _png(2), CHECKLIST)  # another image
            judge.judge(replace(ONE_CAT, prompt="a red cat, again"), _png(1), CHECKLIST)  # another prompt
            judge.judge(ONE_CAT, _png(1), replace(CHECKLIST, version="2"))  # reworded protocol
            assert len(log.requests) == 4
        with Judge(_config(url), VerdictCache(path)) as judge:  # the file persists across runs
            assert judge.judge(ONE_CAT, _png(1), CHECKLIST).cached
        with Judge(JudgeConfig(base_url=url, model="other-judge", retry_wait_s=0), VerdictCache(path)) as judge:
            assert not judge.judge(ONE_CAT, _png(1), CHECKLIST).cached
        assert len(log.requests) == 5


def test_requests_run_concurrently_up_to_the_limit():
    items = [(ONE_CAT, _png(i), CHECKLIST) for i in range(6)]
    done = []
    with judge_server(meet=2) as (url, log):
        with Judge(_config(url, max_concurrency=2)) as judge:
            verdicts = judge.judge_many(items, on_done=lambda i, v: done.append(i))
    assert all(v.status == "ok" and v.attempts == 1 for v in verdicts)
    assert sorted(done) == list(range(6))
    assert log.max_in_flight == 2  # two met at the barrier; never more than the limit


def test_rate_limiter_spaces_request_starts():
    now = [100.0]
    slept = []

    def sleep(s):
        slept.append(s)
        now[0] += s

    limiter = RateLimiter(30, clock=lambda: now[0], sleep=sleep)  # one start every 2 s
    for _ in range(3):
        limiter.acquire()
    assert slept == [2.0, 2.0]
    now[0] += 10  # idle time is not banked beyond one interval
    limiter.acquire()
    assert slept == [2.0, 2.0]
    RateLimiter(None, clock=lambda: 0.0, sleep=lambda s: pytest.fail("no limit must never sleep")).acquire()


def test_config_refuses_a_url_without_scheme():
    with pytest.raises(ValueError, match="must start with http"):
        JudgeConfig(base_url="localhost:8000/v1", model="m")
