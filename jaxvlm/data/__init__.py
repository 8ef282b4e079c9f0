"""Data: the synthetic world (tfds array_record), tokenizer, image preprocessing, grain pipelines.

`python -m jaxvlm.data.world` builds a world from the command line (`world.py` is the entry
point; the package does not import it, so running it as `__main__` loads it only once).
"""

from jaxvlm.data.builder import JaxvlmWorld, decode_record
from jaxvlm.data.chat import ChatTemplate, TokenizationMismatch
from jaxvlm.data.conversations import ConversationFormat
from jaxvlm.data.eval_sets import (
    PromptSet,
    RetrievalSet,
    batches,
    caption_prompts,
    eval_texts,
    retrieval_pairs,
    retrieval_set,
    vqa_prompts,
)
from jaxvlm.data.grammar import grammar_words
from jaxvlm.data.pipeline import AUGMENTATIONS, TASKS, TrainIterator, make_train_iterator
from jaxvlm.data.preprocessing import ImagePreprocessing, load_image
from jaxvlm.data.sources import RecordSource, TextSource, text_source
from jaxvlm.data.storage import World, build_world, load_world, open_world, write_world
from jaxvlm.data.tokenizer import WORLD_SPECIAL_TOKENS, Tokenizer, load_tokenizer, world_tokenizer
from jaxvlm.data.transforms import (
    AddLossMask,
    FlipSwappingLeftRight,
    NormalizeImage,
    PadTokens,
    PickCaption,
    RandomResizedCropKeepingObjects,
    SelectKeys,
    TokenizeText,
)
from jaxvlm.data.vocabulary import (
    BACKGROUNDS,
    COLOURS,
    DIRECTIONS,
    NUMBER_WORDS,
    POSITIONS,
    QUESTION_TYPES,
    RELATIONS,
    SHAPES,
    SIZES,
)
from jaxvlm.data.world_config import (
    CLIP_SPLITS,
    SCENE_SPLITS,
    TRAINING_SPLITS,
    WorldConfig,
)

__all__ = [
    "AUGMENTATIONS",
    "BACKGROUNDS",
    "CLIP_SPLITS",
    "COLOURS",
    "DIRECTIONS",
    "NUMBER_WORDS",
    "POSITIONS",
    "QUESTION_TYPES",
    "RELATIONS",
    "SCENE_SPLITS",
    "SHAPES",
    "SIZES",
    "TASKS",
    "TRAINING_SPLITS",
    "WORLD_SPECIAL_TOKENS",
    "AddLossMask",
    "ChatTemplate",
    "ConversationFormat",
    "FlipSwappingLeftRight",
    "ImagePreprocessing",
    "JaxvlmWorld",
    "PromptSet",
    "TokenizationMismatch",
    "caption_prompts",
    "vqa_prompts",
    "NormalizeImage",
    "PadTokens",
    "PickCaption",
    "RandomResizedCropKeepingObjects",
    "RecordSource",
    "SelectKeys",
    "TextSource",
    "TokenizeText",
    "Tokenizer",
    "TrainIterator",
    "World",
    "WorldConfig",
    "batches",
    "build_world",
    "decode_record",
    "eval_texts",
    "retrieval_set",
    "RetrievalSet",
    "grammar_words",
    "load_image",
    "load_world",
    "make_train_iterator",
    "open_world",
    "retrieval_pairs",
    "text_source",
    "load_tokenizer",
    "world_tokenizer",
    "write_world",
]
