"""The text analysis both retrievers share: Elasticsearch's ``english`` analyzer, reproduced in Python.

Lucene's EnglishAnalyzer runs the standard tokenizer (Unicode word boundaries, UAX #29), strips possessives,
lowercases, drops the ``_english_`` stop words and stems with Porter's algorithm as Porter's own C code
does it (NLTK's ``MARTIN_EXTENSIONS``: "logi" -> "log", "bli" -> "ble", words of two letters or fewer kept;
Snowball's porter stems differently). The embedded retriever analyzes its corpus and queries with
``analyze``, so its BM25 counts the terms an Elasticsearch index holds.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import regex

if TYPE_CHECKING:
    from nltk.stem.porter import PorterStemmer

ANALYZER = "english"

# Lucene's EnglishAnalyzer.ENGLISH_STOP_WORDS_SET, which Elasticsearch calls `_english_`.
ENGLISH_STOP_WORDS = frozenset(
    """a an and are as at be but by for if in into is it no not of on or such that the their then there these
    they this to was will with""".split()  # noqa: SIM905 - a word list reads better as words
)

# UAX #29 as far as text needs: letters and digits join, and so do letters across `.`, `'` or `:`
# ("e.g", "o'neil") and digits across `.`, `,`, `;` or `'` ("3.5", "1,000"); hyphens, slashes and the
# like split ("il-6" is "il", "6"); a token starts with a letter or digit; each ideograph is a token of its
# own. As in Lucene's StandardTokenizer, a run of Thai, Lao, Khmer, Myanmar or another script written without
# spaces (Line_Break=Complex_Context) is one token, and so is an emoji with its modifiers, a ZWJ sequence of
# them, or a flag (a pair of regional indicators).
_START = r"\p{WB=ALetter}\p{WB=Hebrew_Letter}\p{WB=Numeric}\p{WB=Katakana}"
_WORD_CHAR = rf"[{_START}\p{{WB=ExtendNumLet}}\p{{WB=Extend}}\p{{WB=Format}}]"
_LETTER = r"[\p{WB=ALetter}\p{WB=Hebrew_Letter}]"
_MID_LETTER = r"[\p{WB=MidLetter}\p{WB=MidNumLet}\p{WB=Single_Quote}]"
_MID_NUMBER = r"[\p{WB=MidNum}\p{WB=MidNumLet}\p{WB=Single_Quote}]"
_EXTENDED = r"[\p{WB=Extend}\p{WB=Format}]*"  # combining marks, variation selectors, skin tones
_EMOJI = rf"(?:\p{{Regional_Indicator}}{{1,2}}|\p{{Extended_Pictographic}}){_EXTENDED}"
_TOKEN = regex.compile(
    rf"\p{{WB=ExtendNumLet}}*[{_START}]{_WORD_CHAR}*(?:(?<={_LETTER}){_MID_LETTER}(?={_LETTER}){_WORD_CHAR}+"
    rf"|(?<=\p{{WB=Numeric}}){_MID_NUMBER}(?=\p{{WB=Numeric}}){_WORD_CHAR}+)*"
    rf"|(?:\p{{Line_Break=Complex_Context}}[\p{{WB=Extend}}\p{{WB=Format}}\p{{WB=ZWJ}}]*)+"
    rf"|{_EMOJI}(?:\p{{WB=ZWJ}}{_EMOJI})*"
    r"|[\p{Han}\p{Hiragana}]"
)
# Lucene's StandardTokenizer cuts a longer token into pieces of this many characters (UTF-16 units in Java).
_MAX_TOKEN_LENGTH = 255
_POSSESSIVE = regex.compile(r"['\u2019\uff07][sS]$")  # apostrophe, right single quote, fullwidth


@functools.cache
def _stemmer() -> PorterStemmer:
    # Imported when first needed: importing nltk takes about a second, and only the embedded retriever stems.
    from nltk.stem.porter import PorterStemmer

    return PorterStemmer(PorterStemmer.MARTIN_EXTENSIONS)


@functools.lru_cache(maxsize=1 << 18)
def _stem(word: str) -> str:
    return _stemmer().stem(word, to_lowercase=False)


def analyze(text: str) -> list[str]:
    """The terms Elasticsearch's ``english`` analyzer makes of ``text``, in order."""
    tokens = (
        token[start : start + _MAX_TOKEN_LENGTH]
        for token in _TOKEN.findall(text)
        for start in range(0, len(token), _MAX_TOKEN_LENGTH)
    )
    words = (_POSSESSIVE.sub("", token).lower() for token in tokens)
    return [_stem(word) for word in words if word not in ENGLISH_STOP_WORDS]
