"""Just read twice: a pure prompt transform in the authors' layout (question, context, separator, context,
question), on text and on token ids; bad pieces refused by name; the CLI's --read-twice builds that prompt."""

import pytest

import ssm_llm
from ssm_llm import jrt


def test_the_text_layout_is_question_context_separator_context_question():
    assert (
        jrt.read_twice("Ann lives in Oslo.", "Where does Ann live?")
        == "Where does Ann live? Ann lives in Oslo.\nAnn lives in Oslo. Where does Ann live?"
    )
    assert jrt.read_twice("c", "q?", lead="Information about q.", separator=" | ") == "Information about q. c | c q?"
    assert ssm_llm.jrt is jrt


def test_the_token_layout_is_lead_context_separator_context_question():
    context, question, sep = [5, 6, 7], [8, 9], [10]
    assert jrt.read_twice_ids(context, question, separator=sep) == [8, 9, 5, 6, 7, 10, 5, 6, 7, 8, 9]
    assert jrt.read_twice_ids(context, question, lead=[1]) == [1, 5, 6, 7, 5, 6, 7, 8, 9]
    assert jrt.read_twice_ids((5,), ()) == [5, 5]  # tuples and an empty question are fine


def test_bad_pieces_are_refused_by_name():
    with pytest.raises(ValueError, match="the context is empty"):
        jrt.read_twice("  ", "q")
    with pytest.raises(TypeError, match="question must be a str, got list"):
        jrt.read_twice("c", [1])
    with pytest.raises(TypeError, match="lead must be a str or None"):
        jrt.read_twice("c", "q", lead=3)
    with pytest.raises(ValueError, match="read_twice_ids: the context is empty"):
        jrt.read_twice_ids([], [1])
    with pytest.raises(TypeError, match="read_twice_ids: question must be a list of token ids, got str"):
        jrt.read_twice_ids([1], "q")
    with pytest.raises(ValueError, match="separator must hold non-negative int token ids"):
        jrt.read_twice_ids([1], [2], separator=[-1])
    with pytest.raises(ValueError, match="context must hold non-negative int token ids"):
        jrt.read_twice_ids([True], [2])
