"""Reading a reply to a multiple-choice question as one of its option letters: the scoring rules.

SCORING names each rule; each is a function (reply, choices) -> the chosen letter, uppercase, or
None when the reply chooses none (scored as wrong). `choices` are the offered letters ("A".."D").

- lmms-eval: lmms-eval's shared MCQ extractor (extract_mcq_answer in
  lmms_eval/tasks/_task_utils/mcq_extract.py), which its Video-MME task calls with A-D; its
  behaviour is the case list test/eval/mcq_extract/cases.json of that repository.
- lmms-eval-legacy: the rule of lmms-eval's Video-MME task before April 2026
  (extract_characters_regex): the first capital A-D anywhere, after deleting some lead-ins.
- strict: this project's own rule, extract_answer_letter.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from typing import NamedTuple

# ---------------------------------------------------------------------------------------------
# strict

# Lead-ins a model puts before the letter; stripped (repeatedly, any case) from the start.
_PREFIX = re.compile(
    r"^\s*(?:the\s+(?:best\s+|correct\s+|right\s+)?(?:answer|option|choice)(?:\s+is)?|best\s+(?:answer|option)"
    r"|answer|option|choice)\b\s*[:：]?\s*", re.IGNORECASE)
# A letter that is the whole reply or is marked as a choice: "B", "b.", "(c)", "d)", "[A]", "C:"
_MARKED = re.compile(r"^[(\[]?([A-Da-d])(?:\s*[).:\]]|\s*$)")
# A capital A-D standing alone (not part of a word); then the word after it, if any
_STANDALONE = re.compile(r"(?<![A-Za-z0-9'])([A-D])(?![A-Za-z0-9'])(?:\s+([a-z]+))?")


def extract_answer_letter(text: str) -> str | None:
    """The option letter (A-D) a reply chooses, or None if it names none (scored as wrong).

    Like lmms-eval's extractor: strip the lead-ins ("The best answer is", "Answer:", "Option", ...)
    and take the first capital A-D. Unlike it, the letter must stand alone (the "A" of "Answer"
    or the "D" of "Dogs" is no answer), a lowercase letter counts when it is the whole rest of the
    reply or marked as a choice ("option a", "c) red"), and a capital "A" followed by a lowercase
    word is read as the article ("A dog runs" -> None), unless a lead-in came before it ("The
    answer is A dog") or the word is "is" ("A is correct").
    """
    rest, stripped = text.strip(), False
    while match := _PREFIX.match(rest):
        rest, stripped = rest[match.end():], True
    if marked := _MARKED.match(rest):
        return marked.group(1).upper()
    for found in _STANDALONE.finditer(rest):
        letter, next_word = found.groups()
        leads = stripped and found.start() == 0
        if letter == "A" and next_word is not None and next_word != "is" and not leads:
            continue  # the article
        return letter
    return None


def strict_choice(reply: str, choices: Sequence[str]) -> str | None:
    """extract_answer_letter, which reads A-D whatever the choices."""
    return extract_answer_letter(reply)


# ---------------------------------------------------------------------------------------------
# lmms-eval-legacy

# extract_characters_regex's list as written upstream: two commas are missing there, so Python
# joins the last four strings into two, and "Best answer:" alone is never deleted ("Best answer:
# C" reads as B). Only the last entry holds a capital A-D, so only it changes what is found; the
# others count only where deleting one joins the pieces of that entry.
_LEGACY_LEAD_INS = ("The best answer is", "The correct answer is", "The answer is", "The answer",
                    "The best option isThe correct option is", "Best answer:Best option:")


def lmms_eval_legacy_choice(reply: str, choices: Sequence[str]) -> str | None:
    """The first capital A-D anywhere in the reply, once the lead-ins are deleted (case-sensitive,
    anywhere, in order), whatever the choices: "Dogs" reads as D, "A dog runs" as A, "b" as None.

    Upstream also strips the reply and returns nothing for over 10 words without a capital A-D;
    neither can change the result, so neither is done here.
    """
    for lead_in in _LEGACY_LEAD_INS:
        reply = reply.replace(lead_in, "")
    found = re.search("[ABCD]", reply)
    return found.group() if found else None


# ---------------------------------------------------------------------------------------------
# lmms-eval
#
# Evidence in order of precedence: the last answer container (<answer>...</answer>, \boxed{...})
# limits the reading to its content; otherwise the last declaration ("the answer is b", "I choose
# C", "Option A is correct", Chinese, Korean and Japanese markers) decides, even when what it
# declares is not an offered letter; otherwise a letter standing as an answer (the whole reply, a
# leading label "B. ...", a lone "(C)", a final "..., D") counts when nothing else in the reply
# looks like a different label. Two letters offered as alternatives ("A or B") are no answer.

DEFAULT_CHOICES = "ABCDEFGH"  # when no choices are given
_PUNCTUATION = " \t\r\n.!?,;:。！？，；："  # what may follow a letter that stands alone
_INNER_PUNCTUATION = ".:：!?。！？"  # punctuation that may sit inside a wrapper: "**B.**"
_LABEL_MARKS = {".", ":", ")", "："}  # after a letter, these make it a label ("B. blue")

# Pairs that may wrap a letter as presentation: Markdown, quotes, brackets, TeX math. Longer
# openers first, so that "**" is not read as two "*".
_WRAPPERS = {"**": "**", "__": "__", "`": "`", "*": "*", "_": "_", '"': '"', "'": "'", "“": "”", "‘": "’",
             "(": ")", "（": "）", "[": "]", "{": "}", "$": "$"}
_TEX_WRAPPER = re.compile(r"\\(?:text|mathrm|mathbf|textbf)\s*\{")
_OPTION_WORD = re.compile(r"(?:option|choice)\b\s*[:：]?\s*", re.IGNORECASE)  # "Answer: option B"

_DECLARATION = re.compile(r"""
    (?P<marker>
        (?<!\w) (?:(?:the|my)\s+)? (?:(?:correct|best|final)\s+)? (?:answer|option|choice) \s* (?:is\b|[:：=])
      | (?<!\w) i\s+(?:choose|select|pick)\b
      | 答案是 | 答案为 | 选 | 옵션 | 정답은 | 답은 | 답\s*[:：] | 答えは
    )
  | (?<!\w) option\s+ (?P<option>[a-z]) (?!\w) \s+is\s+ (?:the\s+)? (?:correct|right|best)\b
""", re.IGNORECASE | re.VERBOSE)
# After a Korean or Japanese marker, the letter may carry the polite copula: "정답은 b입니다", "答えはBです"
_COPULAS = (("옵션", "입니다"), ("정답", "입니다"), ("답", "입니다"), ("答えは", "です"))

# What joins two alternatives: "A or B", "B and C", "A/B", "A, B", "C 或 D"
_JOINER = re.compile(r"(?:and\s*/\s*or\b|and\b|or\b|[/&,+|]|或(?:者)?|和|또는|か|と)\s*", re.IGNORECASE)
# Two capitals listed together anywhere: "A and B", "A, B", "C/D"
_LISTED_PAIR = re.compile(r"(?<!\w)[A-Z]\s*(?:[,/&+|]|and\b|or\b)\s*[A-Z](?!\w)")
# After a leading letter, words that assert it: "A because ...", "b is correct", "A seems the best"
_ASSERTION = re.compile(r"because\b|(?:is|seems|looks|appears)\s+(?:(?:the|a)\s+)?"
                        r"(?:correct|right|best|answer|option|choice)\b", re.IGNORECASE)
_PARENTHESIZED = re.compile(r"(?<!\w)(?:\(\s*([A-Za-z])\s*\)|（\s*([A-Za-z])\s*）)(?!\w)")  # "(C)", "（C）"
_PUNCTUATED = re.compile(r"(?<!\w)([A-Za-z])[.):](?=\s|$)")  # "B. ", "c) ", "D:" before a blank
_URL = re.compile(r"(?<!\w)(?:[a-z][a-z0-9+.-]*://|www\.)\S*", re.IGNORECASE)

# Answer containers: a tag opens with <answer ...>, or with a bare "answer>" (a legacy form); a
# box with \boxed{. One pattern finds both, so that a box inside a tag's <...> is no container.
_OPENING_TAG = r"<answer\b[^<>]*>|(?<![\w</])answer>"
_CONTAINER = re.compile(rf"(?P<tag>{_OPENING_TAG})|\\boxed\s*\{{", re.IGNORECASE)
_TAG = re.compile(rf"(?P<opening>{_OPENING_TAG})|</answer\s*>", re.IGNORECASE)
_CLOSING_TAG = re.compile(r"</answer\s*>", re.IGNORECASE)
_TAG_START = re.compile(r"<answer\b", re.IGNORECASE)
_MARKUP = re.compile(r"</?\w")
_SEPARATORS = "\n,;，；"  # a trailing answer follows the last of these: "After checking, C."


class _Letter(NamedTuple):
    """A letter read at the start of some text, and what follows it."""
    letter: str  # uppercase
    after: str  # the text after the letter and its wrappers
    wrapped: bool  # in Markdown, quotes, brackets or TeX
    capital: bool  # written as a capital


def _in_word(character: str) -> bool:
    """Letters, digits and "_", and the combining marks and joiners that belong to a word."""
    return character.isalnum() or character == "_" or unicodedata.category(character) in {"Mn", "Mc", "Me", "Cf"}


def _letter_at(text: str, copula: str = "") -> _Letter | None:
    """The single ASCII letter at the start of `text` (after blanks and separators, through paired
    wrappers and one "option"/"choice"), or None where the start is a word, or not a letter."""
    rest = text.lstrip().lstrip(":：=,，;；").lstrip()
    closers: list[str] = []
    option_word = False
    while rest:
        if tex := _TEX_WRAPPER.match(rest):
            closers.append("}")
            rest = rest[tex.end():].lstrip()
        elif not option_word and (word := _OPTION_WORD.match(rest)):
            option_word = True
            rest = rest[word.end():].lstrip()
        elif opener := next((opener for opener in _WRAPPERS if rest.startswith(opener)), None):
            closers.append(_WRAPPERS[opener])
            rest = rest[len(opener):].lstrip()
        else:
            break
    if not rest or not (rest[0].isascii() and rest[0].isalpha()):
        return None
    letter, after = rest[0], rest[1:]
    if copula and after.startswith(copula):
        after = after[len(copula):]
    if after and _in_word(after[0]) and not (closers and after.startswith(closers[-1])):
        return None  # the letter begins a word ("_" may close "_B_")
    inner = ""  # punctuation inside the wrappers, moved after them
    for closer in reversed(closers):
        marks = _INNER_PUNCTUATION if closer == ")" else _INNER_PUNCTUATION + ")"
        after = after.lstrip()
        unmarked = after.lstrip(marks)
        inner += after[:len(after) - len(unmarked)]
        after = unmarked.lstrip()
        if not after.startswith(closer):
            return None
        after = after[len(closer):]
    after = inner + after
    if after and _in_word(after[0]):
        return None
    if len(after) > 1 and after[0] in ".:-'’" and (after[1].isalnum() or after[1] in "/_"):
        return None  # "B.com", "C:/path", "A-list", "B's": part of a longer token
    return _Letter(letter.upper(), after, bool(closers), letter.isupper())


def _stands_alone(found: _Letter | None) -> bool:
    """Whether nothing but punctuation follows the letter: "B", "(c).", "**D**"."""
    return found is not None and not found.after.strip(_PUNCTUATION)


def _alternative_follows(found: _Letter) -> bool:
    """Whether a second letter comes right after: "A or B", "B and C", "A/B", "A, B", "B C"."""
    after = found.after.lstrip(" \t")
    labelled = after[:1] in _LABEL_MARKS
    if labelled:
        after = after[1:].lstrip(" \t")
    if joiner := _JOINER.match(after):
        return after.startswith("/") or _letter_at(after[joiner.end():]) is not None
    if labelled or after.startswith(("\n", "\r")):
        return False  # "B. C is wrong" explains; a later line may be anything
    return _stands_alone(_letter_at(after))


def _declared(text: str, allowed: set[str]) -> str | None:
    """What the last declaration in `text` chooses ("" for no offered letter, or alternatives), or
    None where `text` declares nothing."""
    chosen = None
    for declaration in _DECLARATION.finditer(text):
        marker, letter = declaration.group("marker") or "", declaration.group("option")
        rest = text[declaration.end():]
        copula = next((copula for start, copula in _COPULAS if marker.startswith(start)), "")
        found = _letter_at(letter + rest if letter else rest, copula)
        chosen = found.letter if found and found.letter in allowed and not _alternative_follows(found) else ""
    return chosen


def _answer_scope(text: str) -> str | None:
    """The content of the last answer container; "" where the containers are malformed (a closing
    tag without an opening one, nested or unfinished containers); None where there is none."""
    is_open = False
    for tag in _TAG.finditer(text):
        if is_open == (tag.group("opening") is not None):
            return ""  # an opening inside an open tag, or a closing without one
        is_open = not is_open
    containers = list(_CONTAINER.finditer(text))
    tag_starts = {container.start() for container in containers if container[0].startswith("<")}
    if any(start.start() not in tag_starts for start in _TAG_START.finditer(text)):
        return ""  # an "<answer" that does not open a tag
    if not containers:
        return None
    box_end = -1
    for box in (container for container in containers if container.group("tag") is None):
        if box.start() < box_end:
            return ""  # a box inside a box
        box_end = _closing_brace(text, box.end())
    last = containers[-1]
    if last.group("tag") is None:
        return text[last.end():box_end] if box_end < len(text) else ""
    closing = _CLOSING_TAG.search(text, last.end())
    return text[last.end():closing.start() if closing else len(text)]


def _closing_brace(text: str, start: int) -> int:
    """Where the brace opened just before `start` closes; len(text) if it never does."""
    depth = 1
    for index in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return index
    return len(text)


def _scoped(scope: str, allowed: set[str]) -> str:
    """The letter an answer container holds, or "" for none, several, or markup inside."""
    if _MARKUP.search(scope):
        return ""
    declared = _declared(scope, allowed)
    if declared is not None:
        return declared
    found = _letter_at(scope)
    if found is None:
        return ""
    lone_lines = {line_letter.letter for line in scope.splitlines() if _stands_alone(line_letter := _letter_at(line))}
    if lone_lines - {found.letter}:
        return ""  # "<answer>B\nD</answer>"
    return found.letter if found.letter in allowed and not _alternative_follows(found) else ""


def _implicit(text: str, allowed: set[str]) -> str:
    """The letter a reply without containers or declarations gives as its answer, or "".

    Labels are every letter shaped like an option label: "(C)", "B. ", a capital alone on a line.
    Candidates are the labels that answer: a lone "(C)", the reply's leading letter when it is a
    label, wrapped, alone, or asserted ("A because ..."), and a capital alone after the last line
    break, comma or semicolon. One candidate and no other label is the answer; a copied option
    list, or two letters listed together, is none.
    """
    urls = [url.span() for url in _URL.finditer(text)]

    def in_url(position: int) -> bool:
        return any(start <= position < end for start, end in urls)

    def isolated(match: re.Match) -> bool:
        return ((match.start() == 0 or not _in_word(text[match.start() - 1]))
                and (match.end() == len(text) or not _in_word(text[match.end()])) and not in_url(match.start()))

    parenthesized = [match for match in _PARENTHESIZED.finditer(text) if isolated(match)]
    punctuated = [match for match in _PUNCTUATED.finditer(text) if isolated(match)]
    labels = {match[match.lastindex].upper() for match in parenthesized + punctuated}
    labels |= {found.letter for line in text.splitlines() if _stands_alone(found := _letter_at(line)) and found.capital}

    candidates = set()
    for match in parenthesized:
        found = _letter_at(text[match.start():])
        if found and _alternative_follows(found):
            return ""  # "(A) or (D)"
        candidates.add(match[match.lastindex].upper())
    leading = _letter_at(text)
    if leading:
        if _alternative_follows(leading):
            return ""
        rest = leading.after.lstrip()
        if leading.wrapped or _stands_alone(leading) or rest[:1] in _LABEL_MARKS or _ASSERTION.match(rest):
            candidates.add(leading.letter)  # not "A triangle has three sides."
    # Letters listed together ("I compared A and B") leave the answer open, unless a leading
    # answer explains itself with them.
    if not (leading and leading.letter in candidates) and any(
            not in_url(pair.start()) for pair in _LISTED_PAIR.finditer(text)):
        return ""
    segment_start = max(text.rfind(separator) for separator in _SEPARATORS) + 1
    segment = text[segment_start:].lstrip()
    trailing = _letter_at(segment)
    if _stands_alone(trailing) and trailing.capital and not in_url(len(text) - len(segment)):
        candidates.add(trailing.letter)
    if len(candidates) != 1 or labels - candidates:
        return ""
    (letter,) = candidates
    return letter if letter in allowed else ""


def lmms_eval_choice(reply: str, choices: Sequence[str]) -> str | None:
    """lmms-eval's extract_mcq_answer(reply, choices), with None for its "" (no answer).

    Choices are single ASCII letters in either case (others are ignored); none given means A-H.
    """
    if not reply or not reply.strip():
        return None
    allowed = {choice.upper() for choice in choices or DEFAULT_CHOICES
               if len(choice) == 1 and choice.isascii() and choice.isalpha()}
    text = reply.strip()
    scope = _answer_scope(text)
    if scope is not None:
        return _scoped(scope, allowed) or None
    declared = _declared(text, allowed)
    return (declared if declared is not None else _implicit(text, allowed)) or None


SCORING: dict[str, Callable[[str, Sequence[str]], str | None]] = {
    "lmms-eval": lmms_eval_choice,
    "lmms-eval-legacy": lmms_eval_legacy_choice,
    "strict": strict_choice,
}
DEFAULT_SCORING = "lmms-eval"  # published Video-MME numbers are lmms-eval's
