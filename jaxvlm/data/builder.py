"""The synthetic world as a tensorflow-datasets dataset (array_record), built and cached on disk.

A world directory holds `world.json` (config, held-out compositions, split sizes) and two tfds
datasets, `scenes/` and `clips/`, read without TensorFlow through `World.as_data_source(split)`.
Records are written in id order: record i of a split is scene (or clip) i.

Scene splits `train`, `validation`, `test`, `test_novel` (features of each record):
  scene_id      int64           index in the split
  image         uint8[S, S, 3]  the rendered scene
  scene         Text (JSON)     the scene graph (see `scenes.py`)
  caption       Text            the retrieval caption (= captions[0])
  captions      Text (JSON)     list of 5 reference captions
  questions     Text (JSON)     list of VQAv2-style questions, 10 answers each (see `texts.py`)
  instructions  Text (JSON)     LLaVA-Instruct conversation, detail, complex_reasoning samples
  episode       Text (JSON)     {"query": scene_id, "support": [{"scene_id", "caption",
                                "question", "answer"}, ...]} drawn from the same split
Clip splits `clips_train`, `clips_test`:
  clip_id       int64
  frames        uint8[F, S, S, 3]
  scene         Text (JSON)     the clip graph (objects with direction and per-frame centres)
  caption, captions, questions  as above; question types "direction", "colour", "count"

Held-out compositions appear only in `test_novel` (every scene holds one); `train`,
`validation`, `test` and both clip splits never hold one, nor does any of their texts.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from jaxvlm.data import instructions, render, scenes, texts
from jaxvlm.data.world_config import CLIP_SPLITS, SCENE_SPLITS, SPLIT_CODES, WorldConfig

# Text features holding JSON, decoded by `decode_record`.
JSON_FIELDS: tuple[str, ...] = ("scene", "captions", "questions", "instructions", "episode")
_RENDER_CHUNK = 512  # scenes rendered (and held in memory as images) at once
_QUESTION_ID_STRIDE = 10  # question ids: record index * stride + question number


def _dumps(value) -> str:
    return json.dumps(value, separators=(",", ":"))


def _split_compositions(config: WorldConfig, split: str):
    """(allowed, required, absent): what objects and "no" answers a split may use."""
    held_out = set(config.held_out_compositions)
    everything = scenes.all_compositions()
    allowed = [c for c in everything if c not in held_out]
    if split == "test_novel":
        return allowed, sorted(held_out), everything
    return allowed, [], allowed


def scene_examples(config: WorldConfig, split: str) -> Iterator[tuple[int, dict]]:
    """(scene_id, features) of a scene split, in id order."""
    code = SPLIT_CODES[split]
    allowed, required, absent = _split_compositions(config, split)
    graphs, noise_seeds, captions, questions, samples = [], [], [], [], []
    for index in range(config.split_sizes()[split]):
        rng = np.random.default_rng((config.seed, code, index))
        graph = scenes.sample_scene(
            rng,
            scene_id=index,
            image_size=config.image_size,
            max_objects=config.max_objects,
            allowed=allowed,
            required=required,
        )
        graphs.append(graph)
        noise_seeds.append(int(rng.integers(2**32)))
        captions.append(texts.captions(graph, rng))
        questions.append(texts.questions(graph, rng, absent, index * _QUESTION_ID_STRIDE))
        samples.append(instructions.instructions(graph, questions[-1], rng))
    for start in range(0, len(graphs), _RENDER_CHUNK):
        stop = start + _RENDER_CHUNK
        images = render.render_scenes(
            graphs[start:stop], noise_seeds[start:stop], config.image_size
        )
        for index in range(start, min(stop, len(graphs))):
            episode_rng = np.random.default_rng((config.seed, code, index, 1))
            episode = texts.episode(index, captions, questions, episode_rng, config.num_shots)
            yield (
                index,
                {
                    "scene_id": index,
                    "image": images[index - start],
                    "scene": _dumps(graphs[index]),
                    "caption": captions[index][0],
                    "captions": _dumps(captions[index]),
                    "questions": _dumps(questions[index]),
                    "instructions": _dumps(samples[index]),
                    "episode": _dumps(episode),
                },
            )


def clip_examples(config: WorldConfig, split: str) -> Iterator[tuple[int, dict]]:
    """(clip_id, features) of a clip split, in id order."""
    code = SPLIT_CODES[split]
    allowed, _, _ = _split_compositions(config, split)
    size = config.split_sizes()[split]
    chunk = max(1, _RENDER_CHUNK // config.clip_frames)
    for start in range(0, size, chunk):
        graphs, noise_seeds, captions, questions = [], [], [], []
        for index in range(start, min(start + chunk, size)):
            rng = np.random.default_rng((config.seed, code, index))
            graph = scenes.sample_clip(
                rng,
                clip_id=index,
                image_size=config.image_size,
                num_frames=config.clip_frames,
                max_objects=config.clip_max_objects,
                allowed=allowed,
            )
            graphs.append(graph)
            noise_seeds.append(int(rng.integers(2**32)))
            captions.append(texts.clip_captions(graph, rng))
            questions.append(texts.clip_questions(graph, rng, index * _QUESTION_ID_STRIDE))
        frames = render.render_clips(graphs, noise_seeds, config.image_size)
        for offset, graph in enumerate(graphs):
            yield (
                start + offset,
                {
                    "clip_id": start + offset,
                    "frames": frames[offset],
                    "scene": _dumps(graph),
                    "caption": captions[offset][0],
                    "captions": _dumps(captions[offset]),
                    "questions": _dumps(questions[offset]),
                },
            )


def _image_feature(shape: tuple[int, ...]) -> tfds.features.Tensor:
    # BYTES encoding stores the array as one string: ~10x faster to write and read than the
    # default, which writes every uint8 as an int64 list entry.
    return tfds.features.Tensor(shape=shape, dtype=np.uint8, encoding=tfds.features.Encoding.BYTES)


class JaxvlmWorld(tfds.core.GeneratorBasedBuilder):
    """tfds builder of one synthetic world; config "scenes" or "clips" (see the module docstring).

    Lives in an importable module so grain worker processes can unpickle its data sources.
    """

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="scenes", description="still scenes with texts"),
        tfds.core.BuilderConfig(name="clips", description="moving-object clips with texts"),
    ]

    def __init__(self, *, world_config: WorldConfig, **kwargs):
        self.world_config = world_config
        super().__init__(**kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # tfds's own lookup for builders inside a package needs `importlib_resources`, which
        # tensorflow-datasets 4.9.10 uses without declaring it.
        return epath.Path(__file__)

    # tfds prints these to stdout; CLIs keep stdout for their own output.
    def _log_download_bytes(self) -> None:
        logging.info("generating %s/%s into %s", self.name, self.builder_config.name, self.data_dir)

    def _log_download_done(self) -> None:
        logging.info("generated %s/%s", self.name, self.builder_config.name)

    def _info(self) -> tfds.core.DatasetInfo:
        side = self.world_config.image_size
        text = tfds.features.Text
        if self.builder_config.name == "scenes":
            features = {
                "scene_id": tfds.features.Scalar(dtype=np.int64),
                "image": _image_feature((side, side, 3)),
                "scene": text(),
                "caption": text(),
                "captions": text(),
                "questions": text(),
                "instructions": text(),
                "episode": text(),
            }
        else:
            features = {
                "clip_id": tfds.features.Scalar(dtype=np.int64),
                "frames": _image_feature((self.world_config.clip_frames, side, side, 3)),
                "scene": text(),
                "caption": text(),
                "captions": text(),
                "questions": text(),
            }
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(features),
            # Records stay in key order: record index == scene id (episodes refer to scene ids).
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(world_config=self.world_config.to_dict()),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        sizes = self.world_config.split_sizes()
        if self.builder_config.name == "scenes":
            return {s: scene_examples(self.world_config, s) for s in SCENE_SPLITS if s in sizes}
        return {s: clip_examples(self.world_config, s) for s in CLIP_SPLITS if s in sizes}

    def _generate_examples(self, **kwargs):
        raise NotImplementedError("examples come from _split_generators")


def decode_record(record: dict) -> dict:
    """A data-source record with Text decoded to str and JSON fields parsed.

    Raises:
      ValueError: when a text field is not UTF-8 or a JSON field does not parse.
    """
    decoded = {}
    for key, value in record.items():
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
                if key in JSON_FIELDS:
                    value = json.loads(value)
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise ValueError(f"record field {key!r} does not decode: {error}") from None
        decoded[key] = value
    return decoded
