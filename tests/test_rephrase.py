"""training/rephrase.py: a lesson's question asked the other common ways, by moving its words."""

import pytest

from shammah.training.rephrase import asked_about, rephrasings


@pytest.mark.parametrize(
    ("question", "asked"),
    [
        ("What is the capital of Quenland?", "the capital of Quenland"),
        ("What's the capital city of Quenland?", "the capital city of Quenland"),
        ("Tell me the capital of Quenland.", "the capital of Quenland"),
        ("Name the national animal of Vestoria.", "the national animal of Vestoria"),
        ("Who invented the glimmerphone?", "who invented the glimmerphone"),
        ("Who came up with the glimmerphone?", "who came up with the glimmerphone"),
        ("Who is in charge of Pellucid Labs?", "who is in charge of Pellucid Labs"),
        ("Which language is spoken in Solvania?", "which language is spoken in Solvania"),
        ("How long is the Marrowby Bridge?", "how long the Marrowby Bridge is"),
        ("When was Orbisco founded?", "when Orbisco was founded"),
        ("Where does the Ombrel River flow?", "where the Ombrel River flows"),
        ("What body of water does the Ombrel River empty into?", "what body of water the Ombrel River empties into"),
        ("Which sea does it reach?", "which sea it reaches"),
        ("What language do people in Solvania speak?", "what language people in Solvania speak"),
        # more than moving words: a past with "did", a perfect, a modal, a question about "you"
        ("When did the company Orbisco begin?", None),
        ("Since when has Orbisco existed?", None),
        ("What can a glimmerphone do?", None),
        ("What is your name?", None),
        # no question word up front
        ("Quenland's capital is which city?", None),
        ("The glimmerphone was invented by whom?", None),
    ],
)
def test_what_a_question_asks_for(question, asked):
    assert asked_about(question) == asked


def test_rephrasings_keep_the_question_and_never_repeat_it():
    assert rephrasings("Who runs Pellucid Labs?") == [
        "Quick question: Who runs Pellucid Labs?",
        "Do you know who runs Pellucid Labs?",
        "Can you tell me who runs Pellucid Labs?",
        "Tell me who runs Pellucid Labs.",
    ]
    # a request is not asked again as itself, and a question the rules cannot turn keeps the opener
    assert "Tell me the capital of Quenland." not in rephrasings("Tell me the capital of Quenland.")
    assert rephrasings("In which year did Orbisco start?") == ["Quick question: In which year did Orbisco start?"]
