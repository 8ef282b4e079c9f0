"""The synthetic world: determinism, held-out compositions, texts consistent with scene graphs."""

import collections
import json
import os
import re

import numpy as np
import pytest

from jaxvlm.data import builder, render, scenes, vocabulary, world
from jaxvlm.data.storage import build_world, load_world
from jaxvlm.data.world_config import CLIP_SPLITS, SCENE_SPLITS, WorldConfig

SMALL_WORLD = WorldConfig(
    seed=3, num_scenes=200, num_eval_scenes=40, num_clips=20, num_eval_clips=8, num_shots=3
)  # as built by the small_world fixture (tests/data/conftest.py)


def _records(small_world, split):
    source = small_world.as_data_source(split)
    return [builder.decode_record(source[i]) for i in range(len(source))]


def _all_text(record) -> str:
    return json.dumps({k: v for k, v in record.items() if k not in ("image", "frames")}).lower()


def test_config_round_trip_and_validation():
    config = WorldConfig(seed=5, held_out=["Red Circle", "blue  star"])
    assert config.held_out == ("red circle", "blue star")
    assert WorldConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.fingerprint() == WorldConfig.from_dict(config.to_dict()).fingerprint()
    assert config.fingerprint() != WorldConfig(seed=6).fingerprint()
    with pytest.raises(ValueError, match="colours: red, green"):
        WorldConfig(held_out=("pink circle",))
    with pytest.raises(ValueError, match="unknown world config keys"):
        WorldConfig.from_dict({"seeds": 1})
    assert "test_novel" not in WorldConfig(held_out=()).split_sizes()


def _examples(config, split):
    return list(builder.scene_examples(config, split))


def test_deterministic_per_seed():
    config = WorldConfig(seed=1, num_scenes=30, num_eval_scenes=5)
    first, second = _examples(config, "train"), _examples(config, "train")
    other = _examples(WorldConfig(seed=2, num_scenes=30, num_eval_scenes=5), "train")
    for (key_a, a), (key_b, b) in zip(first, second, strict=True):
        assert key_a == key_b
        np.testing.assert_array_equal(a["image"], b["image"])
        assert {k: v for k, v in a.items() if k != "image"} == {
            k: v for k, v in b.items() if k != "image"
        }
    assert any(
        not np.array_equal(a["image"], b["image"])
        for (_, a), (_, b) in zip(first, other, strict=True)
    )
    assert [a["captions"] for _, a in first] != [b["captions"] for _, b in other]


def test_built_world_matches_generation(small_world):
    source = small_world.as_data_source("validation")
    for index, (key, example) in enumerate(_examples(SMALL_WORLD, "validation")[:5]):
        record = source[index]
        assert key == index == record["scene_id"]
        np.testing.assert_array_equal(record["image"], example["image"])
        assert record["captions"].decode() == example["captions"]


def test_splits_shapes_and_order(small_world):
    assert small_world.config == SMALL_WORLD
    assert small_world.config == SMALL_WORLD
    size = SMALL_WORLD.image_size
    for split in SCENE_SPLITS:
        records = _records(small_world, split)
        assert len(records) == SMALL_WORLD.split_sizes()[split]
        assert [r["scene_id"] for r in records] == list(range(len(records)))
        for record in records[:10]:
            assert record["image"].shape == (size, size, 3)
            assert record["image"].dtype == np.uint8
    for split in CLIP_SPLITS:
        for record in _records(small_world, split):
            assert record["frames"].shape == (SMALL_WORLD.clip_frames, size, size, 3)
            assert record["frames"].dtype == np.uint8
    with pytest.raises(ValueError, match="no split 'nope'"):
        small_world.as_data_source("nope")


def test_held_out_only_in_test_novel(small_world):
    held_out = set(SMALL_WORLD.held_out_compositions)
    phrases = [f"{colour} {shape}" for colour, shape in held_out]
    phrases += [f"{c} {vocabulary.SHAPE_PLURALS[s]}" for c, s in held_out]
    for split in [s for s in small_world.splits if s != "test_novel"]:
        for record in _records(small_world, split):
            objects = record["scene"]["objects"]
            assert not {(o["colour"], o["shape"]) for o in objects} & held_out
            text = _all_text(record)
            assert not any(phrase in text for phrase in phrases), (split, record["scene"])
    for record in _records(small_world, "test_novel"):
        assert {(o["colour"], o["shape"]) for o in record["scene"]["objects"]} & held_out


def test_objects_visible_and_boxed(small_world):
    for record in _records(small_world, "train")[:50]:
        objects = record["scene"]["objects"]
        assert 1 <= len(objects) <= SMALL_WORLD.max_objects
        assert len({(o["colour"], o["shape"]) for o in objects}) == len(objects)
        for item in objects:
            x, y = item["centre"]
            x0, y0, x1, y1 = item["bbox"]
            assert 0 <= x0 < x < x1 <= SMALL_WORLD.image_size
            assert 0 <= y0 < y < y1 <= SMALL_WORLD.image_size
            # The centre pixel is fully covered by its object: exactly the object's colour.
            pixel = record["image"][int(y), int(x)]
            np.testing.assert_array_equal(pixel, vocabulary.COLOURS[item["colour"]])
            assert item["position"] == scenes.position_word(item["centre"], SMALL_WORLD.image_size)


def test_render_is_anti_aliased():
    graph = {
        "background": "black",
        "objects": [{"colour": "white", "shape": "circle", "size": "large", "centre": [32, 32]}],
    }
    image = render.render_scenes([graph], [0], 64)[0]
    levels = np.unique(image[..., 0])
    assert levels[0] == 0 and levels[-1] == 245 and len(levels) > 5  # partial-coverage edges


def _objects_named(objects, name):
    words = name.split()
    return [o for o in objects if all(w in (o["colour"], o["shape"], o["size"]) for w in words)]


def _expected_answer(question, objects, image_size):
    text, kind = question["question"], question["question_type"]
    words = re.findall(r"[a-z]+", text)
    if kind == "count":
        if "objects" in text or "shapes" in text:
            colours = [c for c in vocabulary.COLOURS if f" {c} objects" in text]
            if colours:
                return str(sum(o["colour"] == colours[0] for o in objects))
            return str(len(objects))
        shape = next(s for s, plural in vocabulary.SHAPE_PLURALS.items() if plural in text)
        return str(sum(o["shape"] == shape for o in objects))
    if kind == "colour":
        (item,) = _objects_named(objects, text.rsplit("the ", 1)[1].rstrip("?"))
        return item["colour"]
    if kind == "shape":
        colour = next(c for c in vocabulary.COLOURS if c in words)
        (item,) = [o for o in objects if o["colour"] == colour]
        return item["shape"]
    if kind == "position":
        (item,) = _objects_named(objects, text.rsplit("the ", 1)[1].rstrip("?"))
        return scenes.position_word(item["centre"], image_size)
    if kind == "existence":
        colour = next(c for c in vocabulary.COLOURS if c in words)
        shape = next(s for s, p in vocabulary.SHAPE_PLURALS.items() if s in text or p in text)
        present = any(o["colour"] == colour and o["shape"] == shape for o in objects)
        return "yes" if present else "no"
    if kind == "relation":
        match = re.match(
            r"is the ([a-z]+ [a-z]+) (?:to the )?(left of|right of|above|below) "
            r"the ([a-z]+ [a-z]+)\?$",
            text,
        )
        (first,) = _objects_named(objects, match.group(1))
        (second,) = _objects_named(objects, match.group(3))
        return "yes" if scenes.relation(first, second) == match.group(2) else "no"
    raise AssertionError(f"unexpected question type {kind}")


def test_captions_and_vqa_consistent_with_scene_graph(small_world):
    types = collections.Counter()
    for split in ("train", "test_novel"):
        for record in _records(small_world, split):
            assert len(record["captions"]) >= 5 and record["caption"] == record["captions"][0]
            objects = record["scene"]["objects"]
            for item in objects:  # every caption names every object
                assert all(item["shape"] in caption for caption in record["captions"][:2])
            assert len({q["question_id"] for q in record["questions"]}) == len(record["questions"])
            for question in record["questions"]:
                types[question["question_type"]] += 1
                answers = question["answers"]
                assert len(answers) == 10
                majority, votes = collections.Counter(answers).most_common(1)[0]
                assert majority == question["multiple_choice_answer"] and votes >= 8
                expected = _expected_answer(question, objects, SMALL_WORLD.image_size)
                assert majority == expected, (question, objects)
    assert set(types) == set(vocabulary.QUESTION_TYPES)


def test_instructions_and_episodes(small_world):
    records = _records(small_world, "validation")
    for record in records:
        samples = record["instructions"]
        assert [s["type"] for s in samples] == ["conversation", "detail", "complex_reasoning"]
        for sample in samples:
            turns = sample["conversations"]
            assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
            assert turns[0]["value"].count("<image>") == 1
            assert all("<image>" not in t["value"] for t in turns[1:])
        assert len(samples[0]["conversations"]) >= 4  # conversations are multi-turn
        episode = record["episode"]
        assert episode["query"] == record["scene_id"]
        assert len(episode["support"]) == SMALL_WORLD.num_shots
        for shot in episode["support"]:
            assert shot["scene_id"] != record["scene_id"]
            assert shot["caption"] == records[shot["scene_id"]]["caption"]


def test_clips_move_as_answered(small_world):
    for record in _records(small_world, "clips_train"):
        objects = {f"{o['colour']} {o['shape']}": o for o in record["scene"]["objects"]}
        for item in objects.values():
            steps = np.diff(np.asarray(item["centres"]), axis=0)  # (F - 1, 2)
            dx, dy = vocabulary.DIRECTIONS[item["direction"]]
            axis = 0 if dx else 1
            assert np.all(np.sign(steps[:, axis]) == dx + dy)
            assert np.all(steps[:, 1 - axis] == 0)
        assert len(record["captions"]) >= 5
        directions = [q for q in record["questions"] if q["question_type"] == "direction"]
        assert len(directions) == len(objects)
        for question in directions:
            name = next(n for n in objects if f"the {n} " in question["question"])
            assert question["answers"] == [objects[name]["direction"]] * 10


def test_build_world_caches(tmp_path):
    config = WorldConfig(num_scenes=20, num_eval_scenes=4, num_clips=3, num_eval_clips=2)
    path = build_world(config, tmp_path)
    assert path == str(tmp_path / "worlds" / config.fingerprint())
    stamp = os.stat(os.path.join(path, "world.json")).st_mtime_ns
    assert build_world(config, tmp_path) == path
    assert os.stat(os.path.join(path, "world.json")).st_mtime_ns == stamp
    assert os.listdir(tmp_path / "worlds") == [config.fingerprint()]  # no staging leftovers
    assert load_world(path).splits["train"] == 20


def test_cli_builds_a_world(tmp_path, capsys):
    out = tmp_path / "cli_world"
    argv = [
        "--out",
        str(out),
        "--seed",
        "4",
        "--num-scenes",
        "12",
        "--num-eval-scenes",
        "3",
        "--num-clips",
        "2",
        "--held-out=red circle,blue star",
    ]
    assert world.main(argv) == 0
    summary = capsys.readouterr().out.strip().splitlines()
    assert len(summary) == 1 and "train 12" in summary[0] and "red circle" in summary[0]
    loaded = load_world(out)
    assert loaded.held_out == ("red circle", "blue star") and loaded.config.seed == 4


def test_cli_rejects_unknown_composition(tmp_path, capsys):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exit_info:
        world.main(["--out", str(out), "--seed", "0", "--held-out", "pink circle"])
    assert exit_info.value.code not in (0, None)
    assert "pink circle" in str(exit_info.value.code)
    assert "shapes: circle" in str(exit_info.value.code)
    assert not out.exists()
