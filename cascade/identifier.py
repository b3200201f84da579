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


def _forms(word: str) -> set[str]:
    """A word and its singular by the regular English endings (puppies -> puppy, wolves -> wolf,
    boxes -> box, dogs -> dog); irregular plurals (mice) are not known."""
    w = word.lower()
    out = {w}
    for end, repl in (("ies", "y"), ("ves", "f"), ("es", ""), ("s", "")):
        if w.endswith(end) and len(w) > len(end) + 1:
            out.add(w[:-len(end)] + repl)
            break
    return out


def is_class_form(token: str, class_noun: str) -> bool:
    """Whether `token` is a word of the class noun or a form of one: equal after the regular plural
    endings are removed, or one a prefix of the other with the shorter at least 3 letters (dogs, doggy
    for dog; tea for teapot). "a dogs dog" would teach the class word, not a new identifier."""
    for word in class_noun.split():
        for a in _forms(token):
            for b in _forms(word):
                short, long_ = sorted((a, b), key=len)
                if a == b or (len(short) >= 3 and long_.startswith(short)):
                    return True
    return False


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
                  if t not in COMMON_WORDS and not any(is_class_form(t, a) for a in avoid)]
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
    if is_class_form(t, class_noun):
        raise IdentifierError(f"identifier {token!r} is the class noun {class_noun!r} or a form of it (a plural, or "
                              f"sharing its first letters); choose a rare token (cascade identifier)")
    if t.lower() in COMMON_WORDS:
        raise IdentifierError(f"identifier {token!r} is a common word with its own meaning; "
                              f"choose a rare token (cascade identifier)")
    return t


def instance_prompt(identifier: str, class_noun: str) -> str:
    return f"a {identifier} {class_noun}"


def class_prompt(class_noun: str) -> str:
    return f"a {class_noun}"
