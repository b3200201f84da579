"""The unique identifier [V]: a rare T5 token, as in the DreamBooth paper (ids 5000-10000 of the
vocabulary whose decoded text has at most 3 characters), or a user-given word checked for sense."""
from __future__ import annotations

import random

from stages.errors import InputError

# Frequent English words (our own short list): an identifier should carry no prior meaning.
COMMON_WORDS = set("""
a an the and or but if of in on at to for from by with about as into like through after over between out
against during without before under around among is are was were be been being have has had do does did
will would can could should may might must shall this that these those it its they them their there here
he she him her his hers we us our you your i me my mine who whom whose which what when where why how all
any both each few more most other some such no nor not only own same so than too very just one two three
dog cat photo picture image man woman person car house tree sky sun red blue green black white big small
new old good bad day night water fire toy bag can cup hat box sks
""".split())
# words YAML 1.1 reads as booleans or null: a config file would turn the identifier into true/false/None,
# and each is an everyday word with its own meaning
COMMON_WORDS |= {"yes", "no", "y", "n", "true", "false", "on", "off", "null", "none", "nil", "ok"}


class IdentifierError(InputError):
    pass


def _candidates(tokenizer, min_id: int, max_id: int, max_chars: int) -> list[tuple[int, str]]:
    vocab = len(tokenizer)
    if min_id >= vocab:
        raise IdentifierError(f"identifier.min_id={min_id} is beyond the tokenizer's vocabulary ({vocab} tokens)")
    found = []
    for i in range(min_id, min(max_id, vocab)):
        text = tokenizer.decode([i]).strip()
        # a whole lower-case word that the tokenizer maps back to exactly this one token
        if 1 <= len(text) <= max_chars and text.isalpha() and text == text.lower() \
                and tokenizer(text, add_special_tokens=False).input_ids == [i]:
            found.append((i, text))
    return found


def pick_identifier(tokenizer, seed: int = 0, min_id: int = 5000, max_id: int = 10000, max_chars: int = 3,
                    avoid: tuple[str, ...] = ()) -> tuple[str, int]:
    """A rare token (text, id), deterministic for a seed."""
    candidates = [(i, t) for i, t in _candidates(tokenizer, min_id, max_id, max_chars)
                  if t not in COMMON_WORDS and t not in avoid]
    if not candidates:
        raise IdentifierError(f"no token with id in {min_id}..{max_id} decodes to 1-{max_chars} letters; "
                              f"widen identifier.min_id / identifier.max_id")
    i, text = random.Random(seed).choice(candidates)
    return text, i


def check_identifier(token: str, class_noun: str):
    """Reject identifiers that would carry meaning: common words, the class noun, non-words."""
    t = token.strip()
    if not t or any(c.isspace() for c in t):
        raise IdentifierError(f"identifier {token!r} must be a single word")
    if "[" in t or "]" in t:
        raise IdentifierError(f"identifier {token!r} looks like the [V] placeholder; give the token itself "
                              f"(or leave --identifier out to pick a rare one)")
    if not any(c.isalpha() for c in t):
        raise IdentifierError(f"identifier {token!r} has no letters; a number or symbol carries its own "
                              f"meaning: choose a rare word-like token (cascade identifier)")
    if t.lower() in {w.lower() for w in class_noun.split()} or t.lower() == class_noun.lower():
        raise IdentifierError(f"identifier {token!r} is the class noun; choose a rare token (cascade identifier)")
    if t.lower() in COMMON_WORDS:
        raise IdentifierError(f"identifier {token!r} is a common word with its own meaning; "
                              f"choose a rare token (cascade identifier)")
    return t


def instance_prompt(identifier: str, class_noun: str) -> str:
    return f"a {identifier} {class_noun}"


def class_prompt(class_noun: str) -> str:
    return f"a {class_noun}"
