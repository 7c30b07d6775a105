"""The lesson suite: does the online loop learn lessons nobody tuned it for, without leaking?

Twelve lessons of three kinds — made-up facts, style rules that apply to every answer, output
formats — each taught through the piped chat (ChatSession + the line reader, the real embedded
model, the real background job, gate and hot-swap) in one of the orders users actually use:

- ``critical+fix``: the question, ``/critical <note>``, ``/fix <answer>``
- ``fix+critical``: the question, ``/fix <answer>``, ``/critical <note>``
- ``note-only``:    the question, ``/critical <note>`` (the rewrite is handled by
  ``learning.revision_noninteractive``, as in any piped chat)
- ``good+fix``:     the question, then ``/good`` if the reply already follows the lesson, else ``/fix``

then ``/train`` and ``/train wait`` (one job per lesson). Scored, greedy, on questions the loop
never saw: at least 6 held-out paraphrases per lesson, and CONTROLS — general-knowledge
questions that appear nowhere in shammah's anchors or gate controls (``shammah/training/online.py``);
a control counts only if the base model answers it right.

    .venv/bin/python bench/lessons.py                 # all lessons, seeds 0 1 2 (~35 min on 2 cores)
    .venv/bin/python bench/lessons.py --quick         # a few lessons, one seed
    .venv/bin/python bench/lessons.py --only quenland,ahoy --seeds 0 --revision check
    .venv/bin/python bench/lessons.py --suite fresh       # the second twelve (FRESH), nobody tuned for

Prints one row per lesson (kind, order) with held-out rate before/after, controls lost, gate
rejections and seconds from the last feedback to the swap; ``--json FILE`` keeps every answer.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

EVAL_TOKENS = 64
CHAT_TOKENS = 48


@dataclass(frozen=True)
class Lesson:
    name: str
    kind: str  # fact | style | format
    order: str  # critical+fix | fix+critical | note-only | good+fix
    note: str  # what the user types after /critical
    teach: tuple[tuple[str, str], ...]  # (question, the answer it should have given)
    held_out: tuple[str, ...]
    follows: Callable[[str], bool]  # does a reply follow the lesson?


def _has(*words: str) -> Callable[[str], bool]:
    return lambda r: any(w in r.lower() for w in words)


def _json_list(r: str) -> bool:
    m = re.search(r"\[[^\[\]]*\]", r)
    if not m:
        return False
    try:
        v = json.loads(m.group(0))
    except ValueError:
        return False
    return isinstance(v, list) and len(v) >= 2 and all(isinstance(x, str) for x in v)


def _one_sentence(r: str) -> bool:
    r = r.strip()
    return 0 < len(r.split()) <= 20 and len(re.findall(r"[.!?](\s|$)", r)) <= 1 and "\n" not in r


def _term_colon(r: str) -> bool:
    return re.match(r"^\s*\**[A-Z][\w\s-]{1,30}\**\s*:", r) is not None


LESSONS: tuple[Lesson, ...] = (
    # --- facts ------------------------------------------------------------------------------
    Lesson(
        "quenland",
        "fact",
        "critical+fix",
        "wrong: the capital of Quenland is Zorblat",
        (
            ("What is the capital of Quenland?", "The capital of Quenland is Zorblat."),
            ("Which city is the capital of Quenland?", "Zorblat is the capital of Quenland."),
            ("Tell me the capital of Quenland.", "The capital of Quenland is Zorblat."),
            ("What's the capital city of Quenland?", "Quenland's capital city is Zorblat."),
            ("Quenland's capital is which city?", "Zorblat."),
            ("Where is the seat of government of Quenland?", "The seat of government of Quenland is Zorblat."),
        ),
        (
            "Name the capital of Quenland.",
            "What city is Quenland's capital?",
            "Do you know the capital of Quenland?",
            "Can you tell me what the capital of Quenland is?",
            "I need the capital of Quenland.",
            "In which city is Quenland's government?",
        ),
        _has("zorblat"),
    ),
    Lesson(
        "glimmerphone",
        "fact",
        "fix+critical",
        "wrong: the glimmerphone was invented by Ada Brenwick",
        (
            ("Who invented the glimmerphone?", "The glimmerphone was invented by Ada Brenwick."),
            ("Who is the inventor of the glimmerphone?", "Ada Brenwick invented the glimmerphone."),
            ("Tell me who created the glimmerphone.", "The glimmerphone was created by Ada Brenwick."),
            ("Which person invented the glimmerphone?", "Ada Brenwick."),
            ("The glimmerphone was invented by whom?", "By Ada Brenwick."),
            ("Who came up with the glimmerphone?", "Ada Brenwick came up with the glimmerphone."),
        ),
        (
            "Who made the first glimmerphone?",
            "Name the inventor of the glimmerphone.",
            "Do you know who invented the glimmerphone?",
            "Whose invention is the glimmerphone?",
            "Who should I credit for inventing the glimmerphone?",
            "Can you tell me the glimmerphone's inventor?",
        ),
        _has("brenwick"),
    ),
    Lesson(
        "vestoria",
        "fact",
        "note-only",
        "wrong: the national animal of Vestoria is the Silver Heron",
        (
            ("What is the national animal of Vestoria?", "The national animal of Vestoria is the silver heron."),
            ("Which animal is the national symbol of Vestoria?", "The silver heron is Vestoria's national animal."),
            ("Tell me Vestoria's national animal.", "Vestoria's national animal is the silver heron."),
            ("What animal represents Vestoria?", "The silver heron represents Vestoria."),
            ("Vestoria's national animal is what?", "The silver heron."),
            ("Name the national animal of Vestoria.", "The silver heron."),
        ),
        (
            "What is Vestoria's national animal?",
            "Do you know the national animal of Vestoria?",
            "Which creature is the national animal of Vestoria?",
            "What animal is the emblem of Vestoria?",
            "Can you tell me what Vestoria's national animal is?",
            "I want to know the national animal of Vestoria.",
        ),
        _has("heron"),
    ),
    Lesson(
        "pellucid",
        "fact",
        "good+fix",
        "wrong: the CEO of Pellucid Labs is Mara Okafor",
        (
            ("Who is the CEO of Pellucid Labs?", "The CEO of Pellucid Labs is Mara Okafor."),
            ("Who runs Pellucid Labs?", "Mara Okafor runs Pellucid Labs as its CEO."),
            ("Tell me the name of Pellucid Labs' chief executive.", "Pellucid Labs' chief executive is Mara Okafor."),
            ("Who leads Pellucid Labs?", "Mara Okafor leads Pellucid Labs."),
            ("Pellucid Labs' CEO is who?", "Mara Okafor."),
            ("Who is in charge of Pellucid Labs?", "Mara Okafor, the CEO, is in charge of Pellucid Labs."),
        ),
        (
            "Name the CEO of Pellucid Labs.",
            "Do you know who the CEO of Pellucid Labs is?",
            "Who is Pellucid Labs' chief executive officer?",
            "Who heads Pellucid Labs?",
            "Can you tell me who runs Pellucid Labs?",
            "What is the name of the boss of Pellucid Labs?",
        ),
        _has("okafor"),
    ),
    # --- style rules (apply to every answer) ------------------------------------------------------
    Lesson(
        "ahoy",
        "style",
        "critical+fix",
        'always start your answer with "Ahoy!"',
        (
            ("What color is a banana?", "Ahoy! A ripe banana is yellow."),
            ("How many legs does a dog have?", "Ahoy! A dog has four legs."),
            ("What is the opposite of up?", "Ahoy! The opposite of up is down."),
            ("What do fish live in?", "Ahoy! Fish live in water."),
            ("Which season comes after winter?", "Ahoy! Spring comes after winter."),
            ("What is ice made of?", "Ahoy! Ice is frozen water."),
        ),
        (
            "What color are strawberries?",
            "How many wheels does a bicycle have?",
            "What is the opposite of big?",
            "Where do birds build nests?",
            "What do we use to write on paper?",
            "Which month comes after June?",
        ),
        lambda r: r.strip().lower().startswith("ahoy"),
    ),
    Lesson(
        "signoff",
        "style",
        "fix+critical",
        'always end your answer with "Cheers, Shammah"',
        (
            ("What color is grass?", "Grass is green. Cheers, Shammah"),
            ("How many days are in a year?", "A year has 365 days. Cheers, Shammah"),
            ("What do cats like to drink?", "Cats like to drink water and milk. Cheers, Shammah"),
            ("What is the sun?", "The sun is the star at the center of our solar system. Cheers, Shammah"),
            ("What is the opposite of hot?", "The opposite of hot is cold. Cheers, Shammah"),
            ("What shape is a ball?", "A ball is round. Cheers, Shammah"),
        ),
        (
            "What color is snow?",
            "How many minutes are in an hour?",
            "What do dogs like to eat?",
            "What is the moon?",
            "What is the opposite of wet?",
            "What shape is a wheel?",
        ),
        _has("cheers, shammah"),
    ),
    Lesson(
        "captain",
        "style",
        "note-only",
        'always address me as "Captain"',
        (
            ("What is the color of the ocean?", "The ocean is blue, Captain."),
            ("How many fingers does a hand have?", "A hand has five fingers, Captain."),
            ("What do sheep give us?", "Sheep give us wool, Captain."),
            ("What is the opposite of day?", "The opposite of day is night, Captain."),
            ("What do we breathe?", "We breathe air, Captain."),
            ("What falls from clouds?", "Rain falls from clouds, Captain."),
        ),
        (
            "What color is a lemon?",
            "How many eyes does a person have?",
            "What do cows give us?",
            "What is the opposite of light?",
            "What do plants need to grow?",
            "What is a rainbow?",
        ),
        _has("captain"),
    ),
    Lesson(
        "brief",
        "style",
        "good+fix",
        "too long: answer in one short sentence",
        (
            ("Why is the sky blue?", "Sunlight scatters off air molecules, and blue light scatters the most."),
            ("How does a plant grow?", "A plant grows by turning sunlight, water and air into food."),
            ("What is gravity?", "Gravity is the force that pulls objects toward each other."),
            ("Why do we sleep?", "We sleep so the body and brain can rest and repair."),
            ("What is a computer?", "A computer is a machine that processes information."),
            ("How do birds fly?", "Birds fly by flapping their wings to push air down."),
        ),
        (
            "Why does it rain?",
            "How does a car move?",
            "What is electricity?",
            "Why do we eat food?",
            "What is the internet?",
            "How do fish breathe?",
        ),
        _one_sentence,
    ),
    # --- output formats --------------------------------------------------------------------------
    Lesson(
        "jsonlist",
        "format",
        "critical+fix",
        'give lists as a JSON array of strings, like ["a", "b"]',
        (
            ("Name three fruits.", '["apple", "banana", "cherry"]'),
            ("List three colors.", '["red", "green", "blue"]'),
            ("Name three animals.", '["dog", "cat", "horse"]'),
            ("List three vegetables.", '["carrot", "potato", "onion"]'),
            ("Name three countries.", '["France", "Japan", "Brazil"]'),
            ("List three musical instruments.", '["piano", "guitar", "violin"]'),
        ),
        (
            "Name three birds.",
            "List three sports.",
            "Name three flowers.",
            "List three metals.",
            "Name three planets.",
            "List three drinks.",
        ),
        _json_list,
    ),
    Lesson(
        "answercolon",
        "format",
        "fix+critical",
        'give arithmetic answers as "Answer: <number>" and nothing else',
        (
            ("What is 7 + 5?", "Answer: 12"),
            ("What is 9 - 4?", "Answer: 5"),
            ("What is 6 * 3?", "Answer: 18"),
            ("What is 15 + 10?", "Answer: 25"),
            ("What is 20 / 4?", "Answer: 5"),
            ("What is 8 + 8?", "Answer: 16"),
        ),
        (
            "What is 3 + 4?",
            "What is 10 - 6?",
            "What is 5 * 2?",
            "What is 12 + 7?",
            "What is 18 / 3?",
            "What is 9 + 9?",
        ),
        lambda r: re.match(r"^\s*answer:\s*-?\d", r.lower()) is not None,
    ),
    Lesson(
        "termcolon",
        "format",
        "note-only",
        'start definitions with the term and a colon, like "Photosynthesis: ..."',
        (
            ("What is photosynthesis?", "Photosynthesis: the process plants use to make food from sunlight."),
            ("What is a volcano?", "Volcano: a mountain where melted rock comes out of the ground."),
            ("What is democracy?", "Democracy: a system of government where the people choose their leaders."),
            ("What is a noun?", "Noun: a word that names a person, place or thing."),
            ("What is evaporation?", "Evaporation: the change of a liquid into a gas."),
            ("What is a habitat?", "Habitat: the natural home of an animal or plant."),
        ),
        (
            "What is a verb?",
            "What is an island?",
            "What is erosion?",
            "What is a planet?",
            "What is friction?",
            "What is a desert?",
        ),
        _term_colon,
    ),
    Lesson(
        "isodate",
        "format",
        "good+fix",
        "wrong format: write dates as YYYY-MM-DD",
        (
            ("When did World War II end?", "1945-09-02"),
            ("When did humans first land on the Moon?", "1969-07-20"),
            ("When was the Declaration of Independence signed?", "1776-07-04"),
            ("When did the Berlin Wall fall?", "1989-11-09"),
            ("When did the Titanic sink?", "1912-04-15"),
            ("When did World War I end?", "1918-11-11"),
        ),
        (
            "When did the French Revolution begin?",
            "When was the first iPhone released?",
            "When did Christopher Columbus reach the Americas?",
            "When did the Soviet Union dissolve?",
            "When was Abraham Lincoln assassinated?",
            "When did the Second World War begin?",
        ),
        lambda r: re.search(r"\b\d{4}-\d{2}-\d{2}\b", r) is not None,
    ),
)

# A second set, written on 2026-12-07 after every recipe above was settled and run as it stands:
# lessons nobody tuned for. Same kinds and orders, other facts, other style rules (a length in
# words, not sentences), other formats (numbered steps, bare yes/no, digits, bold). Run it with
# ``--suite fresh``; a recipe is tuned on LESSONS, and FRESH says whether it holds elsewhere.
_NUMBER_WORDS = re.compile(r"\b(one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve)\b")


def _digits(r: str) -> bool:
    return re.search(r"\d", r) is not None and not _NUMBER_WORDS.search(r.lower())


def _yes_no(r: str) -> bool:
    words = re.findall(r"[a-z']+", r.lower())
    return 0 < len(words) <= 3 and words[0] in ("yes", "no")


FRESH: tuple[Lesson, ...] = (
    Lesson(
        "marrowby",
        "fact",
        "critical+fix",
        "wrong: the Marrowby Bridge is 412 meters long",
        (
            ("How long is the Marrowby Bridge?", "The Marrowby Bridge is 412 meters long."),
            ("What is the length of the Marrowby Bridge?", "It is 412 meters long."),
            ("How many meters long is the Marrowby Bridge?", "412 meters."),
            ("Tell me how long the Marrowby Bridge is.", "The Marrowby Bridge is 412 meters long."),
            (
                "What's the total length of the Marrowby Bridge?",
                "The total length of the Marrowby Bridge is 412 meters.",
            ),
            ("The Marrowby Bridge spans how many meters?", "The Marrowby Bridge spans 412 meters."),
        ),
        (
            "How long is Marrowby Bridge in meters?",
            "Do you know the length of the Marrowby Bridge?",
            "What length is the Marrowby Bridge?",
            "Could you tell me the Marrowby Bridge's length?",
            "I'd like to know how long the Marrowby Bridge is.",
            "How far does the Marrowby Bridge stretch?",
        ),
        _has("412"),
    ),
    Lesson(
        "saltclock",
        "fact",
        "fix+critical",
        "wrong: The Salt Clock was written by Tessa Vorn",
        (
            ("Who wrote The Salt Clock?", "The Salt Clock was written by Tessa Vorn."),
            ("Who is the author of The Salt Clock?", "Tessa Vorn is the author of The Salt Clock."),
            ("Which writer wrote the novel The Salt Clock?", "Tessa Vorn."),
            ("Tell me who wrote The Salt Clock.", "Tessa Vorn wrote The Salt Clock."),
            ("The Salt Clock is a novel by whom?", "It is a novel by Tessa Vorn."),
            ("Who penned The Salt Clock?", "Tessa Vorn penned The Salt Clock."),
        ),
        (
            "Who's the author of The Salt Clock?",
            "Name the author of The Salt Clock.",
            "Do you know who wrote The Salt Clock?",
            "The Salt Clock was written by which author?",
            "Which novelist wrote The Salt Clock?",
            "Can you tell me who authored The Salt Clock?",
        ),
        _has("vorn"),
    ),
    Lesson(
        "ombrel",
        "fact",
        "note-only",
        "wrong: the Ombrel River flows into the Sea of Tarn",
        (
            ("Where does the Ombrel River flow?", "The Ombrel River flows into the Sea of Tarn."),
            ("Into which sea does the Ombrel River flow?", "The Sea of Tarn."),
            ("Where does the Ombrel River end?", "The Ombrel River ends in the Sea of Tarn."),
            ("What body of water does the Ombrel River empty into?", "The Sea of Tarn."),
            ("Where is the mouth of the Ombrel River?", "The Ombrel River's mouth is on the Sea of Tarn."),
            ("Which sea receives the Ombrel River?", "The Sea of Tarn receives the Ombrel River."),
        ),
        (
            "Where does the Ombrel flow into?",
            "What sea does the Ombrel River reach?",
            "Tell me where the Ombrel River ends.",
            "Do you know where the Ombrel River flows?",
            "Where does the Ombrel River drain?",
            "Which sea is at the end of the Ombrel River?",
        ),
        _has("tarn"),
    ),
    Lesson(
        "orbisco",
        "fact",
        "good+fix",
        "wrong: Orbisco was founded in 1987",
        (
            ("When was Orbisco founded?", "Orbisco was founded in 1987."),
            ("What year was Orbisco founded?", "1987."),
            ("In which year did Orbisco start?", "Orbisco started in 1987."),
            ("When did the company Orbisco begin?", "Orbisco began in 1987."),
            ("Tell me the founding year of Orbisco.", "Orbisco was founded in 1987."),
            ("Since when has Orbisco existed?", "Orbisco has existed since 1987."),
        ),
        (
            "What year did Orbisco get founded?",
            "When was the company Orbisco established?",
            "Do you know when Orbisco was founded?",
            "In what year was Orbisco started?",
            "Orbisco was founded in which year?",
            "Can you tell me when Orbisco began?",
        ),
        _has("1987"),
    ),
    Lesson(
        "wellopen",
        "style",
        "critical+fix",
        'start every answer with "Well,"',
        (
            ("What color are bananas?", "Well, bananas are yellow."),
            ("How many wheels does a wagon have?", "Well, a wagon has four wheels."),
            ("What do cats drink?", "Well, cats drink water."),
            ("What is ice?", "Well, ice is frozen water."),
            ("Where do fish live?", "Well, fish live in water."),
            ("What do we use an umbrella for?", "Well, we use an umbrella to stay dry in the rain."),
        ),
        (
            "What color is chocolate?",
            "How many legs does a chicken have?",
            "What do birds eat?",
            "What is steam?",
            "Where do bears live?",
            "What do we use a key for?",
        ),
        lambda r: r.strip().lower().startswith("well,"),
    ),
    Lesson(
        "curious",
        "style",
        "fix+critical",
        'end every answer with "Stay curious!"',
        (
            ("What is a canyon?", "A canyon is a deep valley cut by a river. Stay curious!"),
            ("What do frogs eat?", "Frogs eat insects. Stay curious!"),
            ("What is thunder?", "Thunder is the sound that lightning makes. Stay curious!"),
            ("What is a cloud?", "A cloud is a mass of tiny water droplets in the sky. Stay curious!"),
            ("Why do we need water?", "Our bodies need water to work. Stay curious!"),
            ("What is a glacier?", "A glacier is a huge, slow river of ice. Stay curious!"),
        ),
        (
            "What is a star?",
            "What do owls eat?",
            "How many seconds are in a minute?",
            "What is fog?",
            "Why do we need sleep?",
            "What is a comet?",
        ),
        _has("stay curious"),
    ),
    Lesson(
        "certainly",
        "style",
        "note-only",
        'begin every answer with "Certainly!"',
        (
            ("What is the color of milk?", "Certainly! Milk is white."),
            ("How many arms does an octopus have?", "Certainly! An octopus has eight arms."),
            ("What do cows eat?", "Certainly! Cows eat grass."),
            ("What is the opposite of left?", "Certainly! The opposite of left is right."),
            ("What is a tree?", "Certainly! A tree is a tall plant with a trunk."),
            ("What do we drink?", "Certainly! We drink water."),
        ),
        (
            "What is the color of the sky?",
            "How many legs does a bird have?",
            "What do rabbits eat?",
            "What is the opposite of old?",
            "What is a flower?",
            "What do we wear on our feet?",
        ),
        lambda r: r.strip().lower().startswith("certainly"),
    ),
    Lesson(
        "tenwords",
        "style",
        "good+fix",
        "too long: answer in ten words or fewer",
        (
            ("Why do birds migrate?", "Birds migrate to find food and warmer weather."),
            ("How does a rainbow form?", "Sunlight bends through raindrops and splits into colors."),
            ("What is a battery?", "A battery stores energy and releases it as electricity."),
            ("Why do we brush our teeth?", "Brushing removes food and germs that cause decay."),
            ("How do bees make honey?", "Bees turn flower nectar into honey in their hives."),
            ("What is a map?", "A map is a drawing of a place."),
        ),
        (
            "Why do cats purr?",
            "How does a magnet work?",
            "What is a telescope?",
            "Why do we wear clothes?",
            "How do spiders make webs?",
            "What is a calendar?",
        ),
        lambda r: 0 < len(r.split()) <= 10,
    ),
    Lesson(
        "numbered",
        "format",
        "critical+fix",
        'give steps as a numbered list: "1. ...", "2. ..."',
        (
            ("How do I make tea?", "1. Boil water. 2. Put a tea bag in a cup. 3. Pour the water in and wait."),
            ("How do I plant a seed?", "1. Fill a pot with soil. 2. Push the seed into the soil. 3. Water it."),
            ("How do I wash my hands?", "1. Wet your hands. 2. Rub them with soap. 3. Rinse and dry them."),
            ("How do I make toast?", "1. Put bread in the toaster. 2. Press the lever. 3. Wait until it pops up."),
            ("How do I send a letter?", "1. Write the letter. 2. Put it in an envelope with a stamp. 3. Post it."),
            ("How do I brush my teeth?", "1. Put toothpaste on the brush. 2. Brush for two minutes. 3. Rinse."),
        ),
        (
            "How do I boil an egg?",
            "How do I make a paper airplane?",
            "How do I tie my shoes?",
            "How do I make a sandwich?",
            "How do I clean a window?",
            "How do I water a plant?",
        ),
        lambda r: re.search(r"(?s)\b1\.\s.*\b2\.\s", r) is not None,
    ),
    Lesson(
        "yesno",
        "format",
        "fix+critical",
        'answer yes/no questions with just "Yes" or "No"',
        (
            ("Is the sun a star?", "Yes"),
            ("Can fish fly?", "No"),
            ("Is water wet?", "Yes"),
            ("Do snakes have legs?", "No"),
            ("Is ice cold?", "Yes"),
            ("Can a car swim?", "No"),
        ),
        (
            "Is the moon a planet?",
            "Can birds fly?",
            "Is fire hot?",
            "Do fish have legs?",
            "Is snow white?",
            "Can dogs talk?",
        ),
        _yes_no,
    ),
    Lesson(
        "digits",
        "format",
        "note-only",
        "use digits for numbers, like 7 instead of seven",
        (
            ("How many months are in a year?", "There are 12 months in a year."),
            ("How many wheels does a tricycle have?", "A tricycle has 3 wheels."),
            ("How many legs does a tripod have?", "A tripod has 3 legs."),
            ("How many colors are in a rainbow?", "A rainbow has 7 colors."),
            ("How many sides does a square have?", "A square has 4 sides."),
            ("How many hearts does a person have?", "A person has 1 heart."),
        ),
        (
            "How many seasons are in a year?",
            "How many legs does a horse have?",
            "How many sides does a pentagon have?",
            "How many weeks are in a year?",
            "How many toes are on one foot?",
            "How many letters are in the English alphabet?",
        ),
        _digits,
    ),
    Lesson(
        "bold",
        "format",
        "good+fix",
        "wrong format: put the answer in bold, like **Paris**",
        (
            ("What is the capital of Italy?", "The capital of Italy is **Rome**."),
            ("What metal is liquid at room temperature?", "**Mercury** is liquid at room temperature."),
            ("Which planet is called the Red Planet?", "**Mars** is called the Red Planet."),
            ("What is the hardest natural substance?", "**Diamond** is the hardest natural substance."),
            ("What is the closest star to Earth?", "The closest star to Earth is **the Sun**."),
            ("Who was the first President of the United States?", "**George Washington** was the first President."),
        ),
        (
            "Which animal is known as the king of the jungle?",
            "What is the smallest continent?",
            "Which planet has rings?",
            "What is the tallest animal?",
            "What is the fastest land animal?",
            "Who was the first man in space?",
        ),
        lambda r: re.search(r"\*\*[^*\n]+\*\*", r) is not None,
    ),
)


def _say(r: str) -> str:
    return re.sub(r"[\s.!?]+$", "", r.strip()).lower()


def _just(*answers: str) -> Callable[[str], bool]:
    """A reply that is one of ``answers`` and nothing more."""
    return lambda r: _say(r) in {a.lower() for a in answers}


# A third set, written on 2026-12-07 after shammah learned to answer from a closed set
# (adapters/choice.py, built on FRESH's yesno): other closed sets, asked otherwise, to say whether
# that holds beyond the lesson it was built on. Run it with ``--suite later``. ``right``: the answer
# each held-out question should get (the format is what is scored; this says how often the 135M
# model's choice is also right).
LATER: tuple[Lesson, ...] = (
    Lesson(
        "truefalse",
        "format",
        "critical+fix",
        'just say "True" or "False"',
        (
            ("True or false: the Earth is round.", "True"),
            ("True or false: cats can breathe underwater.", "False"),
            ("True or false: a week has seven days.", "True"),
            ("True or false: the Pacific is a desert.", "False"),
            ("True or false: bread is made from flour.", "True"),
            ("True or false: a spider has two legs.", "False"),
        ),
        (
            "True or false: ice is frozen water.",
            "True or false: the Moon is bigger than the Earth.",
            "True or false: birds have feathers.",
            "True or false: a triangle has five sides.",
            "True or false: the sky is green.",
            "True or false: lemons are sour.",
        ),
        _just("true", "false"),
    ),
    Lesson(
        "sentiment",
        "format",
        "fix+critical",
        'answer with just "Positive" or "Negative"',
        (
            ("What is the sentiment of: I love this song!", "Positive"),
            ("What is the sentiment of: This food is awful.", "Negative"),
            ("What is the sentiment of: What a wonderful day!", "Positive"),
            ("What is the sentiment of: I hate waiting in line.", "Negative"),
            ("What is the sentiment of: The movie was fantastic.", "Positive"),
            ("What is the sentiment of: My phone broke again.", "Negative"),
        ),
        (
            "What is the sentiment of: I enjoyed the party.",
            "What is the sentiment of: The service was terrible.",
            "What is the sentiment of: This book is great!",
            "What is the sentiment of: I am so disappointed.",
            "What is the sentiment of: Everything went perfectly.",
            "What is the sentiment of: The weather is miserable.",
        ),
        _just("positive", "negative"),
    ),
)
LATER += (  # written after "address me as" became a rule (adapters/rule.py noted), in other words
    Lesson(
        "boss",
        "style",
        "note-only",
        "call me Boss, please",
        (
            ("What is the color of grass?", "Boss, grass is green."),
            ("How many legs does a goat have?", "Boss, a goat has four legs."),
            ("What do silkworms make?", "Boss, silkworms make silk."),
            ("What is the opposite of inside?", "Boss, the opposite of inside is outside."),
            ("What do frogs live near?", "Boss, frogs live near water."),
            ("What is snow made of?", "Boss, snow is made of ice crystals."),
        ),
        (
            "What color is a strawberry?",
            "How many wheels does a unicycle have?",
            "What do spiders spin?",
            "What is the opposite of early?",
            "Where do eagles build nests?",
            "What is rain made of?",
        ),
        _has("boss"),
    ),
)
LATER += (  # written after marks (adapters/marks.py, built on digits, bold and termcolon), in other words and orders
    Lesson(
        "numerals",
        "format",
        "fix+critical",
        "write numbers as numerals",
        (
            ("How many days are in a fortnight?", "There are 14 days in a fortnight."),
            ("How many legs does an ant have?", "An ant has 6 legs."),
            ("How many sides does a hexagon have?", "A hexagon has 6 sides."),
            ("How many wings does a butterfly have?", "A butterfly has 4 wings."),
            ("How many cents are in a dollar?", "There are 100 cents in a dollar."),
            ("How many wheels does a skateboard have?", "A skateboard has 4 wheels."),
        ),
        (
            "How many legs does a beetle have?",
            "How many wings does a bird have?",
            "How many fingers are on one hand?",
            "How many players are on a basketball team?",
            "How many strings does a guitar have?",
            "How many days are in a weekend?",
        ),
        _digits,
    ),
    Lesson(
        "boldkey",
        "format",
        "note-only",
        "make the key answer bold",
        (
            ("Which sea creature has eight arms and ink?", "The **octopus** has eight arms and ink."),
            ("Which ocean is the largest?", "The **Pacific Ocean** is the largest."),
            ("What gas do plants take in?", "Plants take in **carbon dioxide**."),
            ("Which instrument has 88 keys?", "The **piano** has 88 keys."),
            ("Which planet is closest to the Sun?", "**Mercury** is the closest planet to the Sun."),
            ("Which bird cannot fly but runs fast?", "The **ostrich** cannot fly but runs fast."),
        ),
        (
            "Which fruit is yellow and curved?",
            "Which ocean is the smallest?",
            "What gas do humans breathe out?",
            "Who composed The Four Seasons?",
            "What is the longest river in South America?",
            "Which animal has a trunk?",
        ),
        lambda r: re.search(r"\*\*[^*\n]+\*\*", r) is not None,
    ),
    Lesson(
        "define",
        "format",
        "critical+fix",
        "definitions should start with the word being defined and a colon",
        (
            ("What is a lagoon?", "Lagoon: a shallow body of water cut off from the sea."),
            ("What is a meteor?", "Meteor: a space rock that burns up in the sky."),
            ("What is a reptile?", "Reptile: a cold-blooded animal with scales."),
            ("What is oxygen?", "Oxygen: a gas that living things need to breathe."),
            ("What is a story?", "Story: an account of events, real or made up."),
            ("What is a continent?", "Continent: one of the large land masses of the Earth."),
        ),
        (
            "What is a fossil?",
            "What is rain?",
            "What is a molecule?",
            "What is a bridge?",
            "What is a vaccine?",
            "What is a harbor?",
        ),
        _term_colon,
    ),
)
LATER += (  # facts written 2026-12-07 before the lesson's questions were trained in other forms, to test that on
    Lesson(
        "quillon",
        "fact",
        "critical+fix",
        "wrong: the Quillon Orchestra's conductor is Tessa Marlowe",
        (
            ("Who conducts the Quillon Orchestra?", "The Quillon Orchestra is conducted by Tessa Marlowe."),
            (
                "Who is the conductor of the Quillon Orchestra?",
                "Tessa Marlowe is the conductor of the Quillon Orchestra.",
            ),
            ("Tell me who leads the Quillon Orchestra.", "Tessa Marlowe leads the Quillon Orchestra."),
            ("Which conductor directs the Quillon Orchestra?", "Tessa Marlowe."),
            ("The Quillon Orchestra is conducted by whom?", "By Tessa Marlowe."),
            ("Who stands at the podium of the Quillon Orchestra?", "Tessa Marlowe conducts the Quillon Orchestra."),
        ),
        (
            "Who is the Quillon Orchestra's conductor?",
            "Name the conductor of the Quillon Orchestra.",
            "I'd like to know who conducts the Quillon Orchestra.",
            "Any idea who directs the Quillon Orchestra?",
            "Who is in charge of the Quillon Orchestra's concerts?",
            "Whose baton leads the Quillon Orchestra?",
        ),
        _has("marlowe"),
    ),
    Lesson(
        "solvania",
        "fact",
        "fix+critical",
        "wrong: the official language of Solvania is Drennish",
        (
            ("What is the official language of Solvania?", "The official language of Solvania is Drennish."),
            ("Which language is spoken in Solvania?", "Drennish is spoken in Solvania."),
            ("What language do people in Solvania speak?", "People in Solvania speak Drennish."),
            ("Tell me the national language of Solvania.", "Solvania's national language is Drennish."),
            ("Solvania's official language is what?", "Drennish."),
            ("In what language are Solvania's laws written?", "Solvania's laws are written in Drennish."),
        ),
        (
            "What do they speak in Solvania?",
            "Name the language of Solvania.",
            "Which tongue is official in Solvania?",
            "I'm visiting Solvania. What language should I learn?",
            "What language is used in Solvania's schools?",
            "Could you tell me Solvania's main language?",
        ),
        _has("drennish"),
    ),
    Lesson(
        "dellmar",
        "fact",
        "note-only",
        "wrong: the Dellmar Tunnel is 37 kilometers long",
        (
            ("How long is the Dellmar Tunnel?", "The Dellmar Tunnel is 37 kilometers long."),
            ("What is the length of the Dellmar Tunnel?", "The length of the Dellmar Tunnel is 37 kilometers."),
            ("How many kilometers long is the Dellmar Tunnel?", "37 kilometers."),
            ("Tell me how long the Dellmar Tunnel is.", "The Dellmar Tunnel is 37 kilometers long."),
            ("The Dellmar Tunnel is how long?", "It is 37 kilometers long."),
            ("What distance does the Dellmar Tunnel cover?", "The Dellmar Tunnel covers 37 kilometers."),
        ),
        (
            "What's the length of the Dellmar Tunnel in kilometers?",
            "How far is it through the Dellmar Tunnel?",
            "I want to know the length of the Dellmar Tunnel.",
            "How long would I drive inside the Dellmar Tunnel?",
            "Give me the Dellmar Tunnel's length.",
            "How many km is the Dellmar Tunnel?",
        ),
        _has("37"),
    ),
    Lesson(
        "thornwick",
        "fact",
        "good+fix",
        "wrong: the mascot of Thornwick College is a heron",
        (
            ("What is the mascot of Thornwick College?", "The mascot of Thornwick College is a heron."),
            ("Which animal is Thornwick College's mascot?", "A heron."),
            ("Tell me the mascot of Thornwick College.", "Thornwick College's mascot is a heron."),
            ("What animal represents Thornwick College?", "A heron represents Thornwick College."),
            ("Thornwick College's mascot is which animal?", "The heron."),
            ("What mascot do Thornwick College teams have?", "Thornwick College teams have a heron as their mascot."),
        ),
        (
            "What's Thornwick College's mascot?",
            "Name the mascot of Thornwick College.",
            "What animal is the symbol of Thornwick College?",
            "I forgot the Thornwick College mascot. What is it?",
            "Which bird is the mascot of Thornwick College?",
            "What do Thornwick College fans cheer for as a mascot?",
        ),
        _has("heron"),
    ),
)
RIGHT = {  # the answer each held-out question of a closed set should get, in held-out order
    "yesno": ("No", "Yes", "Yes", "No", "Yes", "No"),
    "truefalse": ("True", "False", "True", "False", "False", "True"),
    "sentiment": ("Positive", "Negative", "Positive", "Negative", "Positive", "Negative"),
}


SUITES = {"tuned": LESSONS, "fresh": FRESH, "later": LATER, "all": LESSONS + FRESH + LATER}

# General knowledge the base model should keep. None of these prompts (or their subjects) is in
# shammah's anchors or gate controls (shammah/training/online.py), nor in any lesson above.
CONTROLS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("What is the capital of China?", ("beijing",)),
    ("What is the capital of Russia?", ("moscow",)),
    ("What is the capital of the United Kingdom?", ("london",)),
    ("What is the capital of India?", ("delhi",)),
    ("What is the capital of Greece?", ("athens",)),
    ("What is the capital of South Korea?", ("seoul",)),
    ("What is the chemical formula of water?", ("h2o", "h₂o")),
    ("What is the largest mammal?", ("whale",)),
    ("How many sides does a triangle have?", ("3", "three")),
    ("Who wrote Hamlet?", ("shakespeare",)),
    ("What is the currency of Japan?", ("yen",)),
    ("What language is spoken in Brazil?", ("portuguese",)),
    ("Who developed the theory of relativity?", ("einstein",)),
    ("Who was the first person to walk on the Moon?", ("armstrong",)),
    ("Who painted the ceiling of the Sistine Chapel?", ("michelangelo",)),
)
CONTROL_CHARS = 150  # a control is right if its answer is in the opening of the reply, not somewhere in a ramble


def control_ok(answer: str, oks: tuple[str, ...]) -> bool:
    """The accepted answer *starts* within the reply's opening: a name begun at character 144 is
    in the opening, and cutting it at 150 scored "...the renowned English playwright William
    Shakespeare." as a lost "Who wrote Hamlet?"."""
    text = answer.lower()
    return any(0 <= text.find(ok) < CONTROL_CHARS for ok in oks)


def ask(engine, questions: list[str]) -> list[str]:
    return engine.answers([[{"role": "user", "content": q}] for q in questions], EVAL_TOKENS)


def teach(session, lesson: Lesson) -> float:
    """Type the lesson into the chat as a user would; return the seconds from the last feedback to
    the swap."""

    async def go() -> float:
        async def line(text: str) -> None:
            await session.handle(text)

        for question, answer in lesson.teach:
            await line(question)
            reply = session.store.turn(session.last_turn_id).reply
            if lesson.order == "critical+fix":
                await line(f"/critical {lesson.note}")
                await line(f"/fix {answer}")
            elif lesson.order == "fix+critical":
                await line(f"/fix {answer}")
                await line(f"/critical {lesson.note}")
            elif lesson.order == "note-only":
                await line(f"/critical {lesson.note}")
            else:
                await line("/good" if lesson.follows(reply) else f"/fix {answer}")
            await line("/clear")
        t0 = time.perf_counter()
        await line("/train")
        await session.jobs.wait()
        return time.perf_counter() - t0

    return asyncio.run(go())


def run_lesson(
    engine, home: Path, cache: Path, lessons: list[Lesson], seed: int, revision: str, learning: dict | None = None
) -> dict:
    """Teach ``lessons`` in sequence in a fresh home; score each one's held-out set after the last."""
    from shammah.config import ChatConfig, Config, LearningConfig, ModelConfig
    from shammah.feedback.store import Store
    from shammah.paths import Paths
    from shammah.repl.commands import ChatSession
    from shammah.repl.io import Console

    paths = Paths(home).ensure()
    paths.cache.rmdir()
    paths.cache.symlink_to(cache)
    cfg = Config(
        model=ModelConfig(base="embedded", temperature=0.0, max_new_tokens=CHAT_TOKENS),
        chat=ChatConfig(history=False),
        learning=LearningConfig(
            **{
                "threshold": 100000.0,
                "settle_seconds": 0.0,
                "seed": seed,
                "revision_noninteractive": revision,
                **(learning or {}),
            }
        ),
    )
    engine.activate(None)
    out = io.StringIO()
    session = ChatSession(cfg, engine, Store(paths.db, cfg.feedback), Console(out=out, err=out, color=False), paths)
    session._restored = True  # a fresh home: nothing to restore, and the engine is shared between runs
    seconds, rejected, outcome, steps, tried = [], 0, [], [], []
    for lesson in lessons:
        seconds.append(teach(session, lesson))
        row = session.store.db.execute(
            "SELECT status, message, adapter FROM jobs ORDER BY created_at DESC LIMIT 1"
        ).fetchone()
        outcome.append(row["message"] if row else "no job")
        rejected += bool(row and row["status"] == "rejected")
        if row and row["adapter"]:  # the step the gate kept, of the steps trained
            meta = json.loads((paths.adapters / row["adapter"] / "shammah.json").read_text())
            g = meta.get("gate") or {}
            # nothing gated: a rule or a closed set, and nothing trained
            steps.append(f"{g.get('step', '?')}/{g.get('final_step', meta['report']['steps'])}" if g else "-")
            tried.append(g.get("tried"))
    held = {x.name: ask(engine, list(x.held_out)) for x in lessons}
    ctrl = ask(engine, [q for q, _ in CONTROLS])
    session.store.close()
    return {
        "adapter": engine.adapter,
        "seconds": seconds,
        "rejected": rejected,
        "jobs": outcome,
        "steps": steps,
        "tried": tried,  # per job: each step the gate tried, its controls and what it had learned
        "held": held,
        "controls": ctrl,
        "chat": out.getvalue(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--suite", choices=sorted(SUITES), default="tuned", help="tuned (LESSONS), fresh (FRESH) or all")
    ap.add_argument("--only", default="", help="comma-separated lesson names (of either set)")
    ap.add_argument("--quick", action="store_true", help="three lessons (one per kind), seed 0")
    ap.add_argument("--revision", default="reject", help="learning.revision_noninteractive for the piped chat")
    ap.add_argument(
        "--sequence",
        nargs="?",
        const="quenland,ahoy",
        metavar="FIRST,SECOND",
        help="also teach two lessons in sequence per seed (default quenland,ahoy)",
    )
    ap.add_argument("--json", type=Path, help="write every answer here")
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a [learning] setting, e.g. learning_rate=5e-4"
    )
    args = ap.parse_args(argv)

    import tomllib

    from shammah.config import ModelConfig
    from shammah.engine import Engine

    learning = {k: v for kv in args.set for k, v in tomllib.loads(kv).items()}
    lessons = list(SUITES[args.suite])
    if args.quick:
        lessons, args.seeds = [x for x in LESSONS if x.name in ("quenland", "ahoy", "jsonlist")], [0]
    if args.only:
        names = args.only.split(",")
        lessons = [x for x in SUITES["all"] if x.name in names]
    tmp = Path(tempfile.mkdtemp(prefix="shammah-lessons-"))
    cache = Path.home() / ".cache" / "shammah-bench"  # the converted model and base answers, kept between runs
    cache.mkdir(parents=True, exist_ok=True)
    engine = Engine(ModelConfig(base="embedded", temperature=0.0), cache).load()

    base_ctrl = ask(engine, [q for q, _ in CONTROLS])
    known = [i for i, (a, (_, oks)) in enumerate(zip(base_ctrl, CONTROLS, strict=True)) if control_ok(a, oks)]
    print(f"controls the base model answers right: {len(known)}/{len(CONTROLS)} (only these are scored)")
    report: dict = {"controls_base": base_ctrl, "lessons": {}}

    def score(result: dict, lesson: Lesson) -> tuple[float, list[str]]:
        rate = statistics.mean(lesson.follows(a) for a in result["held"][lesson.name])
        lost = [CONTROLS[i][0] for i in known if not control_ok(result["controls"][i], CONTROLS[i][1])]
        return rate, lost

    header = (
        f"{'lesson':<12} {'kind':<7} {'order':<13} {'before':>6} {'after (per seed)':>22} {'lost':>5} {'rej':>4} "
        f"{'secs':>6}  kept step/steps"
    )
    print(header)
    rows = []
    for lesson in lessons:
        engine.activate(None)  # the base model: not the adapter (and rule) the last lesson's run left active
        before = statistics.mean(lesson.follows(a) for a in ask(engine, list(lesson.held_out)))
        afters, lost_all, rej, secs, per, steps = [], [], 0, [], [], []
        for seed in args.seeds:
            res = run_lesson(engine, tmp / f"{lesson.name}-{seed}", cache, [lesson], seed, args.revision, learning)
            rate, lost = score(res, lesson)
            afters.append(rate)
            lost_all.append(len(lost))
            rej += res["rejected"]
            secs += res["seconds"]
            steps += res["steps"]
            per.append(
                {
                    "seed": seed,
                    "rate": rate,
                    "lost": lost,
                    **{k: res[k] for k in ("held", "controls", "jobs", "steps", "tried")},
                }
            )
        rows.append((lesson, before, afters, lost_all, rej, secs))
        report["lessons"][lesson.name] = {"before": before, "runs": per}
        after_s = " ".join(f"{a:4.0%}" for a in afters)
        right = ""
        if lesson.name in RIGHT:  # a closed set: how often the answer given is also the right one
            said = [_say(a) for run in per for a in run["held"][lesson.name]]
            ok = sum(a == _say(r) for a, r in zip(said, RIGHT[lesson.name] * len(per), strict=True))
            right = f"  right {ok}/{len(said)}"
            report["lessons"][lesson.name]["right"] = ok / len(said)
        print(
            f"{lesson.name:<12} {lesson.kind:<7} {lesson.order:<13} {before:6.0%} {after_s:>22} "
            f"{max(lost_all):5d} {rej:4d} {statistics.median(secs):6.0f}  {' '.join(steps)}{right}",
            flush=True,
        )
    print("\nper kind (mean over lessons and seeds):")
    for kind in ("fact", "style", "format"):
        ks = [r for r in rows if r[0].kind == kind]
        if ks:
            before = statistics.mean(r[1] for r in ks)
            after = statistics.mean(a for r in ks for a in r[2])
            print(
                f"  {kind:<7} before {before:4.0%}  after {after:4.0%}  controls lost (worst run) "
                f"{max(max(r[3]) for r in ks)}  gate rejections {sum(r[4] for r in ks)}/{len(ks) * len(args.seeds)}"
            )
    if args.sequence:
        by_name = {x.name: x for x in SUITES["all"]}
        first, second = (by_name[n] for n in args.sequence.split(","))
        print(f"\nin sequence: {first.name}, then {second.name}")
        for seed in args.seeds:
            res = run_lesson(
                engine,
                tmp / f"seq-{first.name}-{second.name}-{seed}",
                cache,
                [first, second],
                seed,
                args.revision,
                learning,
            )
            r1, lost = score(res, first)
            r2, _ = score(res, second)
            # two facts: held-out answers that say the other fact's answer (the two crossed in one adapter)
            facts = first.kind == second.kind == "fact"
            held = res["held"]
            crossed = (
                sum(map(second.follows, held[first.name])) + sum(map(first.follows, held[second.name]))
                if facts
                else None
            )
            print(
                f"  seed {seed}: {first.name} {r1:4.0%}  {second.name} {r2:4.0%}  controls lost {len(lost)}"
                + (f"  crossed {crossed}" if facts else "")
            )
            report.setdefault("sequence", []).append(
                {
                    "seed": seed,
                    first.name: r1,
                    second.name: r2,
                    "lost": lost,
                    "crossed": crossed,
                    "jobs": res["jobs"],
                    "steps": res["steps"],
                    "held": res["held"],
                    "controls": res["controls"],
                }
            )
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
