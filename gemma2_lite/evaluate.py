"""Evaluating a model as the Gemma 2 report does, in miniature: benchmark scores, contamination,
pairwise preference and formatting robustness.

Multiple choice (the log-likelihood way, as lm-evaluation-harness scores HellaSwag or ARC)::

    from gemma2_lite.evaluate import load_eval_set, multiple_choice
    items = load_eval_set("next_line")          # [{"context", "options", "answer"}, ...]
    multiple_choice(model, tok, items, "length")   # {"accuracy", "n", "interval"}

Every option is appended to its context and scored by the sum of its tokens' log-probabilities
(``normalize="none"``) or by their mean (``"length"``: per token); the option with the highest
score is the model's answer. All options of all items go through the one model in batches of
right-padded rows: attention is causal, so no real position ever sees a padded one, and the
padding (whatever its ids) cannot change a score. Rates come with 95% Wilson intervals.

Also here: few-shot prompts (:func:`few_shot`), generative exact match with a stated answer
extractor (:func:`exact_match`, through :func:`gemma2_lite.sampler.generate`), Bradley-Terry
ratings on the Elo scale with bootstrap intervals (:func:`bradley_terry`,
:func:`bootstrap_ratings`, :func:`judge_pairs`), word n-gram contamination
(:func:`contamination`), the report's formatting-robustness measure
(:func:`format_robustness`, :func:`next_line_formats`) and :func:`score_variants`, which
scores any set of model variants (the post-training chapters' models plug in there). The
evaluation sets themselves are ``gemma2_lite/assets/eval/*.jsonl``, built by
``data/build_eval.py``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from numpy.typing import ArrayLike

from .checks import check_int, check_number, is_int
from .contamination import contamination, ngram_index, word_ngrams
from .losses import token_nll
from .memorization import wilson_interval
from .paths import asset, require

__all__ = [
    "NORMALIZATIONS",
    "EVAL_SETS",
    "load_eval_set",
    "option_scores",
    "choose",
    "mc_result",
    "multiple_choice",
    "few_shot",
    "extract_number",
    "extract_line",
    "exact_match",
    "bradley_terry",
    "bootstrap_ratings",
    "judge_pairs",
    "char_ngram_f1",
    "word_ngrams",
    "ngram_index",
    "contamination",
    "next_line_formats",
    "format_robustness",
    "score_variants",
]

NORMALIZATIONS = ("none", "length")
EVAL_SETS = ("next_line", "speaker", "arithmetic")
ELO = 400.0 / math.log(10.0)  # Elo points per natural-log unit of odds
_BUCKET = 32  # row lengths round up to a multiple: few compiles


# ----------------------------------------------------------------------------- the sets
def load_eval_set(name: str, split: str = "test") -> list[dict[str, Any]]:
    """The items of ``gemma2_lite/assets/eval/{name}.jsonl`` whose ``split`` is ``"test"`` or
    ``"shots"`` (few-shot examples, from the corpus's train split). See ``data/README.md``."""
    if name not in EVAL_SETS:
        raise ValueError(f"unknown evaluation set {name!r}; choose one of {EVAL_SETS}")
    if split not in ("test", "shots"):
        raise ValueError(f"split must be 'test' or 'shots', got {split!r}")
    path = require(asset("eval"), f"{name}.jsonl") / f"{name}.jsonl"
    with open(path, encoding="utf-8") as handle:
        items = [json.loads(line) for line in handle if line.strip()]
    return [item for item in items if item["split"] == split]


# ----------------------------------------------------------------------------- multiple choice
def _check_items(items: Sequence[Mapping[str, Any]]) -> None:
    if len(items) == 0:
        raise ValueError("items is empty: give at least one {'context', 'options', 'answer'}")
    for i, item in enumerate(items):
        missing = [k for k in ("context", "options", "answer") if k not in item]
        if missing:
            raise ValueError(
                f"items[{i}] lacks {missing}; a multiple-choice item is "
                "{'context': str, 'options': [str, ...], 'answer': int}"
            )
        options, answer = item["options"], item["answer"]
        if isinstance(options, str) or len(options) < 2:
            raise ValueError(f"items[{i}]['options'] must be a list of at least 2 strings")
        if not is_int(answer) or not 0 <= answer < len(options):
            raise ValueError(
                f"items[{i}]['answer'] must be an int index into its "
                f"{len(options)} options, got {answer!r}"
            )


def _option_rows(
    tokenizer: Any, items: Sequence[Mapping[str, Any]], max_len: int
) -> tuple[list[list[int]], list[int]]:
    """One row per (item, option): ``[<bos>] + ids(context) + ids(option)``, and where the
    option's ids start. Context and option are encoded separately (the option's tokens are
    exactly ``encode(option)``, whatever the context ends with)."""
    rows, starts = [], []
    for i, item in enumerate(items):
        context = [tokenizer.bos_id] + tokenizer.encode(item["context"])
        for k, option in enumerate(item["options"]):
            ids = tokenizer.encode(option)
            if not ids:
                raise ValueError(f"items[{i}] option {k} encodes to no tokens: {option!r}")
            if len(context) + len(ids) - 1 > max_len:
                raise ValueError(
                    f"items[{i}] option {k}: {len(context) + len(ids)} tokens do "
                    f"not fit the model's context of {max_len}; shorten it"
                )
            rows.append(context + ids)
            starts.append(len(context))
    return rows, starts


@nnx.jit
def _option_sums(model: Any, batch: jax.Array, mask: jax.Array) -> jax.Array:
    """Sum of log p(target) where ``mask``: batch int (B, T + 1), mask (B, T) -> (B,)."""
    logits = model(batch[:, :-1])  # (B, T, V)
    logp = -token_nll(logits, batch[:, 1:])  # (B, T)
    return jnp.sum(jnp.where(mask, logp, 0.0), axis=-1)


def option_scores(
    model: Any, tokenizer: Any, items: Sequence[Mapping[str, Any]], *, batch_size: int = 32
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per item, ``(logp, tokens)``: float64 (K,) the summed log-probability of each option's
    tokens given ``<bos>`` + context, and int (K,) how many tokens each option has.

    Rows are sorted by length and taken ``batch_size`` at a time, right-padded to a multiple
    of 32 (the last batch filled with copies of a row whose mask is 0), so a handful of
    compiled shapes serve any set. ``model(tokens)`` must return logits (B, T, V).
    """
    _check_items(items)
    check_int(batch_size, "batch_size", low=1)
    max_len = getattr(getattr(model, "config", None), "max_seq_len", 1 << 30)
    rows, starts = _option_rows(tokenizer, items, max_len)
    order = sorted(range(len(rows)), key=lambda r: len(rows[r]))
    sums = np.zeros(len(rows))
    for first in range(0, len(rows), batch_size):
        chunk = order[first : first + batch_size]
        width = min(-(-max(len(rows[r]) - 1 for r in chunk) // _BUCKET) * _BUCKET, max_len)
        batch = np.zeros((batch_size, width + 1), np.int32)  # pad id 0 (any id would do)
        mask = np.zeros((batch_size, width), bool)
        for j, r in enumerate(chunk):
            batch[j, : len(rows[r])] = rows[r]
            mask[j, starts[r] - 1 : len(rows[r]) - 1] = True  # targets = the option's ids
        got = np.asarray(_option_sums(model, jnp.asarray(batch), jnp.asarray(mask)))
        sums[chunk] = got[: len(chunk)]
    out, r = [], 0
    for item in items:
        k = len(item["options"])
        lengths = np.array([len(rows[r + j]) - starts[r + j] for j in range(k)])
        out.append((sums[r : r + k], lengths))
        r += k
    return out


def choose(logp: ArrayLike, tokens: ArrayLike, normalize: str = "none") -> int:
    """The chosen option: arg-max of ``logp`` (``"none"``) or of ``logp / tokens``
    (``"length"``, the mean log-probability per token); ties go to the lowest index."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    lp, counts = np.asarray(logp, np.float64), np.asarray(tokens, np.float64)
    if lp.ndim != 1 or lp.size == 0:
        raise ValueError(f"logp must hold one log-likelihood per option, got shape {lp.shape}")
    if not np.all(np.isfinite(lp)):
        raise ValueError(f"option log-likelihoods must be finite, got {lp}")
    if normalize == "length" and (counts.shape != lp.shape or not np.all(counts > 0)):
        raise ValueError(
            f"tokens must hold a positive token count per option ({lp.size}), got {counts.tolist()}"
        )
    score = lp if normalize == "none" else lp / counts
    return int(np.argmax(score))


def mc_result(
    scores: Sequence[tuple[np.ndarray, np.ndarray]],
    items: Sequence[Mapping[str, Any]],
    normalize: str = "none",
) -> dict[str, Any]:
    """``{"accuracy", "n", "interval"}`` from :func:`option_scores`' output (95% Wilson)."""
    if len(items) == 0 or len(scores) != len(items):
        raise ValueError(
            f"mc_result needs one score per item and at least one item, got "
            f"{len(scores)} scores for {len(items)} items"
        )
    right = sum(
        choose(lp, nt, normalize) == int(item["answer"])
        for (lp, nt), item in zip(scores, items, strict=True)
    )
    return {
        "accuracy": right / len(items),
        "n": len(items),
        "interval": wilson_interval(right, len(items)),
    }


def multiple_choice(
    model: Any,
    tokenizer: Any,
    items: Sequence[Mapping[str, Any]],
    normalize: str = "none",
    *,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Accuracy of ``model`` on multiple-choice ``items`` by option log-likelihood.

    items: ``{"context": str, "options": [str, ...], "answer": int}`` (extra keys ignored);
    normalize: ``"none"`` (sum of the option's token log-probabilities) or ``"length"`` (their
    mean, per token). Returns ``{"accuracy": float, "n": int, "interval": (lo, hi)}``, the
    interval a 95% Wilson score interval.
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    scores = option_scores(model, tokenizer, items, batch_size=batch_size)
    return mc_result(scores, items, normalize)


# ----------------------------------------------------------------------------- few-shot
def _solved(item: Mapping[str, Any]) -> str:
    if "options" in item:
        return item["context"] + item["options"][item["answer"]]
    return f"{item['prompt']} {item['answer']}"


def few_shot(
    items: Sequence[Mapping[str, Any]],
    shots: Sequence[Mapping[str, Any]],
    k: int,
    *,
    separator: str = "\n\n",
) -> list[dict[str, Any]]:
    """Copies of ``items`` with the first ``k`` of ``shots``, solved, before each prompt.

    A multiple-choice shot is rendered as its context followed by its right option, an
    exact-match shot (``{"prompt", "answer"}``) as ``"{prompt} {answer}"``; shots are joined
    by ``separator``, and one more ``separator`` precedes the item's own context or prompt.
    Every item gets the same shots, in the same order (``k = 0`` gives the items back).
    """
    check_int(
        k, "k", low=0, high=len(shots), what=f"an integer in [0, {len(shots)}] (the shots given)"
    )
    head = "".join(_solved(s) + separator for s in shots[:k])
    key = "context" if items and "options" in items[0] else "prompt"
    return [{**item, key: head + item[key]} for item in items]


# ----------------------------------------------------------------------------- exact match
def extract_number(text: str) -> str | None:
    """The answer extractor for arithmetic: the first integer (an optional ``-`` and digits)
    in ``text``, as a string without leading zeros; None if there is none."""
    found = re.search(r"-?\d+", text)
    if found is None:
        return None
    # By string, not int(): Python refuses int() of more than 4300 digits.
    digits = found.group().lstrip("-").lstrip("0") or "0"
    return "-" + digits if found.group().startswith("-") and digits != "0" else digits


def extract_line(text: str) -> str:
    """The answer extractor for a one-line answer: ``text`` with surrounding spaces and one
    trailing ``.``, ``,``, ``;`` or ``:`` removed."""
    line = text.strip()
    return line[:-1].rstrip() if line[-1:] in (".", ",", ";", ":") else line


def exact_match(
    model: Any,
    tokenizer: Any,
    items: Sequence[Mapping[str, Any]],
    *,
    extract: Callable[[str], str | None] = extract_number,
    stop: Sequence[str] = ("\n",),
    max_new_tokens: int = 8,
    batch_size: int = 64,
    generate_fn: Callable[..., list[list[int]]] | None = None,
) -> dict[str, Any]:
    """Greedy generation after each ``{"prompt", "answer"}`` item; right when
    ``extract(generated text) == extract(answer)``.

    Prompts are ``<bos>`` + ``encode(prompt)``; decoding is greedy
    (:func:`gemma2_lite.sampler.generate` unless ``generate_fn`` is given) and stops at any
    ``stop`` string that is one token (a newline; ``"<end_of_turn>"`` for a chat prompt); the
    text is cut before the first ``stop`` string in it. Returns ``{"accuracy", "n",
    "interval", "outputs", "predictions"}`` (the cut texts and what the extractor made of them).
    """
    if len(items) == 0:
        raise ValueError("items is empty: give at least one {'prompt', 'answer'}")
    for i, item in enumerate(items):
        ok = isinstance(item, Mapping) and "answer" in item and isinstance(item.get("prompt"), str)
        if not ok:
            raise ValueError(
                f"items[{i}] must be {{'prompt': str, 'answer': ...}}, got {item!r:.200}"
            )
    check_int(batch_size, "batch_size", low=1)
    if generate_fn is None:
        from .sampler import generate

        generate_fn = generate
    stop_ids = [ids[0] for ids in map(tokenizer.encode, stop) if len(ids) == 1]
    outputs: list[str] = []
    for first in range(0, len(items), batch_size):
        chunk = items[first : first + batch_size]
        prompts = [[tokenizer.bos_id] + tokenizer.encode(item["prompt"]) for item in chunk]
        new = generate_fn(
            model, prompts, max_new_tokens=max_new_tokens, temperature=0.0, stop_tokens=stop_ids
        )
        for ids in new:
            text = tokenizer.decode(ids)
            outputs.append(min((text.split(s, 1)[0] for s in stop), key=len, default=text))
    predictions = [extract(text) for text in outputs]
    right = sum(
        p is not None and p == extract(str(item["answer"])) for p, item in zip(predictions, items)
    )
    return {
        "accuracy": right / len(items),
        "n": len(items),
        "interval": wilson_interval(right, len(items)),
        "outputs": outputs,
        "predictions": predictions,
    }


# ----------------------------------------------------------------------------- preference
def _win_matrix(pairs: Sequence[tuple[str, str]], names: Sequence[str]) -> np.ndarray:
    index = {name: i for i, name in enumerate(names)}
    wins = np.zeros((len(names), len(names)))
    for winner, loser in pairs:
        if winner == loser:
            raise ValueError(f"a pair needs two different names, got ({winner!r}, {loser!r})")
        wins[index[winner], index[loser]] += 1
    return wins


def _strongly_connected(wins: np.ndarray) -> bool:
    """Every player reaches every other along 'beat' edges (else some rating is infinite)."""
    beat = wins > 0
    reach = beat | np.eye(len(wins), dtype=bool)
    for _ in range(len(wins)):
        reach = reach | ((reach.astype(int) @ reach.astype(int)) > 0)
    return bool(reach.all())


def bradley_terry(
    pairs: Sequence[tuple[str, str]], *, l2: float = 0.0, iters: int = 100
) -> dict[str, float]:
    """Bradley-Terry ratings from ``(winner, loser)`` pairs, on the Elo scale, mean zero.

    The model: p(i beats j) = 1 / (1 + 10 ** ((r_j - r_i) / 400)). The ratings maximise the
    log-likelihood of the pairs minus ``l2 / 2 * sum(theta ** 2)`` (theta = r / (400 / ln 10),
    natural-log odds), by Newton's method. With ``l2 = 0`` (the maximum-likelihood fit, as
    Chatbot Arena computes it) the ratings are finite only if every name can be reached from
    every other along "beat" edges; otherwise a ``ValueError`` says so (a weak prior,
    ``l2 > 0``, makes them finite).
    """
    if len(pairs) == 0:
        raise ValueError("pairs is empty: give at least one (winner, loser)")
    names = sorted({name for pair in pairs for name in pair})
    wins = _win_matrix(pairs, names)
    l2 = check_number(l2, "l2", low=0, what="a finite number >= 0 (the prior's weight)")
    check_int(iters, "iters", low=1, what="a positive integer (Newton steps)")
    if l2 == 0 and not _strongly_connected(wins):
        raise ValueError(
            "some name won (or lost) every game against the rest, so its "
            "maximum-likelihood rating is infinite; pass l2 > 0 (a weak prior)"
        )
    games = wins + wins.T  # (M, M)
    theta = np.zeros(len(names))
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(theta[None, :] - theta[:, None]))  # p[i, j]: i beats j
        grad = wins.sum(1) - (games * p).sum(1) - l2 * theta
        w = games * p * (1 - p)
        hess = np.diag(w.sum(1) + l2) - w  # minus the Hessian
        step = np.linalg.lstsq(hess, grad, rcond=None)[0]
        theta = theta + step
        theta -= theta.mean()
        if np.max(np.abs(step)) < 1e-12:
            break
    return {name: float(ELO * t) for name, t in zip(names, theta)}


def bootstrap_ratings(
    pairs: Sequence[tuple[str, str]],
    *,
    n_boot: int = 200,
    seed: int = 0,
    level: float = 0.95,
    l2: float = 0.0,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of :func:`bradley_terry`'s ratings: the pairs resampled
    with replacement ``n_boot`` times (``numpy.random.default_rng(seed)``), refitted, and the
    ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of each name's rating taken."""
    check_int(n_boot, "n_boot", low=1)
    check_number(level, "level", low=0, high=1, low_open=True, what="a number in (0, 1)")
    if level == 1:
        raise ValueError("level must be a number in (0, 1), got 1")
    rng = np.random.default_rng(seed)
    names = sorted({name for pair in pairs for name in pair})
    draws = []
    for _ in range(n_boot):
        sample = [pairs[int(i)] for i in rng.integers(0, len(pairs), len(pairs))]
        ratings = bradley_terry(sample, l2=l2)
        draws.append([ratings.get(name, np.nan) for name in names])
    lo, hi = np.nanquantile(np.array(draws), [(1 - level) / 2, (1 + level) / 2], axis=0)
    return {name: (float(a), float(b)) for name, a, b in zip(names, lo, hi)}


def judge_pairs(
    outputs: Mapping[str, Sequence[str]],
    judge: Callable[[int, str, str], int],
    *,
    order: str = "both",
    seed: int = 0,
) -> list[tuple[str, str]]:
    """Pairwise judgments between every two variants on every prompt.

    outputs: variant name -> its answer to each prompt (equal lengths). judge(i, first,
    second) returns 1 if the first answer shown is better, -1 if the second, 0 for a tie
    (dropped). ``order``: ``"both"`` shows every pair in both orders (two judgments; a judge's
    preference for a position cancels), ``"random"`` in an order drawn per comparison,
    ``"fixed"`` always the variant listed first in ``outputs`` first (position bias leaks into
    the ratings). Returns ``(winner, loser)`` pairs for :func:`bradley_terry`.
    """
    if order not in ("both", "random", "fixed"):
        raise ValueError(f"order must be 'both', 'random' or 'fixed', got {order!r}")
    names = list(outputs)
    sizes = {len(outputs[name]) for name in names}
    if len(names) < 2 or len(sizes) != 1:
        raise ValueError("outputs needs two or more variants with one answer per prompt each")
    rng = np.random.default_rng(seed)
    pairs: list[tuple[str, str]] = []
    for i in range(sizes.pop()):
        for a in range(len(names)):
            for b in range(a + 1, len(names)):
                shown = [(names[a], names[b]), (names[b], names[a])]
                if order == "fixed" or (order == "random" and rng.random() < 0.5):
                    shown = shown[:1]
                elif order == "random":
                    shown = shown[1:]
                for first, second in shown:
                    verdict = judge(i, outputs[first][i], outputs[second][i])
                    if verdict not in (-1, 0, 1):  # NaN, 2, "yes"
                        raise ValueError(
                            f"judge must return 1, -1 or 0 (a tie), got {verdict!r} for prompt {i}"
                        )
                    if verdict:
                        pairs.append((first, second) if verdict > 0 else (second, first))
    return pairs


def char_ngram_f1(candidate: str, reference: str, n: int = 3) -> float:
    """F1 of the character n-grams (multisets) of two strings, lower-cased: 1 for equal
    strings, 0 when they share no n-gram (a chrF-like overlap, for a reference-based judge)."""
    check_int(n, "n", low=1)

    def grams(s: str) -> dict[str, int]:
        s = s.lower()
        out: dict[str, int] = {}
        for i in range(len(s) - n + 1):
            out[s[i : i + n]] = out.get(s[i : i + n], 0) + 1
        return out

    a, b = grams(candidate), grams(reference)
    common = sum(min(c, b.get(g, 0)) for g, c in a.items())
    if common == 0:
        return 0.0
    precision, recall = common / sum(a.values()), common / sum(b.values())
    return 2 * precision * recall / (precision + recall)


# ----------------------------------------------------------------------------- robustness
def next_line_formats() -> dict[str, Callable[[Mapping[str, Any]], dict[str, Any]]]:
    """Six prompt formats of a ``next_line`` item (fields ``speaker``, ``line``, ``options``,
    ``answer``): each maps it to a multiple-choice item. With the two normalisations they make
    the 12 format x scoring combinations of :func:`format_robustness`."""
    letters = "ABCDEFGH"

    def lettered(x: Mapping[str, Any]) -> dict[str, Any]:
        listed = "".join(f"{letters[k]}. {o}\n" for k, o in enumerate(x["options"]))
        return {
            "context": f"{x['speaker']}.\n{x['line']}\nWhich line comes next?\n{listed}Answer:",
            "options": [f" {letters[k]}" for k in range(len(x["options"]))],
            "answer": x["answer"],
        }

    def make(
        context: Callable[[Mapping[str, Any]], str], prefix: str = ""
    ) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
        return lambda x: {
            "context": context(x),
            "answer": x["answer"],
            "options": [prefix + o for o in x["options"]],
        }

    return {
        "plain": make(lambda x: f"{x['speaker']}.\n{x['line']}\n"),
        "no heading": make(lambda x: f"{x['line']}\n"),
        "question": make(lambda x: f"Which line comes next?\n{x['speaker']}.\n{x['line']}\n"),
        "Q/A": make(
            lambda x: f'Question: what does {x["speaker"]} say after "{x["line"]}"?\nAnswer:', " "
        ),
        "chat": make(
            lambda x: (
                f"<start_of_turn>user\nContinue: {x['line']}<end_of_turn>\n<start_of_turn>model\n"
            )
        ),
        "letters": lettered,
    }


def format_robustness(
    model: Any,
    tokenizer: Any,
    items: Sequence[Mapping[str, Any]],
    formats: Mapping[str, Callable[[Mapping[str, Any]], dict[str, Any]]],
    normalizations: Sequence[str] = NORMALIZATIONS,
    *,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Accuracy under every (format, normalisation) combination and their spread.

    Returns ``{"scores": {(format, normalize): accuracy in %}, "mean", "std" (percentage
    points, population standard deviation over the combinations: they are all there is, not
    a sample), "n"}``. The Gemma 2 report's Table 11 gives this standard deviation for 12
    combinations on MMLU.
    """
    scores = {}
    for name, fmt in formats.items():
        shaped = [fmt(item) for item in items]
        raw = option_scores(model, tokenizer, shaped, batch_size=batch_size)
        for normalize in normalizations:
            scores[(name, normalize)] = 100 * mc_result(raw, shaped, normalize)["accuracy"]
    values = np.array(list(scores.values()))
    return {
        "scores": scores,
        "mean": float(values.mean()),
        "std": float(values.std()),
        "n": len(items),
    }


# ----------------------------------------------------------------------------- variants
def score_variants(
    variants: Mapping[str, Any],
    tokenizer: Any,
    sets: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    normalize: str | Mapping[str, str] = "length",
    batch_size: int = 32,
    max_new_tokens: int = 8,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Score every model variant on every set: ``{variant: {set: result}}``.

    A set of ``{"context", "options", "answer"}`` items is scored by :func:`multiple_choice`
    with ``normalize`` (one convention, or one per set name), a set of ``{"prompt",
    "answer"}`` items by :func:`exact_match` with :func:`extract_number`. Any model that maps
    tokens (B, T) to logits (B, T, V) and shares ``tokenizer`` fits: the book's base and SFT
    models, and the post-training chapters' models.
    """
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for name, model in variants.items():
        table[name] = {}
        for set_name, items in sets.items():
            if items and "options" in items[0]:
                norm = normalize if isinstance(normalize, str) else normalize[set_name]
                result = multiple_choice(model, tokenizer, items, norm, batch_size=batch_size)
            else:
                result = exact_match(
                    model, tokenizer, items, max_new_tokens=max_new_tokens, batch_size=batch_size
                )
            table[name][set_name] = result
    return table
