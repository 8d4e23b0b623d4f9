"""Valid values of the generation settings, in one place. Engine.generate checks its arguments here, and the
command lines parse their flags with the same rules (the argparse types below), so a bad value ends in one
line that names it and its valid range, from Python (a UserError) as from a shell (`error: ...`, exit 2)."""
from __future__ import annotations

import argparse
import math
import numbers
import re
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import UserError

SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes 64 bits; keep clear of the sign bit


@dataclass(frozen=True)
class Rule:
    kind: type  # int or float (bools are neither; an int is a float's valid value, not the reverse)
    ok: Callable[[float], bool]
    valid: str  # the valid range, as the error message says it
    none_ok: bool = False  # Python callers may pass None (the command lines have no None)


RULES: dict[str, Rule] = {
    "max_new_tokens": Rule(int, lambda v: v >= 1, "an integer >= 1"),
    "temperature": Rule(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0 (0 = greedy)"),
    "top_k": Rule(int, lambda v: v >= 0, "an integer >= 0 (0 = off)"),
    "top_p": Rule(float, lambda v: 0 < v <= 1, "a number in (0, 1] (1 = off)"),
    "seed": Rule(int, lambda v: 0 <= v <= SEED_MAX, f"an integer in 0..{SEED_MAX}", none_ok=True),
    "count": Rule(int, lambda v: v >= 1, "an integer >= 1"),  # batch sizes, lengths, repetitions
    "threshold": Rule(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),  # ROUGE, percent
}


def _subject(name: str, value) -> str:
    """How a message names the input: `--top_k -3` for a flag (its text as typed), `top_k=-3` in Python."""
    if name.startswith("--"):
        plain = isinstance(value, str) and value and not any(c.isspace() for c in value)
        return f"{name} {value if plain else short(value)}"
    return f"{name}={short(value)}"


def short(value, limit: int = 60) -> str:
    """repr(value), cut to fit in a one-line message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def check(rule_name: str, value, name: str | None = None):
    """value, as an int or float, when RULES[rule_name] allows it; else UserError naming `name`."""
    rule, name = RULES[rule_name], name or rule_name
    if value is None and rule.none_ok:
        return None
    valid = rule.valid + (", or None" if rule.none_ok and not name.startswith("--") else "")
    want = numbers.Integral if rule.kind is int else numbers.Real
    if isinstance(value, bool) or not isinstance(value, want):
        raise UserError(f"{_subject(name, value)}: must be {valid}")
    try:
        value = rule.kind(value)
    except OverflowError:  # an int too large for a float
        raise UserError(f"{_subject(name, value)}: must be {valid}") from None
    if not rule.ok(value):
        raise UserError(f"{_subject(name, value)}: must be {valid}")
    return value


def check_sampling(max_new_tokens, temperature, top_k, top_p, seed) -> tuple:
    """The checked (max_new_tokens, temperature, top_k, top_p, seed): ints as int, numbers as float."""
    values = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    return tuple(check(k, v) for k, v in values.items())


def utf8_problem(text: str) -> str | None:
    """Why text cannot be encoded as UTF-8 (lone surrogates: Python decodes argv bytes that are not UTF-8
    with surrogateescape), or None when it can."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        return f"not valid UTF-8 text (bytes {as_bytes(text[e.start:e.end])!r} at character {e.start})"


def as_bytes(text: str) -> bytes:
    """The bytes that text came from when argv decoding escaped them; other lone surrogates as \\u escapes."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace")


def is_one_prompt(prompts) -> bool:
    """A str, or a list whose first item is a token id (not text, not a list): one prompt, not a batch."""
    return isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and len(prompts) > 0
                                        and not isinstance(prompts[0], (str, list, tuple)))


def check_stop_strings(stop, name: str = "stop") -> list[str] | None:
    """None, or a list of non-empty UTF-8 strings (one string is a list of one)."""
    if stop is None:
        return None
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, (list, tuple)):
        raise UserError(f"{_subject(name, stop)}: must be a list of strings")
    for s in items:
        if not isinstance(s, str) or not s:
            raise UserError(f"{_subject(name, stop)}: must be a list of non-empty strings")
        why = utf8_problem(s)
        if why:
            raise UserError(f"{name}: {why}")
    return list(items) or None


def check_token_ids(ids, vocab_size: int, name: str) -> list[int]:
    """A list of ints in 0..vocab_size-1 (bools and floats are not token ids)."""
    if not isinstance(ids, (list, tuple)):
        raise UserError(f"{_subject(name, ids)}: must be a list of token ids (ints)")
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise UserError(f"{name}: {short(t)} is not a token id (an int in 0..{vocab_size - 1})")
    bad = [int(t) for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise UserError(f"{name} has token ids {bad[:5]} outside the vocabulary (0..{vocab_size - 1})")
    return [int(t) for t in ids]


_DEVICE = re.compile(r"auto|cpu|cuda(?::(\d+))?")


def check_device(device, name: str = "device") -> str:
    """auto | cpu | cuda | cuda:N with N below the number of GPUs that torch sees; the device as a string."""
    text = str(device) if isinstance(device, torch.device) else device
    m = _DEVICE.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        raise UserError(f"{_subject(name, device)}: must be auto, cpu, cuda or cuda:N")
    if text.startswith("cuda"):
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise UserError(f"{_subject(name, device)}: no CUDA GPU is visible to torch; use cpu")
        if m.group(1) is not None and int(m.group(1)) >= n:
            raise UserError(f"{_subject(name, device)}: torch sees {n} GPU(s), cuda:0..cuda:{n - 1}")
    return text


# ---- command lines -------------------------------------------------------------------------------------
LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]  # --log_level (any case)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line `error: ...` (no usage blob) and exit code 2."""

    def error(self, message: str):
        # argparse says "argument --top_k: <our message>"; ours already start with the flag's value
        message = re.sub(r"^argument (\S+?)(/\S+)?: ", r"\1 ", message)
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def flag(rule_name: str) -> Callable[[str], object]:
    """An argparse type: the flag's text as an int or float that RULES[rule_name] allows."""
    rule = RULES[rule_name]

    def parse(text: str):
        try:
            return check(rule_name, rule.kind(text.strip()))
        except (ValueError, UserError):  # not a number, or out of range
            raise argparse.ArgumentTypeError(f"{text}: must be {rule.valid}") from None

    parse.__name__ = rule.kind.__name__  # what argparse names in its own messages
    return parse


def text_flag(text: str) -> str:
    """An argparse type: text that is valid UTF-8 (argv bytes that are not arrive as lone surrogates)."""
    if utf8_problem(text):
        raise argparse.ArgumentTypeError(f"{as_bytes(text)!r}: not valid UTF-8 text; pass UTF-8")
    return text


def stop_flag(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("'': a stop string must not be empty")
    return text_flag(text)


def ids_flag(text: str) -> list[int]:
    """An argparse type: comma-separated token ids ("1,2,3")."""
    ids = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            ids.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text}: {part!r} is not a token id; pass comma-separated "
                                             "integers such as 1,2,3") from None
        if ids[-1] < 0:
            raise argparse.ArgumentTypeError(f"{text}: token ids are integers >= 0")
    if not ids:
        raise argparse.ArgumentTypeError(f"{text!r}: no token ids; pass comma-separated integers such as 1,2,3")
    return ids


def device_flag(text: str) -> str:
    try:
        return check_device(text, "--device")
    except UserError as e:  # argparse puts "argument --device: " in front: keep the message after the flag
        raise argparse.ArgumentTypeError(str(e).split(" ", 1)[1]) from None
