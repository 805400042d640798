"""Prompt expansion (sora_fast.captions.expand): short prompts made from held-out captions expand to captions of
the grammar that keep every stated field; fills are the modes of hand-counted statistics; full captions and
unreadable prompts are kept; the statistics survive JSON and a saved pipeline; the expanded prompt is what the
model sees (generate, generate_long, the CLI and its generate.json); the chat expander against a real local
server (a good reply, a malformed one, 500s, a server that is down)."""
import json
import random
from collections import Counter

import numpy as np
import pytest
import torch

from sora_fast import cli
from sora_fast.captions import CaptionSchema
from sora_fast.captions.expand import CaptionStats, Expansion, SchemaExpander, make_expander
from sora_fast.data import make_synthetic_dataset, parse_caption, sample_spec
from sora_fast.data.world import SCENES, held_out_world, sample_world
from sora_fast.pipeline import VideoPipeline

SPEED_WORD = {"slow": "slowly", "fast": "quickly"}


def _world_captions(n: int, seed: int) -> list[str]:
    """``n`` training captions of the synthetic world (a draw that does not fit its frame is drawn again)."""
    rng, out = np.random.default_rng(seed), []
    while len(out) < n:
        try:
            out.append(sample_world(rng).caption)
        except ValueError:
            pass
    return out


def _held_out(seed: int) -> list[str]:
    """Held-out captions of every world scene (``held_out_world``'s stream, a seed that cannot draw a scene
    moved on) and of the plain synthetic clips (occluders, bounces, images)."""
    caps = []
    for scene in SCENES:
        for k in range(10):
            try:
                caps += [s.caption for s in held_out_world(3, scene, seed=seed + 1000 * k)]
                break
            except ValueError:      # a scene that does not fit its frame for this seed
                pass
    rng = np.random.default_rng(seed + 1)
    caps += [sample_spec(rng, occluder_prob=0.5, bounce_prob=0.3).caption for _ in range(12)]
    return caps


def _units(schema: CaptionSchema) -> list[tuple]:
    """A caption as (field, words) units in caption order, written from the schema (not by the expander's
    reader): each subject's colour, shape, action, direction, speed; the interaction, occluder, background,
    camera motion and camera speed."""
    span = schema.spans[0]
    units = []
    for i, s in enumerate(span.subjects):
        if i:
            units.append((None, "and"))
        units += [(f"subjects[{i}].colour", s.colour), (f"subjects[{i}].shape", s.shape)]
        if s.action not in ("still", None):
            units.append((f"subjects[{i}].action", s.action))
        if s.direction:
            units.append((f"subjects[{i}].direction", s.direction))
        if s.speed:
            units.append((f"subjects[{i}].speed", SPEED_WORD[s.speed]))
    if span.interaction:
        units.append(("interaction", ", " + span.interaction))
    if schema.environment:
        units.append(("environment", "behind a " + schema.environment))
    if schema.background == "textured":
        units.append(("background", "on a textured background"))
    if span.camera_motion:
        units.append(("camera_motion", ", camera " + span.camera_motion))
        units.append(("camera_speed", SPEED_WORD[span.camera_speed]))
    return units


def _fields(schema: CaptionSchema) -> dict:
    span = schema.spans[0]
    out = {"interaction": span.interaction, "environment": schema.environment, "background": schema.background,
           "camera_motion": span.camera_motion, "camera_speed": span.camera_speed}
    for i, s in enumerate(span.subjects):
        out.update({f"subjects[{i}].{k}": getattr(s, k) for k in ("colour", "shape", "action", "direction",
                                                                  "speed")})
    return out


def test_short_prompts_from_held_out_captions_keep_every_given_field(fresh_seed):
    rng = random.Random(fresh_seed)
    stats = CaptionStats.from_captions(_world_captions(400, fresh_seed % 1000))
    expander = SchemaExpander(stats)
    tried = 0
    for caption in _held_out(fresh_seed % 1000 + 7):
        truth = CaptionSchema.from_caption(caption)
        n = len(truth.spans[0].subjects)
        for _ in range(4):
            units = _units(truth)
            keep = [u for u in units if u[0] is None or rng.random() < 0.5]
            for i in range(n):           # every subject keeps a colour or a shape (else it is not there)
                nouns = [u for u in units if u[0] in (f"subjects[{i}].colour", f"subjects[{i}].shape")]
                if not any(u in keep for u in nouns):
                    keep.append(rng.choice(nouns))
            camera = [u for u in units if u[0] == "camera_motion"]
            if camera and camera[0] not in keep:   # a speed word is the camera's only right after the camera
                keep = [u for u in keep if u[0] != "camera_speed"]
            keep = [u for u in units if u in keep]            # caption order
            prompt = " ".join(w for _, w in keep).replace(" ,", ",")
            given = {f: v for f, v in _fields(truth).items() if any(u[0] == f for u in keep)}
            e = expander.expand(prompt)
            assert e.error is None and e.expander == "schema" and e.changed, (prompt, e.note)
            tried += 1
            parse_caption(e.expanded)                          # in the grammar (raises otherwise)
            got = _fields(CaptionSchema.from_caption(e.expanded))
            for f, v in given.items():
                assert got[f] == v, (caption, prompt, e.expanded, f)
            assert not set(e.filled) & set(given), (prompt, e.filled)
            assert all(got[f] == v for f, v in e.filled.items())
            assert len(CaptionSchema.from_caption(e.expanded).spans[0].subjects) == n
    assert tried > 40


# Hand-counted statistics (counted here, independent of the implementation):
#   colour: red 3, blue 4, green 2, white 1, yellow 1 -> blue; shape: circle 3, square 5, triangle 3 -> square
#   action: moving 8, bouncing 2, dropped 1; moving: right 4 (all slow), left 3 (all fast), up 1 (fast, gray bar)
#   bouncing: up and down 2 (slow); occluder: none 10, gray bar 1; 2 captions outside the grammar
KNOWN = (["a red circle moving left quickly"] * 3 + ["a blue square moving right slowly"] * 3
         + ["a blue triangle moving right slowly", "a green triangle bouncing up and down slowly"] * 1
         + ["a green triangle bouncing up and down slowly", "a white square dropped",
            "a yellow square moving up quickly behind a gray bar", "a purple hexagon spinning", "red circle left"])


@pytest.mark.parametrize("prompt, expanded, filled", [
    # nothing but the shape: the modes (colour blue; moving; right among moving; slow among moving right)
    ("triangle", "a blue triangle moving right slowly",
     {"subjects[0].colour": "blue", "subjects[0].action": "moving", "subjects[0].direction": "right",
      "subjects[0].speed": "slow"}),
    # fast: among fast captions the moving ones go left (overall, right is the mode)
    ("circle fast", "a blue circle moving left quickly",
     {"subjects[0].colour": "blue", "subjects[0].action": "moving", "subjects[0].direction": "left"}),
    # up: the one caption moving up is fast and behind a bar
    ("yellow square up", "a yellow square moving up quickly behind a gray bar",
     {"subjects[0].action": "moving", "subjects[0].speed": "fast", "environment": "gray bar"}),
    # bouncing: its axis and speed among bouncing captions, not the overall modes
    ("green triangle bouncing", "a green triangle bouncing up and down slowly",
     {"subjects[0].direction": "up and down", "subjects[0].speed": "slow"}),
    ("White square, slowly", "a white square moving right slowly",
     {"subjects[0].action": "moving", "subjects[0].direction": "right"}),
])
def test_fills_are_the_modes_of_hand_counted_statistics(prompt, expanded, filled):
    stats = CaptionStats.from_captions(KNOWN)
    assert (stats.captions, stats.skipped) == (11, 2)
    f = stats.frequencies()
    assert f["colour"] == {"blue": 4, "red": 3, "green": 2, "white": 1, "yellow": 1}
    assert f["shape"] == {"square": 5, "circle": 3, "triangle": 3}
    assert f["action"] == {"moving": 8, "bouncing": 2, "dropped": 1}
    e = SchemaExpander(stats).expand(prompt)
    assert (e.expanded, e.filled, e.note) == (expanded, filled, None)
    assert e.schema.render() == expanded


def test_full_captions_are_unchanged(fresh_seed):
    expander = SchemaExpander(CaptionStats.from_captions(_world_captions(50, fresh_seed % 1000)))
    caps = _held_out(fresh_seed % 1000) + ["A Red circle moving  left slowly.", "a white triangle"]
    for c in caps:
        e = expander.expand(c)
        assert (e.expanded, e.filled, e.error) == (c, {}, None) and not e.changed
        assert e.schema is not None and parse_caption(e.schema.render()) == parse_caption(c)


def test_unreadable_prompts_are_kept_with_a_note():
    expander = SchemaExpander(CaptionStats.from_captions(KNOWN))
    bad = ["a dog running on the beach", "", "  !!! ", "moving left quickly",
           "a red circle, a blue square and a green triangle"]
    out = expander.expand_many(bad)
    for prompt, e in zip(bad, out):
        assert e.original == e.expanded == prompt and e.filled == {} and e.schema is None
        assert e.note and e.error is None
    assert "no subject" in out[0].note and "at most 2 subjects" in out[-1].note
    with pytest.raises(ValueError, match="cannot be expanded: no subject"):
        SchemaExpander(strict=True).expand("a dog")
    # a readable prompt with words outside the grammar: expanded, the words named
    e = expander.expand("a purple circle at sunset")
    assert e.expanded.startswith("a blue circle") and "purple" in e.note and "sunset" in e.note


def test_without_statistics_the_grammar_order_fills_and_the_note_says_so():
    e = SchemaExpander(None).expand("red circle and blue square")
    assert e.expanded == "a red circle moving left slowly and a blue square moving right slowly, passing each other"
    assert "no caption statistics" in e.note
    e = SchemaExpander(CaptionStats()).expand("a yellow circle, camera zooming in")
    assert parse_caption(e.expanded).camera == "in" and "no caption statistics" in e.note
    # a model of captions outside the grammar (real videos): a caption of the grammar would be foreign to it
    e = SchemaExpander(CaptionStats.from_captions(["a dog runs on a beach", "a red car"])).expand("red circle left")
    assert not e.changed and "none of the 2 training captions is in the caption grammar" in e.note


def test_stats_json_round_trip_and_errors(fresh_seed):
    stats = CaptionStats.from_captions(_world_captions(120, fresh_seed % 1000) + ["free text"])
    d = json.loads(json.dumps(stats.to_dict()))
    back = CaptionStats.from_dict(d)
    assert back == stats and back.to_dict() == stats.to_dict()
    assert back.examples == stats.examples and 1 <= len(back.examples) <= 8
    assert len({CaptionSchema.from_caption(c).render() for c in back.examples}) == len(back.examples)
    # frequencies are the counts of the captions (counted here over the parsed prompts)
    parsed = [parse_caption(c) for c in _world_captions(120, fresh_seed % 1000)]
    colours = Counter(p.color for p in parsed) + Counter(p.other.color for p in parsed if p.other is not None)
    assert back.frequencies()["colour"] == dict(colours)
    d["fields"]["colour"][next(iter(d["fields"]["colour"]))] += 1
    with pytest.raises(ValueError, match=r"captions.fields.colour"):
        CaptionStats.from_dict(d)
    d = stats.to_dict()
    d["scenes"][0]["count"] = 0
    with pytest.raises(ValueError, match=r"captions.scenes\[0\].count must be an int >= 1"):
        CaptionStats.from_dict(d)


def test_stats_are_saved_with_the_pipeline(tiny_pipeline, tmp_path, fresh_seed):
    pipe, path = tiny_pipeline
    assert VideoPipeline.load(path).caption_stats is None          # saved without: still loads
    stats = CaptionStats.from_captions(_world_captions(60, fresh_seed % 1000))
    pipe.caption_stats = stats
    pipe.save(tmp_path / "with")
    desc = json.loads((tmp_path / "with" / "pipeline.json").read_text())
    assert desc["captions"] == json.loads(json.dumps(stats.to_dict()))
    assert VideoPipeline.load(tmp_path / "with").caption_stats == stats
    desc["captions"]["captions"] += 1
    (tmp_path / "with" / "pipeline.json").write_text(json.dumps(desc))
    with pytest.raises(ValueError, match="pipeline.json.*captions.scenes count"):
        VideoPipeline.load(tmp_path / "with")


def test_the_expanded_prompt_is_what_the_model_sees(tiny_pipeline):
    pipe, _ = tiny_pipeline
    pipe.caption_stats = CaptionStats.from_captions(KNOWN)
    prompts = ["circle fast", "a red square moving up slowly"]
    kw = dict(sizes=(5, 16, 16), steps=2, guidance=3.0, seed=5)
    got = pipe.generate(prompts, expand="schema", **kw)
    assert [e.expanded for e in pipe.last_prompts] == ["a blue circle moving left quickly", prompts[1]]
    assert [e.original for e in pipe.last_prompts] == prompts and "expand" in pipe.last_timings
    ref = pipe.generate(["a blue circle moving left quickly", prompts[1]], **kw)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    assert [e.expanded for e in pipe.last_prompts] == [e.original for e in pipe.last_prompts]
    raw = pipe.generate(prompts, **kw)                      # the text matters: unexpanded differs
    # the other prompt's video only sees rounding: its batch-mate's text length may change how the torch
    # attention path groups the cross-attention calls (fp32, a few ulps of values of order 1); the text's own
    # effect on the random tiny model is orders of magnitude above that
    rounding = 1e-5
    assert (raw[0] - got[0]).abs().max() > 100 * rounding
    assert torch.allclose(raw[1], got[1], rtol=0, atol=rounding)
    # generate_long expands its prompt the same way
    long_kw = dict(window=5, overlap=1, size=(16, 16), steps=2, guidance=3.0, seed=2)
    a = pipe.generate_long("circle fast", 9, expand=SchemaExpander(pipe.caption_stats), **long_kw)
    assert pipe.last_prompts[0].expanded == "a blue circle moving left quickly"
    assert torch.equal(a, pipe.generate_long("a blue circle moving left quickly", 9, **long_kw))
    with pytest.raises(ValueError, match="ChatExpander"):
        pipe.generate(prompts, expand="chat", **kw)
    with pytest.raises(ValueError, match="expand must be None"):
        pipe.generate(prompts, expand="magic", **kw)


def test_cli_records_original_and_expanded_prompts(tiny_pipeline, tmp_path, capsys):
    pipe, path = tiny_pipeline
    pipe.caption_stats = CaptionStats.from_captions(KNOWN)
    pipe.save(path)
    out = tmp_path / "gen"
    assert cli.main(["generate", "--pipeline", str(path), "--prompt", "circle fast", "--prompt", "a dog",
                     "--size", "1x16x16", "--steps", "1", "--expand", "schema", "--out", str(out),
                     "--format", "gif"]) == 0
    printed = capsys.readouterr().out
    assert "'circle fast' -> 'a blue circle moving left quickly'" in printed and "'a dog' kept" in printed
    meta = json.loads((out / "generate.json").read_text())
    assert meta["prompts"] == ["circle fast", "a dog"] and meta["expand"] == "schema"
    assert meta["expanded_prompts"] == ["a blue circle moving left quickly", "a dog"]
    first, second = meta["expansions"]
    assert first["original"] == "circle fast" and first["expanded"] == "a blue circle moving left quickly"
    assert first["filled"] == {"subjects[0].colour": "blue", "subjects[0].action": "moving",
                               "subjects[0].direction": "left"}
    assert second["expanded"] == "a dog" and "no subject" in second["note"]
    assert sorted(p.name for p in out.iterdir())[0].startswith("00_circle_fast")   # files keep the user's words
    # without --expand nothing is added to generate.json
    assert cli.main(["generate", "--pipeline", str(path), "--prompt", "x", "--size", "1x16x16", "--steps", "1",
                     "--out", str(tmp_path / "plain"), "--format", "gif"]) == 0
    assert "expansions" not in json.loads((tmp_path / "plain" / "generate.json").read_text())


@pytest.mark.parametrize("args, match", [
    (["--expand", "chat"], "--expand chat needs --expand-base-url and --expand-model"),
    (["--expand", "chat", "--expand-base-url", "http://127.0.0.1:9/v1"], "needs --expand-model"),
    (["--expand", "schema", "--expand-model", "m"], "--expand-model only apply to --expand chat"),
])
def test_cli_expand_flag_errors(tiny_pipeline, tmp_path, capsys, args, match):
    _, path = tiny_pipeline
    rc = cli.main(["generate", "--pipeline", str(path), "--prompt", "a", "--out", str(tmp_path / "o"), *args])
    assert rc == 2 and match in capsys.readouterr().err


def test_train_saves_the_statistics_of_its_captions(tiny_pipeline, tmp_path):
    _, path = tiny_pipeline
    data = tmp_path / "data"
    clips = make_synthetic_dataset(data, 4, seed=3, sizes=((16, 16),), lengths=(1, 5), progress=False)
    (data / "00000.txt").write_text("a hand-written caption outside the grammar\n")
    run = {"data": str(data), "out": str(tmp_path / "run"), "pipeline": str(path),
           "train": {"steps": 1, "token_budget": 64, "save_every": 1, "log_every": 1}}
    (tmp_path / "run.json").write_text(json.dumps(run))
    assert cli.main(["train", "--config", str(tmp_path / "run.json")]) == 0
    saved = VideoPipeline.load(tmp_path / "run" / "pipeline").caption_stats
    want = CaptionStats.from_captions([c.caption for c in clips[1:]])
    assert (saved.captions, saved.skipped) == (3, 1)
    assert saved.scenes == want.scenes and saved.frequencies() == want.frequencies()
    assert sorted(saved.examples) == sorted(want.examples)


def test_make_expander_and_expansion_records():
    assert make_expander(None) is None
    ex = SchemaExpander()
    assert make_expander(ex) is ex and isinstance(make_expander("schema"), SchemaExpander)
    with pytest.raises(ValueError, match="needs base_url and model"):
        make_expander("chat")
    with pytest.raises(TypeError, match="prompts must be a list"):
        ex.expand_many("a red circle")
    e = Expansion("x", "y", "schema", filled={"subjects[0].speed": "fast"})
    assert e.changed and e.to_dict() == {"original": "x", "expanded": "y", "expander": "schema",
                                         "filled": {"subjects[0].speed": "fast"}, "note": None, "error": None}


# --- the chat expander against a real local server (tests/_chat_server.py) ------------------------------------
def _chat_server():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    import _chat_server

    return _chat_server


@pytest.fixture
def srv():
    with _chat_server().ChatServer() as s:
        yield s


def _chat(url, **kw):
    from sora_fast.captions.expand import ChatExpander

    kw.setdefault("backoff", 0.0)
    kw.setdefault("max_retries", 1)
    return ChatExpander(url, "test-llm", **kw)


def test_chat_text_reply_is_the_expansion_and_the_request_shows_training_captions(srv, tiny_pipeline):
    Reply = _chat_server().Reply
    stats = CaptionStats.from_captions(KNOWN)
    srv.push(Reply.text("a red circle moving left quickly"),
             Reply.text('Here is the caption:\n"A blue square moving up slowly."\n'))
    out = _chat(srv.base_url, stats=stats).expand_many(["red circle left", "blue square up"])
    assert [e.expanded for e in out] == ["a red circle moving left quickly", "A blue square moving up slowly."]
    assert all(e.error is None and e.expander == "chat" and e.schema is not None for e in out)
    body = srv.requests[0].body
    assert body["model"] == "test-llm" and body["temperature"] == 0 and "response_format" not in body
    system, user = body["messages"]
    assert user == {"role": "user", "content": "red circle left"}
    assert all(f"- {c}\n" in system["content"] + "\n" for c in stats.examples) and len(stats.examples) >= 5
    # the expansion is what the model sees
    pipe, _ = tiny_pipeline
    srv.push(Reply.text("a red circle moving left quickly"))
    got = pipe.generate(["red circle left"], (1, 16, 16), steps=1, expand=_chat(srv.base_url), seed=4)
    assert pipe.last_prompts[0].expanded == "a red circle moving left quickly"
    assert torch.equal(got[0], pipe.generate(["a red circle moving left quickly"], (1, 16, 16), steps=1, seed=4)[0])


def test_chat_structured_reply_is_validated_and_rendered(srv):
    from sora_fast.captions.chat import ChatCaptioner

    server = _chat_server()
    doc = json.loads(json.dumps(server.GOOD))
    doc["spans"][0]["subjects"][0].update(colour="green", speed="fast")
    srv.push(server.Reply.caption(doc))
    e = _chat(srv.base_url, structured=True).expand("green circle left")
    assert (e.expanded, e.error) == ("a green circle moving left quickly", None)
    assert e.schema == CaptionSchema.from_json(doc)
    assert srv.requests[0].body["response_format"] == ChatCaptioner.response_format()


@pytest.mark.parametrize("structured, reply, match", [
    (True, "{not json", "caption JSON does not parse"),
    (True, json.dumps({"spans": []}), "missing field"),
    (False, "  \n ", "holds no caption"),
    (False, "x" * 1200, "more than max_chars=1000"),
])
def test_chat_malformed_replies_keep_the_prompt(srv, structured, reply, match):
    srv.push(_chat_server().Reply.text(reply))
    e = _chat(srv.base_url, structured=structured).expand("red circle left")
    assert e.expanded == e.original == "red circle left" and not e.changed
    assert e.error.startswith("invalid chat reply") and match in e.error


def test_chat_server_errors_and_a_server_that_is_down_keep_the_prompt(srv):
    server = _chat_server()
    srv.push(server.Reply.error(500), server.Reply.text("a red circle moving left slowly"))
    assert _chat(srv.base_url).expand("red circle left").expanded == "a red circle moving left slowly"  # retried
    n = len(srv.requests)
    srv.push(*[server.Reply.error(500, "overloaded")] * 3)
    e = _chat(srv.base_url, max_retries=2).expand("red circle left")
    assert len(srv.requests) - n == 3 and e.expanded == "red circle left"
    assert e.error.startswith("chat request failed") and "HTTP 500: overloaded" in e.error
    e = _chat(server.closed_port_url(), max_retries=0).expand("red circle left")
    assert e.expanded == "red circle left" and "cannot reach the chat server" in e.error


def test_cli_expand_chat(srv, tiny_pipeline, tmp_path, capsys):
    _, path = tiny_pipeline
    srv.push(_chat_server().Reply.text("a white triangle moving down slowly"))
    out = tmp_path / "gen"
    assert cli.main(["generate", "--pipeline", str(path), "--prompt", "white triangle down", "--size", "1x16x16",
                     "--steps", "1", "--out", str(out), "--format", "gif", "--expand", "chat",
                     "--expand-base-url", srv.base_url, "--expand-model", "test-llm"]) == 0
    assert "-> 'a white triangle moving down slowly'" in capsys.readouterr().out
    meta = json.loads((out / "generate.json").read_text())
    assert meta["expand"] == "chat" and meta["expanded_prompts"] == ["a white triangle moving down slowly"]
    assert meta["expansions"][0]["expander"] == "chat" and meta["prompts"] == ["white triangle down"]
