"""The embedded default corpus: Python's documentation and standard library, read offline."""

from __future__ import annotations

import textwrap

import pytest

from saelab.data import corpus
from saelab.data.corpus import default_documents


@pytest.fixture(scope="module")
def documents() -> tuple[str, ...]:
    return default_documents()


def test_corpus_is_megabytes_of_documentation(documents):
    assert len(documents) > 400
    assert all(isinstance(d, str) and d.strip() for d in documents)
    assert sum(len(d) for d in documents) > 1_500_000
    # documentation only by default: no module's source text
    assert not any(d.startswith(('"""', "#!")) for d in documents)


def test_corpus_with_source_is_a_superset(documents):
    with_source = default_documents(include_source=True)
    assert set(documents) < set(with_source)
    assert sum(len(d) for d in with_source) > 5_000_000


def test_contains_pydoc_topic_and_stdlib_docstrings(documents):
    assert any(d.startswith('The "if" statement') for d in documents)
    json_digest = next(d for d in documents if d.startswith("module json\n"))
    assert "JSON (JavaScript Object Notation)" in json_digest
    assert "\ndef dumps(obj, *, skipkeys=False," in json_digest
    decoder_digest = next(d for d in documents if d.startswith("module json.decoder\n"))
    assert "\nclass JSONDecoder(object)\n" in decoder_digest
    assert "\ndef JSONDecoder.decode(self, s, _w=WHITESPACE.match)\n" in decoder_digest


def test_skips_tests_and_third_party_code(documents):
    headers = {d.split("\n", 1)[0] for d in documents if d.startswith("module ")}
    assert "module json" in headers
    for skipped in ("module test.", "module idlelib", "module lib2to3", "module encodings"):
        assert not any(h.startswith(skipped) for h in headers), skipped


def test_corpus_is_deterministic(documents):
    default_documents.cache_clear()
    try:
        assert default_documents() == documents
    finally:
        default_documents.cache_clear()


def test_docstring_digest_lists_classes_methods_and_functions():
    source = textwrap.dedent(
        '''
        """Module doc."""

        class Base:
            """Class doc."""

            def method(self, x: int = 1):
                """Method doc."""

                def inner():
                    """Nested functions are implementation details."""

            def undocumented(self):
                pass

        async def fetch(url, *, timeout=None):
            """Coroutine doc."""
        '''
    )
    expected = "\n\n".join(
        [
            "module pkg.mod",
            "Module doc.",
            "class Base\n\nClass doc.",
            "def Base.method(self, x: int=1)\n\nMethod doc.",
            "async def fetch(url, *, timeout=None)\n\nCoroutine doc.",
        ]
    )
    assert corpus._docstring_digest("pkg.mod", source) == expected


def test_docstring_digest_of_unparsable_or_undocumented_source_is_empty():
    assert corpus._docstring_digest("bad", "def f(:\n") == ""
    assert corpus._docstring_digest("plain", "x = 1\n") == ""
