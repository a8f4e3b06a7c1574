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
from dataclasses import dataclass
from typing import Any

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
    """One question with its gold final answer; `id` is stable across runs for the same data."""

    question: str
    answer: str
    id: str


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


def _read_jsonl(path: str | os.PathLike) -> list[tuple[int, dict[str, Any]]]:
    """(1-based line number, object) for every non-blank line of a JSONL file."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: row {lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}: row {lineno}: expected a JSON object")
            rows.append((lineno, row))
    return rows


def _field(row: dict[str, Any], name: str, where: str) -> str:
    value = row.get(name)
    if value is None:
        raise ValueError(f"{where}: missing field {name!r}")
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return str(value)


def gsm8k_gold(solution: str) -> str | None:
    """The final answer of a GSM8K worked solution (text after the last `####`), thousands
    separators removed; None when there is no `####` or nothing after it."""
    if "####" not in solution:
        return None
    gold = solution.rsplit("####", 1)[1].strip().replace(",", "")
    return gold or None


def _gsm8k_rows(rows, source: str, split: str) -> list[Problem]:
    problems = []
    for index, (lineno, row) in enumerate(rows):
        where = f"{source}: row {lineno}"
        question = _field(row, "question", where)
        gold = gsm8k_gold(_field(row, "answer", where))
        if gold is None:
            raise ValueError(f"{where}: field 'answer' has no final answer after '####'")
        problems.append(Problem(question=question, answer=gold, id=f"gsm8k/{split}/{index}"))
    return problems


def load_gsm8k(path: str | None = None, *, split: str = "train") -> list[Problem]:
    """GSM8K problems; gold = the number after `####` with thousands separators removed.

    With `path=None` the `openai/gsm8k` ("main") split is fetched with `datasets` (needs network);
    otherwise `path` is a local JSONL file with GSM8K's `question`/`answer` fields, and `split` is
    only used in the problem ids.
    """
    if path is not None:
        return _gsm8k_rows(_read_jsonl(path), str(path), split)
    try:
        import datasets

        hub = datasets.load_dataset("openai/gsm8k", "main", split=split)
    except Exception as e:
        raise RuntimeError(
            f"load_gsm8k: could not load openai/gsm8k ({type(e).__name__}: {e}); without network "
            "access pass path= a local JSONL file with 'question' and 'answer' fields"
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
    `id` or `unique_id` field when present, else `math/<row index>`.
    """
    problems = []
    for index, (lineno, row) in enumerate(_read_jsonl(path)):
        where = f"{path}: row {lineno}"
        question = _field(row, "problem", where)
        if row.get("answer") is not None:
            gold = _field(row, "answer", where).strip()
        elif row.get("solution") is not None:
            gold = last_boxed(_field(row, "solution", where))
            if gold is None:
                raise ValueError(f"{where}: no 'answer' field and no \\boxed{{...}} in 'solution'")
        else:
            raise ValueError(f"{where}: missing field 'answer' (and no 'solution' to take it from)")
        ident = row.get("id", row.get("unique_id"))
        problems.append(
            Problem(question=question, answer=gold, id=str(ident) if ident else f"math/{index}")
        )
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
        raise ValueError("dataset 'arith' is generated, it takes no path")
    n = limit if limit is not None else {"train": 20_000, "test": 512}.get(split, 0)
    return make_arith(n, seed=seed, split=split, **kwargs)


@register_dataset("gsm8k")
def _load_gsm8k(*, split, path, limit, seed, **kwargs) -> list[Problem]:
    return _head(load_gsm8k(path, split=split), limit)


@register_dataset("math")
def _load_math(*, split, path, limit, seed, **kwargs) -> list[Problem]:
    if path is None:
        raise ValueError("dataset 'math' needs path= a local JSONL file with 'problem'/'answer'")
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
        raise ValueError(f"unknown dataset {name!r}; valid names: {sorted(DATASETS)}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
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
