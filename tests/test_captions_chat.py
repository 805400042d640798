"""The chat captioner against a real local chat-completions server (tests/_chat_server.py): the protocol it
speaks, replies that become schemas or clear failures, retries (exact waits), timeouts, a server that is down,
the content-hash cache and bounded concurrency."""
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _chat_server import GOOD, ChatServer, Reply, closed_port_url

from sora_fast.captions import CaptionSchema
from sora_fast.captions.chat import MAX_RETRY_AFTER, ChatCaptioner, ChatClient, ChatError, frame_indices
from sora_fast.data.io import write_video

MSG = [{"role": "user", "content": "hi"}]


def _clip(path: Path, frames: int, h: int = 32, w: int = 48) -> Path:
    """A random clip (mp4) or image (png) of ``frames`` frames; fresh pixels each call."""
    video = np.random.default_rng().integers(0, 256, (frames, h, w, 3), dtype=np.uint8)
    return write_video(path, video, fps=8)


def _captioner(srv_or_url, tmp_path=None, **kw) -> ChatCaptioner:
    url = srv_or_url if isinstance(srv_or_url, str) else srv_or_url.base_url
    kw.setdefault("backoff", 0.01)
    if tmp_path is None:
        kw.setdefault("cache", False)
    else:
        kw.setdefault("cache_dir", tmp_path / "cache")
    return ChatCaptioner(url, "test-vlm", **kw)


def _recorded_sleeps(client: ChatClient) -> list:
    sleeps = []
    client._sleep = sleeps.append   # the waits are checked exactly, not slept
    return sleeps


@pytest.fixture
def srv():
    with ChatServer() as s:
        yield s


# --- the protocol -------------------------------------------------------------------------------------------
def test_a_good_reply_becomes_the_schema_and_the_request_speaks_the_protocol(srv, tmp_path, monkeypatch):
    monkeypatch.setenv("SF_TEST_CHAT_KEY", "sekrit")
    clip = _clip(tmp_path / "clip.mp4", 13)
    cap = _captioner(srv, api_key_env="SF_TEST_CHAT_KEY", every_n=4, max_frames=8, max_side=24)
    (res,) = cap.caption_files([clip])
    assert res.ok and res.error is None and not res.cached, res.error
    assert res.schema == CaptionSchema.from_json(GOOD) and res.frames == [0, 4, 8, 12]
    assert res.schema.render() == "a red circle moving left slowly"

    (req,) = srv.requests
    assert req.path == "/v1/chat/completions"
    assert req.headers["authorization"] == "Bearer sekrit"
    b = req.body
    assert b["model"] == "test-vlm" and b["temperature"] == 0
    assert b["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "caption_schema", "schema": CaptionSchema.json_schema(), "strict": True}}
    system, user = b["messages"]
    assert system["role"] == "system" and '"spans"' in system["content"] and "frame" in system["content"]
    urls = req.image_urls
    assert len(urls) == 4 and all(u.startswith("data:image/jpeg;base64,") for u in urls)
    assert [im.size for im in req.images()] == [(24, 16)] * 4     # 48x32 -> longest side 24
    texts = [p["text"] for p in user["content"] if p["type"] == "text"]
    assert "A clip of 13 frames" in texts[0] and "0, 4, 8, 12" in texts[0]
    assert texts[1:] == ["Frame 0:", "Frame 4:", "Frame 8:", "Frame 12:"]   # each image labelled in order


def test_an_unset_key_variable_sends_a_placeholder_and_images_are_one_frame(srv, tmp_path, monkeypatch):
    monkeypatch.delenv("SF_TEST_CHAT_KEY", raising=False)
    img = _clip(tmp_path / "still.png", 1, 17, 7)
    (res,) = _captioner(srv, api_key_env="SF_TEST_CHAT_KEY", max_side=512).caption_files([img])
    assert res.ok and res.frames == [0]
    (req,) = srv.requests
    assert req.headers["authorization"] == "Bearer EMPTY"
    assert [im.size for im in req.images()] == [(7, 17)]          # never upscaled
    assert "An image" in req.body["messages"][1]["content"][0]["text"]


@pytest.mark.parametrize("n, every_n, max_frames, expected", [
    (1, 4, 8, [0]), (13, 4, 8, [0, 4, 8, 12]), (17, 4, 5, [0, 4, 8, 12, 16]), (17, 4, 3, [0, 8, 16]),
    (113, 1, 8, [0, 16, 32, 48, 64, 80, 96, 112]), (799, 7, 1, [0]), (5, 9, 8, [0]), (4, 1, 2, [0, 3]),
])
def test_frame_indices_step_then_spread_evenly_keeping_both_ends(n, every_n, max_frames, expected):
    got = frame_indices(n, every_n, max_frames)
    assert got == expected
    assert len(got) <= max_frames and all(i % every_n == 0 for i in got) and got == sorted(set(got))


def test_the_frames_sent_are_the_clips_frames_at_those_indices(srv, tmp_path):
    from sora_fast.data.video_decode import decode_frames

    levels = np.random.default_rng().permutation(np.arange(17) * 14 + 8)    # one flat grey level per frame
    clip = write_video(tmp_path / "levels.mp4", np.broadcast_to(levels[:, None, None, None], (17, 32, 48, 3))
                       .astype(np.uint8).copy(), fps=8)
    found, frames = decode_frames(str(clip), [0, 5, 16, 40])               # 40 is past the end: left out
    assert found == [0, 5, 16] and frames.shape == (3, 32, 48, 3) and frames.dtype == np.uint8
    assert np.abs(frames.reshape(3, -1).mean(1) - levels[found]).max() < 3
    (res,) = _captioner(srv, every_n=8, max_side=16).caption_files([clip])
    sent = [np.asarray(im.convert("L"), dtype=np.float64).mean() for im in srv.requests[0].images()]
    assert res.frames == [0, 8, 16] and np.abs(np.array(sent) - levels[[0, 8, 16]]).max() < 3


def test_max_frames_spreads_the_frames_sent_over_the_clip(srv, tmp_path):
    clip = _clip(tmp_path / "c.mp4", 17)
    (res,) = _captioner(srv, every_n=1, max_frames=3).caption_files([clip])
    assert res.frames == [0, 8, 16] and len(srv.requests[0].image_urls) == 3


# --- replies that are not captions -------------------------------------------------------------------------
def test_malformed_json_is_a_failed_outcome_after_one_repair_turn(srv, tmp_path):
    srv.push(Reply.text("Sure! Here is the caption: {spans"), Reply.text("still not json"))
    (res,) = _captioner(srv).caption_files([_clip(tmp_path / "a.png", 1)])
    assert not res.ok and res.schema is None and res.frames == [0]
    assert "not a valid caption, also after a repair turn" in res.error and "does not parse" in res.error
    assert "'still not json'" in res.error
    first, second = srv.requests
    fix = second.body["messages"]
    assert fix[:2] == first.body["messages"]                      # the same question, then the bad answer
    assert fix[2] == {"role": "assistant", "content": "Sure! Here is the caption: {spans"}
    assert fix[3]["role"] == "user" and "does not parse" in fix[3]["content"]


def test_a_schema_violation_names_the_field_and_a_repair_turn_can_fix_it(srv, tmp_path):
    bad = json.loads(json.dumps(GOOD))
    bad["spans"][0]["subjects"][0]["speed"] = "warp"
    img = _clip(tmp_path / "a.png", 1)
    srv.push(Reply.caption(bad), Reply.caption(bad))
    (res,) = _captioner(srv).caption_files([img])
    assert not res.ok and "speed must be one of" in res.error and "'warp'" in res.error, res.error

    srv.push(Reply.caption(bad))                                   # then the default good reply
    (res,) = _captioner(srv).caption_files([img])
    assert res.ok and len(srv.requests) == 4

    srv.push(Reply.caption(bad))
    (res,) = _captioner(srv, repair=False).caption_files([img])
    assert not res.ok and "repair" not in res.error and len(srv.requests) == 5


def test_a_span_past_the_clips_last_frame_is_invalid(srv, tmp_path):
    late = json.loads(json.dumps(GOOD))
    late["spans"][0]["end"] = 13
    srv.push(Reply.caption(late), Reply.caption(late))
    (res,) = _captioner(srv).caption_files([_clip(tmp_path / "c.mp4", 13)])
    assert not res.ok and "spans[0].end must be at most the clip's last frame 12, got 13" in res.error


# --- retries, timeouts, refusals, a server that is down -----------------------------------------------------
def test_5xx_is_retried_with_exponential_backoff_then_succeeds(srv):
    client = ChatClient(srv.base_url, "m", backoff=0.01, max_retries=4)
    sleeps = _recorded_sleeps(client)
    srv.push(Reply.error(500), Reply.error(503), Reply.error(502), Reply.text("fine"))
    assert client.complete(MSG) == "fine" and len(srv.requests) == 4
    assert len(sleeps) == 3
    for k, s in enumerate(sleeps):                                 # backoff * 2**k, jitter in [1, 1.25)
        assert 0.01 * 2 ** k <= s < 0.01 * 2 ** k * 1.25


def test_429_waits_exactly_what_retry_after_says_capped(srv):
    client = ChatClient(srv.base_url, "m", backoff=0.01)
    sleeps = _recorded_sleeps(client)
    srv.push(Reply.error(429, "slow down", retry_after="2"), Reply.error(429, retry_after="3600"),
             Reply(status=429, headers={"retry-after-ms": "250"}), Reply.text("ok"))
    assert client.complete(MSG) == "ok"
    assert sleeps == [2.0, MAX_RETRY_AFTER, 0.25]


def test_retries_run_out_with_the_last_status_and_message(srv):
    client = ChatClient(srv.base_url, "m", backoff=0.01, max_retries=2)
    _recorded_sleeps(client)
    srv.push(*[Reply.error(503, "model is loading")] * 3)
    with pytest.raises(ChatError, match=r"kept failing \(3 attempts.*HTTP 503: model is loading") as e:
        client.complete(MSG)
    assert srv.base_url + "/chat/completions" in str(e.value) and len(srv.requests) == 3


@pytest.mark.parametrize("status", [400, 401, 404, 422])
def test_other_4xx_fail_at_once_naming_url_status_and_message(srv, status):
    client = ChatClient(srv.base_url, "m", backoff=0.01)
    srv.push(Reply.error(status, "messages[1].content[2]: image_url is not supported by this model"))
    with pytest.raises(ChatError) as e:
        client.complete(MSG)
    msg = str(e.value)
    assert f"{srv.base_url}/chat/completions" in msg and f"HTTP {status}" in msg
    assert "image_url is not supported by this model" in msg and len(srv.requests) == 1


def test_a_timeout_is_retried_then_fails_with_a_clear_message(srv, tmp_path):
    srv.push(*[Reply.text("late", delay=5.0)] * 2)
    cap = _captioner(srv, timeout=0.25, max_retries=1)
    t0 = time.monotonic()
    (res,) = cap.caption_files([_clip(tmp_path / "a.png", 1)])
    assert time.monotonic() - t0 < 3.0
    assert not res.ok and len(srv.requests) == 2
    assert f"the chat server at {srv.base_url} did not answer" in res.error
    assert "no answer within 0.25 s; 2 attempts" in res.error, res.error


def test_a_server_that_is_down_names_its_url(tmp_path):
    url = closed_port_url()
    client = ChatClient(url, "m", backoff=0.01, max_retries=2)
    sleeps = _recorded_sleeps(client)
    with pytest.raises(ChatError, match="cannot reach the chat server at " + url.replace(".", r"\.")) as e:
        client.complete(MSG)
    assert "3 attempts" in str(e.value) and "is it running" in str(e.value) and len(sleeps) == 2
    (res,) = _captioner(url, max_retries=0).caption_files([_clip(tmp_path / "a.png", 1)])
    assert not res.ok and url in res.error


def test_an_unreadable_file_is_a_failed_outcome_and_sends_nothing(srv, tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)
    good = _clip(tmp_path / "ok.png", 1)
    done = []
    out = _captioner(srv, tmp_path).caption_files([broken, fifo, good], on_done=done.append)
    assert [r.path for r in out] == [broken, fifo, good] and len(done) == 3
    assert not out[0].ok and "unreadable" in out[0].error and out[2].ok
    assert not out[1].ok and "not a regular file: a FIFO" in out[1].error      # never opened: that would block
    assert len(srv.requests) == 1


# --- the cache ---------------------------------------------------------------------------------------------
def test_a_second_run_is_served_from_the_cache_and_sends_nothing(srv, tmp_path):
    files = [_clip(tmp_path / "a.mp4", 9), _clip(tmp_path / "b.png", 1)]
    first = _captioner(srv, tmp_path).caption_files(files)
    assert all(r.ok and not r.cached for r in first) and len(srv.requests) == 2
    srv.push(Reply.error(400, "the cache should have answered"))
    again = _captioner(srv, tmp_path).caption_files(files)
    assert len(srv.requests) == 2
    assert all(r.cached for r in again)
    assert [(r.schema, r.frames) for r in again] == [(r.schema, r.frames) for r in first]
    assert not list((tmp_path / "cache").rglob("*.tmp*"))            # written atomically

    srv.script.clear()
    _captioner(srv, tmp_path, max_side=64).caption_files(files[1:])     # another request: another key
    _captioner(srv, tmp_path, system_prompt="Caption it.").caption_files(files[1:])
    _clip(files[1], 1)                                                  # new bytes under the same name
    (res,) = _captioner(srv, tmp_path).caption_files(files[1:])
    assert not res.cached and len(srv.requests) == 5


def test_a_failed_file_is_not_cached_and_a_damaged_cache_entry_is_asked_again(srv, tmp_path):
    img = _clip(tmp_path / "a.png", 1)
    srv.push(Reply.error(400))
    (res,) = _captioner(srv, tmp_path).caption_files([img])
    assert not res.ok and not list((tmp_path / "cache").rglob("*.json"))
    (res,) = _captioner(srv, tmp_path).caption_files([img])
    assert res.ok and not res.cached
    (entry,) = (tmp_path / "cache").rglob("*.json")
    entry.write_text("{truncated")
    (res,) = _captioner(srv, tmp_path).caption_files([img])
    assert res.ok and not res.cached and len(srv.requests) == 3
    assert json.loads(entry.read_text())["frames"] == [0]


# --- concurrency -------------------------------------------------------------------------------------------
def test_concurrency_is_bounded_and_outcomes_keep_the_files_order(tmp_path):
    def responder(req):   # later files answer sooner; the reply says how many frames it saw
        n = len(req.image_urls)
        doc = json.loads(json.dumps(GOOD))
        doc["spans"][0]["subjects"][0]["position"] = f"{n} frames seen"
        return Reply.caption(doc, delay=0.08 * (5 - n))

    files = [_clip(tmp_path / f"{i}.{'png' if t == 1 else 'mp4'}", t)
             for i, t in enumerate([1, 5, 9, 13, 13, 9, 5, 1])]
    done = []
    with ChatServer(responder) as srv:
        out = _captioner(srv, concurrency=3, every_n=4).caption_files(files, on_done=done.append)
    assert srv.max_in_flight == 3 and len(srv.requests) == 8
    assert [r.path for r in out] == files and sorted(map(id, done)) == sorted(map(id, out))
    for r in out:
        assert r.ok and r.schema.spans[0].subjects[0].position == f"{len(r.frames)} frames seen"
    assert [len(r.frames) for r in out] == [1, 2, 3, 4, 4, 3, 2, 1]


# --- arguments -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    ({"every_n": 0}, "every_n must be an int >= 1, got 0"), ({"max_frames": 0}, "max_frames must be"),
    ({"max_side": 8}, "max_side must be an int >= 16, got 8"), ({"concurrency": 0}, "concurrency must be"),
    ({"timeout": 0}, "timeout must be a finite number > 0"), ({"max_retries": -1}, "max_retries must be"),
    ({"system_prompt": " "}, "system_prompt must be a non-empty string"),
])
def test_bad_settings_name_the_argument(kw, match):
    with pytest.raises(ValueError, match=match):
        ChatCaptioner("http://127.0.0.1:9/v1", "m", **kw)


def test_bad_url_or_model_and_a_missing_openai_package_are_clear(monkeypatch):
    with pytest.raises(ValueError, match="base_url must be an http"):
        ChatClient("localhost:8000/v1", "m")
    with pytest.raises(ValueError, match="model must be the name"):
        ChatClient("http://localhost:8000/v1", "")
    monkeypatch.setitem(sys.modules, "openai", None)
    with pytest.raises(ImportError, match=r'pip install "sora-fast\[chat\]"'):
        ChatClient("http://localhost:8000/v1", "m")
