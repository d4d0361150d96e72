"""Answer extraction and string normalisation: pure string code, linear time, no sympy.

Extraction follows the Qwen2.5-Math evaluation order (``parser.py: extract_answer``) so that accuracies are
comparable with published numbers. Normalisation is a deliberately conservative cousin of Qwen's
``strip_string``: it must map a gold and a correct prediction to the same key, but never merge two different
golds (Qwen's unit list deletes single letters such as ``a`` or ``t``, which would merge variables).
"""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = ["extract_answer", "extract_boxed", "normalize_answer", "answer_key", "parse_number"]

_BOX_RE = re.compile(r"\\(?:boxed|fbox|framebox)(?![a-zA-Z])")
_BRACE_RE = re.compile(r"\\.|[{}]", re.DOTALL)
_NUMBER_RE = re.compile(r"-?\d*\.?\d+")
_MINERVA_OPEN = "final answer is $"
_MINERVA_CLOSE = "$. I hope"


_MAX_BRACE_SCAN = 100_000  # no answer is longer; an unclosed brace in a megabyte of junk stops here


def _match_brace(text: str, open_idx: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``open_idx`` (escaped ``\\{``/``\\}`` skipped), or None."""
    depth = 0
    for m in _BRACE_RE.finditer(text, open_idx, open_idx + _MAX_BRACE_SCAN):
        tok = m.group()
        if tok == "{":
            depth += 1
        elif tok == "}":
            depth -= 1
            if depth == 0:
                return m.start()
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{…}`` / ``\\fbox{…}`` / ``\\boxed x`` in ``text``, or None.

    An unclosed brace takes the rest of the string (as Qwen does), so truncated generations still yield
    something to grade; the verifier's length limit rejects what is too long to be an answer.
    """
    last = None
    # Scanning from the end keeps this O(len) even when a string holds a million \boxed.
    for cmd in ("\\boxed", "\\fbox", "\\framebox"):
        i = text.rfind(cmd)
        while i >= 0:
            m = _BOX_RE.match(text, i)
            if m:
                if last is None or i > last.start():
                    last = m
                break
            i = text.rfind(cmd, 0, i)
    if last is None:
        return None
    rest_start = last.end()
    j = rest_start
    n = len(text)
    while j < n and text[j] in " \t":
        j += 1
    if j < n and text[j] == "{":
        close = _match_brace(text, j)
        return text[j + 1 :] if close is None else text[j + 1 : close]
    # "\boxed 5$" style: the box takes the following token(s) up to the end of the math span / line.
    tail = text[rest_start:]
    end = len(tail)
    for stop in ("$", "\n"):
        k = tail.find(stop)
        if 0 <= k < end:
            end = k
    return tail[:end].strip()


def _after_phrase(text: str, phrase: str) -> str:
    """What follows the last ``phrase``: its first ``$…$`` span if it starts with one, else up to the line end."""
    rest = text[text.rfind(phrase) + len(phrase) :].lstrip(" :\t")
    if rest.startswith("$"):
        inner = rest.lstrip("$")
        k = inner.find("$")
        return inner if k < 0 else inner[:k]
    if rest.startswith("\\("):
        k = rest.find("\\)")
        return rest[2:] if k < 0 else rest[2:k]
    k = rest.find("\n")
    return rest if k < 0 else rest[:k]


def _last_number(text: str) -> str | None:
    """Qwen's ``re.findall(r"-?\\d*\\.?\\d+", text.replace(",", ""))[-1]``, looking only near the last digit."""
    j = max(text.rfind(d) for d in "0123456789")
    if j < 0:
        return None
    window = text[max(0, j - 1000) : j + 1].replace(",", "")
    last = None
    for last in _NUMBER_RE.finditer(window):  # noqa: B007 - we want the last match
        pass
    return last.group() if last is not None else None


def extract_answer(text: str) -> str | None:
    """The final answer in a model response, Qwen2.5-Math order; None when there is nothing to grade.

    (1) Minerva ``final answer is $…$. I hope``; (2) last ``\\boxed`` with brace matching; (3) ``he answer is``;
    (4) ``final answer is``; (5) the last number. Every step is a find/rfind or a linear regex scan, so a
    megabyte of adversarial text costs milliseconds.
    """
    if not isinstance(text, str) or not text:
        return None
    text = text.replace("\u043a\u0438", "")  # stray "ки" step tags in some PRM-style generations
    pred: str | None = None
    i = text.find(_MINERVA_OPEN)
    if i >= 0 and text.find(_MINERVA_CLOSE, i) >= 0:
        tmp = text[i + len(_MINERVA_OPEN) :]
        pred = tmp[: tmp.find(_MINERVA_CLOSE)]
    if pred is None:
        pred = extract_boxed(text)
    if pred is None and "he answer is" in text:
        pred = _after_phrase(text, "he answer is")
    if pred is None and "final answer is" in text:
        pred = _after_phrase(text, "final answer is")
    if pred is None:
        pred = _last_number(text)
    if pred is None:
        return None
    pred = re.sub(r"\s*\n\s*", " ", pred).strip()
    if pred.startswith(":"):
        pred = pred[1:].strip()
    pred = pred.rstrip(" .").rstrip("/").strip()
    return pred or None


# ---------------------------------------------------------------------------------------------------------------
# Normalisation

_UNIT_WORDS = {
    "cm", "mm", "km", "m", "meter", "meters", "metre", "metres", "inch", "inches", "ft", "feet", "foot", "yard",
    "yards", "mile", "miles", "kg", "g", "gram", "grams", "lb", "lbs", "pound", "pounds", "ounce", "ounces", "s",
    "sec", "second", "seconds", "min", "mins", "minute", "minutes", "h", "hr", "hrs", "hour", "hours", "day", "days",
    "week", "weeks", "month", "months", "year", "years", "dollar", "dollars", "cent", "cents", "degree", "degrees",
    "unit", "units", "sq", "square", "cubic", "liter", "liters", "litre", "litres", "ml", "l", "mph", "kmh",
    "people", "students", "times", "ways", "percent", "radians", "rad", "arcsec", "arcsecs", "arcseconds", "ergs",
    "erg", "K", "J", "W", "N", "Pa", "eV", "keV", "MeV", "Hz", "AU", "pc", "parsec", "parsecs", "Angstroms",
    "angstroms", "magnitudes", "magnitude",
}  # fmt: skip
# Long enough to be a unit word when written bare after a number ("5 cm"): single letters stay (variables).
_BARE_UNITS = {u for u in _UNIT_WORDS if len(u) >= 2 and u not in {"pc", "AU", "Pa", "eV"}}
_TEXT_CMD_RE = re.compile(
    r"\\(?:text|textrm|textnormal|textit|textbf|mathrm|mathbf|mathit|mbox|rm|operatorname\*?)\s*\{"
)
_SPACE_CMD_RE = re.compile(r"\\(?:[,;:! ]|quad|qquad|displaystyle|textstyle|limits)(?![a-zA-Z])")
_DEGREE_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°")
_LEFT_RIGHT_RE = re.compile(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|big|Big)(?![a-zA-Z])")
_VAR_PREFIX_RE = re.compile(r"^\s*(?:[a-zA-Z]|\\[a-zA-Z]+)(?:_\{?[a-zA-Z0-9]+\}?)?\s*(?:=|\\in(?![a-zA-Z]))\s*(?=\S)")
_SIMPLE_NUM = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_NUM_UNIT_RE = re.compile(rf"^({_SIMPLE_NUM})\s*(.*)$")
_TEXT_GROUP_RE = re.compile(r"\\(?:text|textrm|textnormal|mathrm|mbox|rm)\s*\{[^{}]*\}")


def _unwrap_text_cmds(s: str) -> str:
    """``\\text{abc}`` -> ``abc`` (brace-matched, so nested braces survive); linear in practice."""
    out = []
    pos = 0
    for _ in range(1000):  # bounded: adversarial inputs cannot make this quadratic without bound
        m = _TEXT_CMD_RE.search(s, pos)
        if not m:
            break
        close = _match_brace(s, m.end() - 1)
        if close is None:
            break
        out.append(s[pos : m.start()])
        inner = s[m.end() : close]
        if m.group().startswith("\\operatorname"):
            out.append(m.group() + inner + "}")  # \operatorname{arcsin} is maths, keep it
        else:
            out.append(inner)
        pos = close + 1
    out.append(s[pos:])
    return "".join(out)


def _strip_units(s: str) -> str:
    """``1.6 \\mathrm{~cm}`` / ``300 km/s`` -> the number, when everything after the number is a unit.

    Runs before ``\\text`` is unwrapped: a ``\\text``/``\\mathrm`` group after a number is a unit whatever it
    says (Qwen's rule); bare words count only if they are known multi-letter units, since ``2 x`` is a product.
    """
    m = _NUM_UNIT_RE.match(s)
    if not m or not m.group(2):
        return s
    tail, n_text = _TEXT_GROUP_RE.subn("", m.group(2))
    words = re.findall(r"[A-Za-z]+", tail)
    if re.sub(r"[A-Za-z]+|\\cdot|\^\{?-?\d+\}?|[/\s~()]", "", tail):
        return s
    if n_text and all(w in _UNIT_WORDS for w in words):
        return m.group(1)
    if not n_text and words and all(w in _BARE_UNITS for w in words):
        return m.group(1)
    return s


def _strip_dollars(s: str) -> str:
    r"""Drop unescaped ``$`` (math delimiters); ``\$`` is a currency sign and handled separately."""
    return re.sub(r"(?<!\\)\$", "", s)


def normalize_answer(s: str) -> str:
    """A canonical LaTeX-ish answer string, for both golds and extracted predictions.

    Removes presentation (delimiters, ``\\left``, ``\\dfrac``, spacing, ``\\text``, degrees, ``\\$``, ``\\%``,
    trailing units after a number, ``x =`` prefixes, trailing periods) and keeps content. It is applied to
    both sides, so it must be idempotent and must not merge different answers.
    """
    # "\\\\" (a matrix row break) must survive the command regexes below, which would otherwise read its second
    # backslash as the start of "\\ " or "\\left": park it on a character no answer contains.
    s = s.replace("\x00", "").replace("\\\\", "\x00").strip()
    if s.startswith("\\[") and s.endswith("\\]") or s.startswith("\\(") and s.endswith("\\)"):
        s = s[2:-2]
    s = _strip_dollars(s)
    s = re.sub(r"\s+", " ", s).strip()
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _LEFT_RIGHT_RE.sub("", s)
    s = s.replace("{,}", "")  # 1{,}000
    s = _SPACE_CMD_RE.sub(" ", s).replace("~", " ")
    s = _DEGREE_RE.sub("", s)
    s = s.replace("\\$", "").replace("\\%", "").replace("%", "")
    s = re.sub(r"\\(?:varnothing|emptyset)(?![a-zA-Z])", r"\\emptyset", s)
    s = re.sub(r"\\(le|ge|ne)(?![a-zA-Z])", r"\\\1q", s)
    s = s.rstrip(" .,;").lstrip(":").strip()
    s = _strip_units(s)  # "1.6 \\mathrm{~cm}": before \\text is unwrapped, while units are still marked
    s = _unwrap_text_cmds(s)
    s = re.sub(r"\s+", " ", s).strip().rstrip(" .,;").strip()
    m = _VAR_PREFIX_RE.match(s)
    if m and "=" not in s[m.end() :]:
        s = s[m.end() :]
    s = _strip_units(s)  # "V = 100.5 cm^3" -> "100.5 cm^3" -> "100.5"
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\s*(\d)\s*\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\sqrt\s*(\d+|[a-zA-Z])", r"\\sqrt{\1}", s)
    s = re.sub(r"^\{([^{}]*)\}$", r"\1", s)  # a lone group: {5} -> 5
    return s.strip().replace("\x00", "\\\\")


def answer_key(s: str) -> str:
    """Whitespace-free comparison key; plain words compare case-insensitively ("No solution")."""
    key = re.sub(r"\s+", "", s)
    if re.fullmatch(r"[A-Za-z][A-Za-z'\-\s]*[A-Za-z]", s) and len(s.split()) >= 2 or re.fullmatch(r"[A-Za-z]{3,}", s):
        return key.lower()
    return key


# ---------------------------------------------------------------------------------------------------------------
# Plain numbers (the fast exact path)

_INT_RE = re.compile(r"[+-]?\d+")
_THOUSANDS_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_DEC_RE = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+)")
_SCI_RE = re.compile(r"([+-]?(?:\d+\.?\d*|\.\d+))[eE]([+-]?\d+)")
_TIMES10_RE = re.compile(r"([+-]?(?:\d+\.?\d*|\.\d+))(?:\\times|\\cdot|\*|x)10\^\{?([+-]?\d+)\}?")
_SLASH_RE = re.compile(r"([+-]?(?:\d+\.?\d*|\.\d+))/([+-]?(?:\d+\.?\d*|\.\d+))")
_FRAC_RE = re.compile(r"([+-]?)\\frac\{([+-]?(?:\d+\.?\d*|\.\d+))\}\{([+-]?(?:\d+\.?\d*|\.\d+))\}")
_MAX_EXP = 400  # 10**400 is instant; 10**(10**9) would hang, so bigger exponents are "not a plain number"


def parse_number(s: str) -> tuple[Fraction, bool] | None:
    """``(value, exact)`` when ``s`` (normalised) is a plain number, else None.

    ``exact`` is False for decimals/scientific notation, which then compare with a relative tolerance.
    Accepts ints, decimals, ``1,234`` thousands, ``4.5e33``, ``3\\times10^{8}``, ``3/4`` and ``\\frac{3}{4}``.
    """
    s = s.replace(" ", "")
    if not s or len(s) > 64:
        return None
    try:
        if _INT_RE.fullmatch(s):
            return Fraction(int(s)), True
        if _THOUSANDS_RE.fullmatch(s):
            t = s.replace(",", "")
            return Fraction(t), "." not in t
        if _DEC_RE.fullmatch(s):
            return Fraction(s), False
        m = _SCI_RE.fullmatch(s) or _TIMES10_RE.fullmatch(s)
        if m:
            exp = int(m.group(2))
            if abs(exp) > _MAX_EXP:
                return None
            return Fraction(m.group(1)) * Fraction(10) ** exp, False
        m = _SLASH_RE.fullmatch(s)
        if m:
            num, den = Fraction(m.group(1)), Fraction(m.group(2))
            exact = "." not in s
            return (num / den, exact) if den != 0 else None
        m = _FRAC_RE.fullmatch(s)
        if m:
            num, den = Fraction(m.group(2)), Fraction(m.group(3))
            if den == 0:
                return None
            v = num / den
            return (-v if m.group(1) == "-" else v), "." not in s
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    return None


def numbers_equal(a: tuple[Fraction, bool], b: tuple[Fraction, bool], rel_tol: float = 1e-4) -> bool:
    """Exact for two exact numbers; ``rel_tol`` (Qwen grader's ``isclose``) when either is a decimal."""
    (x, ex), (y, ey) = a, b
    if x == y:
        return True
    if ex and ey:
        return False
    return abs(x - y) <= Fraction(rel_tol) * max(abs(x), abs(y))
