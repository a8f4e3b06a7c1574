"""Problems and prompts: synthetic arithmetic, GSM8K, MATH-style JSONL, templates, a resumable sampler.

Every dataset yields `Problem(question, answer, id)` where `answer` is the gold *final* answer as a
string ("72", "-5", "\\frac{1}{2}"); how a completion is compared with it is the rewards module's job.

Conventions
-----------
- Synthetic arithmetic questions are compact, `"12+34="`, the format the embedded tiny model is
  trained on. Operands are integers in `[0, max_value]`; the answer is the value of the expression
  under the usual precedence (`*` before `+`/`-`, left to right otherwise). Answers are negative
  only when `"-"` is among the ops.
- The train/test split of the arithmetic space is fixed by a hash of the question text, not by the
  seed: about 1/16 (6.25 %) of all problems are test problems, so no seed can ever put a test
  problem into training. The seed only decides which problems of a split are drawn, and in which
  order.
- File datasets (GSM8K, MATH) are read in file order; `limit` keeps the first rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpo_lab.errors import DataError, one_line

__all__ = [
    "DATASETS",
    "PROMPT_TEMPLATES",
    "Problem",
    "PromptSampler",
    "load_gsm8k",
    "load_math_jsonl",
    "load_problems",
    "make_arith",
    "render_prompt",
]


@dataclass(frozen=True)
class Problem:
    """One question with its gold final answer; `id` is stable across runs for the same data.

    `where` names the file and row it came from (for error messages); it takes no part in
    equality.
    """

    question: str
    answer: str
    id: str
    where: str = field(default="", compare=False, repr=False)


# ---------------------------------------------------------------------------------------------
# Synthetic arithmetic
# ---------------------------------------------------------------------------------------------

ARITH_OPS = ("+", "-", "*")
SPLITS = ("train", "test")
# One problem in TEST_MODULUS (by hash of its question text) is a test problem.
TEST_MODULUS = 16
# Operand spaces up to this many problems are enumerated, so a split yields distinct problems
# until it is exhausted; larger spaces are sampled with rejection (duplicates are skipped).
_ENUMERATE_LIMIT = 200_000


def arith_split_of(question: str) -> str:
    """The split ("train" or "test") a synthetic question belongs to, fixed by a hash of its text.

    NOTE: uses blake2b rather than `hash()`, whose value for strings changes per process.
    """
    digest = hashlib.blake2b(question.encode("utf-8"), digest_size=8).digest()
    return "test" if int.from_bytes(digest, "big") % TEST_MODULUS == 0 else "train"


def _evaluate(operands: Sequence[int], ops: Sequence[str]) -> int:
    """Value of operands[0] ops[0] operands[1] ... with `*` binding tighter than `+` and `-`."""
    total, sign, term = 0, 1, operands[0]
    for op, x in zip(ops, operands[1:]):
        if op == "*":
            term *= x
        else:
            total += sign * term
            sign, term = (1 if op == "+" else -1), x
    return total + sign * term


def _arith_problem(operands: Sequence[int], ops: Sequence[str]) -> Problem:
    question = str(operands[0]) + "".join(op + str(x) for op, x in zip(ops, operands[1:])) + "="
    return Problem(question=question, answer=str(_evaluate(operands, ops)), id=f"arith:{question}")


def _decode_index(index: int, max_value: int, num_operands: int, ops: Sequence[str]):
    """Map an integer in [0, space size) to (operands, chosen ops), mixed radix."""
    operands = []
    for _ in range(num_operands):
        index, digit = divmod(index, max_value + 1)
        operands.append(digit)
    chosen = []
    for _ in range(num_operands - 1):
        index, k = divmod(index, len(ops))
        chosen.append(ops[k])
    return operands, chosen


def make_arith(
    n: int,
    *,
    seed: int,
    split: str = "train",
    max_value: int = 99,
    num_operands: int = 2,
    ops: Sequence[str] = ("+",),
) -> list[Problem]:
    """`n` synthetic arithmetic problems from `split`, drawn by `seed`.

    Difficulty knobs: `max_value` (operands are in `[0, max_value]`), `num_operands` (>= 2) and
    `ops` (a subset of "+", "-", "*", each operator position picks one uniformly).

    Problems are distinct while `n` does not exceed the number of problems in the split; past that
    (only possible for small, enumerable spaces) the split is cycled through again in a fresh
    order, so every problem appears either floor or ceil of `n / size` times.
    """
    if n < 0:
        raise ValueError(f"make_arith: n must be >= 0, got {n}")
    if split not in SPLITS:
        raise ValueError(f"make_arith: split must be one of {SPLITS}, got {split!r}")
    if max_value < 1:
        raise ValueError(f"make_arith: max_value must be >= 1, got {max_value}")
    if num_operands < 2:
        raise ValueError(f"make_arith: num_operands must be >= 2, got {num_operands}")
    ops = tuple(ops)
    if not ops or any(op not in ARITH_OPS for op in ops) or len(set(ops)) != len(ops):
        raise ValueError(
            f"make_arith: ops must be distinct, non-empty, from {ARITH_OPS}; got {ops}"
        )

    rng = random.Random(f"arith:{seed}:{split}")
    space = (max_value + 1) ** num_operands * len(ops) ** (num_operands - 1)
    if space <= _ENUMERATE_LIMIT:
        return _arith_enumerated(n, rng, split, space, max_value, num_operands, ops)
    return _arith_rejection(n, rng, split, space, max_value, num_operands, ops)


def _arith_enumerated(n, rng, split, space, max_value, num_operands, ops) -> list[Problem]:
    pool = []
    for index in range(space):
        problem = _arith_problem(*_decode_index(index, max_value, num_operands, ops))
        if arith_split_of(problem.question) == split:
            pool.append(problem)
    if not pool and n > 0:
        raise ValueError(f"make_arith: the {split!r} split of this problem space is empty")
    out: list[Problem] = []
    while len(out) < n:
        order = pool[:]
        rng.shuffle(order)
        out.extend(order[: n - len(out)])
    return out


def _arith_rejection(n, rng, split, space, max_value, num_operands, ops) -> list[Problem]:
    # The space is at least _ENUMERATE_LIMIT problems; refuse requests that would make rejection
    # of duplicates slow rather than loop for a long time.
    if n > space // (4 * TEST_MODULUS):
        raise ValueError(f"make_arith: n={n} is too large for sampling a space of {space} problems")
    seen: set[str] = set()
    out: list[Problem] = []
    while len(out) < n:
        problem = _arith_problem(*_decode_index(rng.randrange(space), max_value, num_operands, ops))
        if problem.question in seen or arith_split_of(problem.question) != split:
            continue
        seen.add(problem.question)
        out.append(problem)
    return out


# ---------------------------------------------------------------------------------------------
# File datasets
# ---------------------------------------------------------------------------------------------


# Rows named in one error message; the rest are counted.
MAX_LISTED_ROWS = 10


def _bad_rows_error(source: str, bad: list[tuple[int, str]], hint: str = "") -> DataError:
    """One error listing the first MAX_LISTED_ROWS bad rows of ``source`` and counting the rest."""
    shown = "; ".join(f"row {lineno}: {why}" for lineno, why in bad[:MAX_LISTED_ROWS])
    more = f" (and {len(bad) - MAX_LISTED_ROWS} more)" if len(bad) > MAX_LISTED_ROWS else ""
    noun = "row" if len(bad) == 1 else "rows"
    return DataError(f"{source}: {len(bad)} bad {noun}: {shown}{more}{'; ' + hint if hint else ''}")


def _read_jsonl(path: str | os.PathLike) -> tuple[list[tuple[int, dict[str, Any]]], list]:
    """(1-based line number, object) for every non-blank line of a JSONL file, and the
    (line number, reason) of every line that is not a UTF-8 JSON object.

    A missing, unreadable or empty file raises :class:`DataError` naming it.
    """
    file = Path(path)
    if not file.exists():
        raise DataError(f"{path}: no such file")
    if file.is_dir():
        raise DataError(f"{path}: is a folder, expected a JSONL file (one JSON object per line)")
    try:
        data = file.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror or e})") from None
    if not data.strip():
        raise DataError(f"{path}: the file is empty (expected one JSON object per line)")
    rows, bad = [], []
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if lineno == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            bad.append(
                (lineno, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                 "save the file as UTF-8")
            )  # fmt: skip
            continue
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            bad.append((lineno, f"not valid JSON ({e.msg} at column {e.colno})"))
            continue
        if not isinstance(row, dict):
            bad.append((lineno, f"expected a JSON object, got {type(row).__name__}"))
            continue
        rows.append((lineno, row))
    return rows, bad


def _row_fields(row: dict[str, Any], names: Sequence[str]) -> list[str] | str:
    """The string value of each field in ``names``, or why the row cannot give them."""
    missing = [n for n in names if row.get(n) is None]
    if missing:
        return f"missing field {' and '.join(repr(n) for n in missing)}"
    values = []
    for name in names:
        value = row[name]
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            return f"field {name!r} must be a string, got {type(value).__name__}"
        values.append(str(value))
    if not values[0].strip():
        return f"field {names[0]!r} is empty"
    return values


def unscorable_gold(gold: str, *, numeric: bool) -> str | None:
    """Why the reward can never score ``gold`` as correct, or None when it can.

    Asked of the reward's own readers: the gold is reduced to its answer as the reward does
    (``rewards.extract.gold_answer``); it must be non-empty and pass the reward's pre-screen;
    a ``numeric`` task's gold (GSM8K) must read as a plain number (``normalize.parse_number``);
    any other must be readable back from ``\\boxed{...}`` by the reward's extractor (its braces
    balance).
    """
    from grpo_lab.rewards.equivalence import prescreen
    from grpo_lab.rewards.extract import find_boxed, gold_answer
    from grpo_lab.rewards.normalize import parse_number

    answer = gold_answer(gold)
    if not answer:
        return "the gold answer is empty"
    shown = answer if len(answer) <= 40 else answer[:37] + "..."
    why = prescreen(answer)
    if why:
        return f"the gold answer {shown!r} cannot be scored ({why})"
    if parse_number(answer) is not None:
        return None
    if numeric:
        return f"the gold answer {shown!r} is not a number"
    if find_boxed("\\boxed{" + answer + "}") != [answer]:
        return f"the gold answer {shown!r} cannot be read by the reward (unbalanced braces)"
    return None


def gsm8k_gold(solution: str) -> str | None:
    """The final answer of a GSM8K worked solution (text after the last `####`), thousands
    separators removed; None when there is no `####` or nothing after it."""
    if "####" not in solution:
        return None
    gold = solution.rsplit("####", 1)[1].strip().replace(",", "")
    return gold or None


def _gsm8k_rows(rows, source: str, split: str, bad: list | None = None) -> list[Problem]:
    """Problems of GSM8K rows; every bad row (and ``bad``, from reading) is listed in one error."""
    problems, bad = [], list(bad or [])
    for index, (lineno, row) in enumerate(rows):
        fields = _row_fields(row, ("question", "answer"))
        if isinstance(fields, str):
            bad.append((lineno, fields))
            continue
        question, solution = fields
        gold = gsm8k_gold(solution)
        if gold is None:
            bad.append((lineno, "field 'answer' has no final answer after '####'"))
            continue
        why = unscorable_gold(gold, numeric=True)
        if why:
            bad.append((lineno, why))
            continue
        where = f"{source}: row {lineno}"
        problems.append(Problem(question, gold, f"gsm8k/{split}/{index}", where=where))
    if bad:
        hint = "GSM8K rows need a 'question' and an 'answer' ending in '#### <number>'"
        if rows and all("problem" in row for _, row in rows):
            hint += "; these rows have 'problem' fields: is it a MATH file (data.name=math)?"
        raise _bad_rows_error(source, sorted(bad), hint)
    return problems


def load_gsm8k(path: str | None = None, *, split: str = "train") -> list[Problem]:
    """GSM8K problems; gold = the number after `####` with thousands separators removed.

    With `path=None` the `openai/gsm8k` ("main") split is fetched with `datasets` (needs network;
    fails at once when the hub cannot be reached); otherwise `path` is a local JSONL file with
    GSM8K's `question`/`answer` fields, and `split` is only used in the problem ids. Every row is
    checked; all bad rows are listed in one :class:`DataError`.
    """
    if path is not None:
        rows, bad = _read_jsonl(path)
        return _gsm8k_rows(rows, str(path), split, bad)
    from grpo_lab.hub import hub_unreachable_reason

    offline = hub_unreachable_reason()
    if offline:
        raise DataError(
            f"GSM8K's {split!r} split comes from the hub (openai/gsm8k), which {offline}; "
            "use a local JSONL file with 'question' and 'answer' fields instead (data.path / "
            "data.eval_path, or grpo-lab eval --path)"
        )
    try:
        import datasets

        hub = datasets.load_dataset("openai/gsm8k", "main", split=split)
    except Exception as e:
        raise DataError(
            f"could not load openai/gsm8k[{split}] from the hub ({type(e).__name__}: "
            f"{one_line(str(e))[:200]}); use a local JSONL file with 'question' and 'answer' fields"
        ) from e
    rows = [(i + 1, dict(row)) for i, row in enumerate(hub)]
    return _gsm8k_rows(rows, f"openai/gsm8k[{split}]", split)


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` in `text`, braces matched (so `\\boxed{\\frac{1}{2}}` gives
    `\\frac{1}{2}`); None when there is none or its braces never close."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    begin = start + len("\\boxed{")
    depth = 1
    for i in range(begin, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i]
    return None


def load_math_jsonl(path: str | os.PathLike) -> list[Problem]:
    """MATH-style problems from a JSONL file with `problem` and `answer` fields.

    When `answer` is missing the gold is the last `\\boxed{...}` of `solution`. Ids come from an
    `id` or `unique_id` field when present, else `math/<row index>`. Every row is checked (golds
    with :func:`unscorable_gold`); all bad rows are listed in one :class:`DataError`.
    """
    problems = []
    rows, bad = _read_jsonl(path)
    for index, (lineno, row) in enumerate(rows):
        question = _row_fields(row, ("problem",))
        if isinstance(question, str):
            bad.append((lineno, question))
            continue
        if row.get("answer") is not None:
            gold = _row_fields(row, ("answer",))
            if isinstance(gold, str):
                bad.append((lineno, gold))
                continue
            gold = gold[0].strip()
        elif row.get("solution") is not None:
            solution = _row_fields(row, ("solution",))
            gold = None if isinstance(solution, str) else last_boxed(solution[0])
            if gold is None:
                bad.append((lineno, "no 'answer' field and no \\boxed{...} in 'solution'"))
                continue
        else:
            bad.append((lineno, "missing field 'answer' (and no 'solution' to take it from)"))
            continue
        why = unscorable_gold(gold, numeric=False)
        if why:
            bad.append((lineno, why))
            continue
        ident = row.get("id", row.get("unique_id"))
        problems.append(
            Problem(
                question[0],
                gold,
                str(ident) if ident else f"math/{index}",
                where=f"{path}: row {lineno}",
            )
        )
    if bad:
        hint = "MATH rows need a 'problem' and an 'answer' (or a 'solution' with \\boxed{...})"
        if rows and all("question" in row for _, row in rows):
            hint += "; these rows have 'question' fields: is it a GSM8K file (data.name=gsm8k)?"
        raise _bad_rows_error(str(path), sorted(bad), hint)
    return problems


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

DatasetLoader = Callable[..., list[Problem]]
DATASETS: dict[str, DatasetLoader] = {}


def register_dataset(name: str) -> Callable[[DatasetLoader], DatasetLoader]:
    """Register `fn(*, split, path, limit, seed, **kwargs) -> list[Problem]` under `name`."""

    def deco(fn: DatasetLoader) -> DatasetLoader:
        if name in DATASETS:
            raise ValueError(f"dataset {name!r} is already registered")
        DATASETS[name] = fn
        return fn

    return deco


def _head(problems: list[Problem], limit: int | None) -> list[Problem]:
    return problems if limit is None else problems[:limit]


@register_dataset("arith")
def _load_arith(*, split, path, limit, seed, **kwargs) -> list[Problem]:
    if path is not None:
        raise DataError(
            f"dataset 'arith' is generated and reads no file, but a path was given ({path}); "
            "for a JSONL file set the dataset name to gsm8k or math (data.name)"
        )
    n = limit if limit is not None else {"train": 20_000, "test": 512}.get(split, 0)
    return make_arith(n, seed=seed, split=split, **kwargs)


@register_dataset("gsm8k")
def _load_gsm8k(*, split, path, limit, seed, **kwargs) -> list[Problem]:
    return _head(load_gsm8k(path, split=split), limit)


@register_dataset("math")
def _load_math(*, split, path, limit, seed, **kwargs) -> list[Problem]:
    if path is None:
        raise DataError(
            "dataset 'math' needs a local JSONL file with 'problem'/'answer' fields "
            "(data.path / data.eval_path, or grpo-lab eval --path)"
        )
    return _head(load_math_jsonl(path), limit)


def load_problems(
    name: str,
    *,
    split: str,
    path: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    **arith_kwargs: Any,
) -> list[Problem]:
    """Problems of dataset `name` ("arith", "gsm8k", "math", or any registered one).

    For "arith", `limit` is the number of problems (default 20000 for train, 512 for test), `seed`
    picks them and `arith_kwargs` go to `make_arith`. File datasets keep the first `limit` rows and
    ignore `seed` and `arith_kwargs`, so a caller may pass its arithmetic settings whatever the
    dataset.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; valid names: {sorted(DATASETS)}")
    if limit is not None and limit < 0:
        raise DataError(f"limit must be >= 0, got {limit}")
    return DATASETS[name](split=split, path=path, limit=limit, seed=seed, **arith_kwargs)


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------

# The only placeholder is `{question}`, substituted literally (not with str.format), so templates
# and questions may contain braces freely.
PROMPT_TEMPLATES: dict[str, str] = {
    "plain": "{question}",
    "gsm8k": (
        "{question}\n"
        "Reason step by step, then give the final answer as a number on the last line, "
        "written as '#### <answer>'."
    ),
    "boxed": ("{question}\nReason step by step, and put your final answer within \\boxed{}."),
}


def render_prompt(
    question: str,
    *,
    template: str,
    tokenizer: Any = None,
    use_chat_template: bool = False,
    system_prompt: str | None = None,
) -> str:
    """The prompt text for `question`.

    The question is put into `PROMPT_TEMPLATES[template]`; with `use_chat_template` that text becomes
    the user message (after an optional system message) of the tokenizer's chat template, with the
    assistant turn opened (`add_generation_prompt=True`).
    """
    if template not in PROMPT_TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; valid: {sorted(PROMPT_TEMPLATES)}")
    text = PROMPT_TEMPLATES[template].replace("{question}", question)
    if not use_chat_template:
        if system_prompt is not None:
            raise ValueError("system_prompt is only used with use_chat_template=True")
        return text
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "use_chat_template=True but the tokenizer has no chat template; "
            "set use_chat_template=False (the prompt is then the templated question)"
        )
    messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    messages.append({"role": "user", "content": text})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


# ---------------------------------------------------------------------------------------------
# Sampler
# ---------------------------------------------------------------------------------------------


class PromptSampler:
    """Batches of problems drawn without replacement from a per-epoch seeded permutation.

    Epoch `e` uses the permutation of `random.Random(f"{seed}:{e}")`, so the sequence of batches is
    a function of (problems, batch_size, seed) alone. A batch that runs past the end of an epoch is
    completed from the next one (so the same problem can appear twice in that batch); nothing is
    dropped. `state_dict()` after k batches plus `load_state_dict` on a fresh sampler continues
    with exactly batch k+1 of an uninterrupted run.
    """

    def __init__(self, problems: Sequence[Problem], *, batch_size: int, seed: int) -> None:
        if len(problems) == 0:
            raise ValueError("PromptSampler: problems is empty")
        if batch_size < 1:
            raise ValueError(f"PromptSampler: batch_size must be >= 1, got {batch_size}")
        self.problems = list(problems)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.problems)))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def next_batch(self) -> list[Problem]:
        batch = []
        while len(batch) < self.batch_size:
            if self.position == len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
            take = self._order[self.position : self.position + self.batch_size - len(batch)]
            batch.extend(self.problems[i] for i in take)
            self.position += len(take)
        return batch

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_problems": len(self.problems),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key, mine in (("seed", self.seed), ("num_problems", len(self.problems))):
            if state.get(key) != mine:
                raise ValueError(
                    f"PromptSampler.load_state_dict: {key}={state.get(key)} does not match "
                    f"this sampler's {mine}"
                )
        if not 0 <= state["position"] <= len(self.problems):
            raise ValueError(
                f"PromptSampler.load_state_dict: position {state['position']} out of range"
            )
        self.epoch = state["epoch"]
        self.position = state["position"]
        self._order = self._permutation(self.epoch)


# ---------------------------------------------------------------------------------------------
# A run's problems, checked against its settings and its model
# ---------------------------------------------------------------------------------------------


def load_run_problems(data: Any, *, seed: int) -> tuple[list[Problem], list[Problem]]:
    """(training, evaluation) problems of a run's ``data`` settings (a ``DataConfig``).

    Settings that cannot work are refused before anything is read, naming the key to set: a file
    for the generated ``arith`` task, a missing file, a hub download while the hub cannot be
    reached (at once, not after retries). ``data.num_eval=0`` loads no evaluation problems.
    """
    from grpo_lab.config import ConfigError, did_you_mean
    from grpo_lab.hub import hub_unreachable_reason

    if data.template not in PROMPT_TEMPLATES:
        hint = did_you_mean(data.template, PROMPT_TEMPLATES)
        raise ConfigError(
            f"data.template: unknown template {data.template!r}{hint}; valid: "
            f"{sorted(PROMPT_TEMPLATES)}",
            ["data.template"],
        )
    if data.system_prompt is not None and not data.use_chat_template:
        raise ConfigError(
            "data.system_prompt is set but data.use_chat_template is false; a system message "
            "only exists in a chat template",
            ["data.system_prompt", "data.use_chat_template"],
        )
    if data.name == "arith":
        for key in ("path", "eval_path"):
            if getattr(data, key) is not None:
                raise DataError(
                    f"data.{key}={getattr(data, key)}: the 'arith' task is generated and reads "
                    "no file; for a JSONL file set data.name=gsm8k or data.name=math, else drop "
                    f"data.{key}"
                )
    for key in ("path", "eval_path"):
        value = getattr(data, key)
        if value is not None and not Path(value).is_file():
            what = "is a folder" if Path(value).is_dir() else "no such file"
            raise DataError(f"data.{key}={value}: {what} (expected a JSONL file)")
    fields = "'question'/'answer'" if data.name == "gsm8k" else "'problem'/'answer'"
    if data.name != "arith" and data.path is None:
        offline = hub_unreachable_reason() if data.name == "gsm8k" else "has no MATH copy"
        if offline:
            raise DataError(
                f"data.path is not set, so the {data.name} training split would come from the "
                f"hub, which {offline}; set data.path to a local JSONL file with {fields} fields"
            )
    if data.name != "arith" and data.eval_path is None and data.num_eval > 0:
        offline = hub_unreachable_reason() if data.name == "gsm8k" else "has no MATH copy"
        if offline:
            raise DataError(
                f"data.eval_path is not set, so the {data.name} evaluation split would come from "
                f"the hub, which {offline}; set data.eval_path to a local JSONL file with "
                f"{fields} fields (or data.num_eval=0 to train without evaluation)"
            )
    arith = {"max_value": data.max_value, "num_operands": data.num_operands, "ops": tuple(data.ops)}
    train = load_problems(data.name, split="train", path=data.path, seed=seed, **arith)
    evaluation = []
    if data.num_eval > 0:
        evaluation = load_problems(
            data.name, split="test", path=data.eval_path, limit=data.num_eval, seed=seed, **arith
        )
    return train, evaluation


def model_context(model_config: Any, tokenizer: Any = None) -> int | None:
    """Most positions the model takes (prompt + completion), or None when it does not say."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(model_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and 0 < value < 10**8 else None


def fit_prompts(
    problems: Sequence[Problem],
    *,
    tokenizer: Any,
    data: Any,
    context: int | None,
    max_new_tokens: int,
    what: str,
) -> list[Problem]:
    """``problems`` whose rendered prompt fits the model's context minus ``max_new_tokens``.

    With ``data.max_prompt_tokens`` set, longer prompts are dropped (and counted in the log);
    otherwise a prompt that does not fit is an error listing the rows. ``max_new_tokens`` alone
    beyond the context is a :class:`~grpo_lab.config.ConfigError`.
    """
    import logging

    from grpo_lab.config import ConfigError

    budget = None if context is None else context - max_new_tokens
    if budget is not None and budget < 1:
        raise ConfigError(
            f"rollout.max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
            f"context of {context} tokens; set it below {context}",
            ["rollout.max_new_tokens"],
        )
    limit = data.max_prompt_tokens
    if limit is not None and budget is not None and limit > budget:
        raise ConfigError(
            f"data.max_prompt_tokens={limit} + rollout.max_new_tokens={max_new_tokens} is more "
            f"than the model's context of {context} tokens; lower one of them",
            ["data.max_prompt_tokens", "rollout.max_new_tokens"],
        )
    if (limit is None and budget is None) or not problems:
        return list(problems)
    try:
        prompts = [
            render_prompt(
                p.question,
                template=data.template,
                tokenizer=tokenizer,
                use_chat_template=data.use_chat_template,
                system_prompt=data.system_prompt,
            )
            for p in problems
        ]
    except ValueError as e:  # no chat template
        raise ConfigError(f"data.use_chat_template: {e}", ["data.use_chat_template"]) from None
    # NOTE: the tokenizer is asked for lengths only; the rollout tokenizes the same way.
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=True)["input_ids"]]
    cap = limit if limit is not None else budget
    long = [(p, n) for p, n in zip(problems, lengths) if n > cap]
    if not long:
        return list(problems)
    if limit is not None:
        kept = [p for p, n in zip(problems, lengths) if n <= cap]
        logging.getLogger("grpo_lab").warning(
            "data.max_prompt_tokens=%d: dropped %d of %d %s problems with longer prompts",
            limit, len(long), len(problems), what,
        )  # fmt: skip
        if not kept:
            raise DataError(
                f"data.max_prompt_tokens={limit}: every {what} prompt is longer; raise it"
            )
        return kept
    shown = "; ".join(f"{p.where or p.id}: {n} tokens" for p, n in long[:MAX_LISTED_ROWS])
    more = f" (and {len(long) - MAX_LISTED_ROWS} more)" if len(long) > MAX_LISTED_ROWS else ""
    raise DataError(
        f"{len(long)} {what} prompt(s) do not fit the model's context of {context} tokens minus "
        f"rollout.max_new_tokens={max_new_tokens} ({budget} tokens): {shown}{more}; shorten "
        f"them, lower rollout.max_new_tokens, or set data.max_prompt_tokens={budget} (or less) "
        "to drop them"
    )
