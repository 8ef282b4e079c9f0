"""The full word list of the world's grammar: the tokenizer's vocabulary, independent of any seed.

It is the union of the vocabulary tables, every word of every text template (read from the
upper-case constants of `texts` and `instructions`), the words of the papers' prompt templates, and
common English words a person types when asking about an image, so that "What color is the circle?"
or "How many objects are there?" tokenize without an unknown word.
"""

from __future__ import annotations

import functools
import re
import unicodedata

from jaxvlm.data import instructions, texts, vocabulary

# Each is a token of its own (the tokenizer isolates punctuation).
PUNCTUATION: tuple[str, ...] = (".", ",", "?", "!", ":", ";", "'", '"', "-", "(", ")", "#", "/")
DIGIT_WORDS: tuple[str, ...] = tuple(str(number) for number in range(21))

# Prompts of the four papers (BLIP-2, Flamingo, LLaVA / Vicuna, PaLM2-VAdapter) and chat roles.
PROMPT_WORDS = """
question answer short output describe following given images exactly word visual tokens
a chat between curious human and an artificial intelligence assistant the gives helpful detailed
polite answers to human's questions user system gpt photo of
"""

# Common English words for questions and instructions about an image.
COMMON_WORDS = """
a an the this that these those there here it its they them their one ones some any all each every
no not none nothing something anything other another both either neither only also too very more
most less least many much few several lot lots number numbers amount count total
what which where when who whom whose why how whether if then than so because but or and nor yet
is are was were be been being am do does did done doing have has had having can could will would
shall should may might must let lets please thanks thank you your yours i me my we us our he she him
her his see seen saw look looks looking show shows showing shown tell say said says name named call
called find found give gave take put move moves moved moving go goes going went come comes
describe described describing description explain identify list mention point count answer ask
image images picture pictures photo photos scene scenes video videos clip clips frame frames
view visible shown depicted contain contains containing include includes including appear appears
object objects thing things item items shape shapes form figure figures
color colors colour colours colored coloured gray grey center centre middle background backgrounds
foreground side sides hand edge corner corners part area region place location position positions
left right top bottom up down upper lower above below over under beside next near nearest far
farther further furthest closest close closer between behind front inside outside within around
across along toward towards into onto from off out on in at by with without to for about of as
big bigger biggest small smaller smallest large larger largest little tiny huge size sizes same
different similar equal like unlike exactly about approximately
first second third fourth last next previous
yes no true false correct right wrong maybe
noisy noise dark light bright plain solid textured
direction directions way ways motion moving slides slide sliding travels travel traveling
travelling shift shifts moves still static stationary
word words sentence caption captions text question questions answer answers
kind kinds type types sort located situated positioned placed arranged shaped sized
isn aren wasn weren don doesn didn cannot couldn won wouldn shouldn t s re ve ll m d
""" + " ".join(vocabulary.NUMBER_WORDS)


def normalise(text: str) -> str:
    """Lower-case and strip accents, as the tokenizer's normalizer does."""
    decomposed = unicodedata.normalize("NFD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).lower()


def split_words(text: str) -> list[str]:
    """Words and single punctuation characters, as the tokenizer's pre-tokenizer splits them."""
    return re.findall(r"[a-z]+|[0-9]+|[^\sa-z0-9]", normalise(text))


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for key, item in value.items() for s in _strings(key) + _strings(item)]
    if isinstance(value, (tuple, list)):
        return [s for item in value for s in _strings(item)]
    return []


def _template_strings() -> list[str]:
    found = []
    for module in (vocabulary, texts, instructions):
        for name, value in vars(module).items():
            if name.isupper():
                found.extend(_strings(value))
    # Placeholders are filled from the tables above; drop "{name}", "<image>" and key underscores.
    return [re.sub(r"\{[a-z_]*\}|<image>|_", " ", text) for text in found]


@functools.cache
def grammar_words() -> tuple[str, ...]:
    """Every word and punctuation token any template can produce, sorted; seed-independent."""
    words = set(PUNCTUATION) | set(DIGIT_WORDS)
    for text in [*_template_strings(), PROMPT_WORDS, COMMON_WORDS]:
        words.update(split_words(text))
    return tuple(sorted(words))
