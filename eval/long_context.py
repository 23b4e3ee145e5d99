"""Long-context retrieval tasks generated from code alone, scored RULER-style, run through a full or an LRQK cache.

Tasks (RULER's synthetic tasks that need no downloaded text, plus two classics):
    passkey        a 5-digit pass key hidden in repeated noise (Mohtashami & Jaggi)
    niah_single    one "special magic number" needle in the repeated-noise haystack (RULER niah_single_1)
    niah_multikey  one queried needle among 3 distractor needles, word keys (RULER niah_multikey_1);
                   niah_multikey_uuid: UUID keys and values (RULER niah_multikey_3)
    niah_multivalue  one key, 4 values in 4 needles, all asked for (RULER niah_multivalue)
    niah_multiquery  4 keys, all asked for (RULER niah_multiquery)
    vt             variable tracking: find every variable of an assignment chain (RULER vt)
    cwe            common-word extraction from a numbered word list (RULER cwe)
    fwe            frequent-word extraction from Zipf-distributed coded words (RULER fwe)
    mqar           multi-query associative recall over key=value pairs (Zoology MQAR, as text)
    qa             who says a quoted line, among documents of speeches from the embedded corpus (RULER qa's shape)
Every prompt is `context + question`; the filler (noise sentences, list words, pairs) is grown until the prompt
has as many tokens of the model's tokenizer as the target allows. Score = RULER's string_match_all: the share of
reference answers found in the greedy output, x100, averaged over items.

The context is prefilled; the question and the answer are decoded token by token through the cache under test,
so with `--cache lrqk` every question and answer token attends through LRQK's selection (prefilling the whole
prompt would leave the first answer token exact). Full and LRQK runs see the same items.

    python -m eval.long_context --export DIR --tasks passkey,niah_single --lengths 1024,2048 --n 20 --cache full,lrqk
"""

from __future__ import annotations

import argparse
import random
import string
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lrkv.inference.sparse.config import SparseConfig, add_sparse_args, sparse_config

# the task generators' names (TASKS below), spelled here so that --help needs no heavy import
TASK_NAMES = ("passkey", "niah_single", "niah_multikey", "niah_multikey_uuid", "niah_multivalue", "niah_multiquery",
              "vt", "cwe", "fwe", "mqar", "qa")


def parser() -> argparse.ArgumentParser:
    """The command line; needs no heavy import, so --help answers before torch is loaded."""
    ap = argparse.ArgumentParser(prog="python -m eval.long_context", description=__doc__.split("\n\n")[0])
    ap.add_argument("--export", required=True, help="export folder (config.json, model.safetensors, tokenizer.json)")
    ap.add_argument("--tasks", default="passkey,niah_single", help=f"comma list of {', '.join(TASK_NAMES)}")
    ap.add_argument("--lengths", default="512,1024", help="comma list of target prompt lengths in tokens")
    ap.add_argument("--n", type=int, default=10, help="items per task and length")
    ap.add_argument("--cache", default="full,lrqk", help="comma list of full|lrqk")
    ap.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9", help="needle depths, cycled over items")
    add_sparse_args(ap, {"rank": 8, "top_k": 64, "recent": 16, "sinks": 4})
    ap.add_argument("--seed", type=int, default=0, help="item i is generated from seed + i (default %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads; decode steps are too small for more")
    ap.add_argument("--out", default="reports/long_context", help="report folder (long_context.md)")
    return ap


if __name__ == "__main__":  # --help and usage errors are answered here, before torch and the model code load
    parser().parse_args()

import torch  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from eval.common import cli, markdown_table  # noqa: E402
from lrkv.export import open_export  # noqa: E402
from lrkv.inference.full import FullDecoder  # noqa: E402
from lrkv.inference.sparse import SparseDecoder  # noqa: E402
from lrkv.tokenizer import eos_id  # noqa: E402

NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")


@dataclass
class Item:
    task: str
    context: str  # prefilled
    question: str  # decoded through the cache under test; ends where the answer starts
    answers: list[str]

    @property
    def prompt(self) -> str:
        return self.context + self.question


# ---------------------------------------------------------------------------------------------------- building blocks


def pseudo_words(rng: random.Random, count: int) -> list[str]:
    """`count` distinct pronounceable lowercase words of 2-3 consonant-vowel syllables (no word list needed)."""
    words: set[str] = set()
    while len(words) < count:
        words.add("".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(2, 3))))
    return rng.sample(sorted(words), count)  # sorted first: set order is not reproducible across processes


def distinct_strings(rng: random.Random, count: int, make: Callable[[], str]) -> list[str]:
    out: list[str] = []
    while len(out) < count:
        s = make()
        if s not in out:
            out.append(s)
    return out


def haystack(n_fill: int, needles: list[tuple[float, str]]) -> str:
    """n_fill noise sentences with each needle inserted at its depth (0 = first, 1 = last); needles sharing a slot
    keep their order."""
    slots: list[list[str]] = [[] for _ in range(n_fill + 1)]
    for depth, text in needles:
        slots[round(depth * n_fill)].append(text)
    parts: list[str] = []
    for i, slot in enumerate(slots):
        parts += slot
        if i < n_fill:
            parts.append(NOISE[i % len(NOISE)])
    return " ".join(parts)


def magic_value(rng: random.Random, uuid_values: bool) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4)) if uuid_values else str(rng.randint(1_000_000, 9_999_999))


# ---------------------------------------------------------------------------------------------------- generators
# Each generator maps (rng, n filler units, depth, params) -> Item and is deterministic given a fresh rng.


def gen_passkey(rng: random.Random, n: int, depth: float) -> Item:
    key = str(rng.randint(10_000, 99_999))
    intro = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
             "I will quiz you about the important information there.\n")
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    return Item("passkey", intro + haystack(n, [(depth, needle)]), "\nWhat is the pass key? The pass key is", [key])


def gen_niah(rng: random.Random, n: int, depth: float, num_needles: int = 1, key_type: str = "word") -> Item:
    """Needle i: 'One of the special magic numbers for KEY_i is: VALUE_i.'; needle 0 (at `depth`) is queried,
    the others are distractors at random depths. UUID keys come with UUID values (RULER niah_multikey_3)."""
    uuids = key_type == "uuid"
    keys = (distinct_strings(rng, num_needles, lambda: magic_value(rng, True)) if uuids
            else [f"{a}-{b}" for a, b in zip(pseudo_words(rng, num_needles), pseudo_words(rng, num_needles))])
    values = distinct_strings(rng, num_needles, lambda: magic_value(rng, uuids))
    noun = "uuids" if uuids else "numbers"
    needles = [(depth if i == 0 else rng.random(), f"One of the special magic {noun} for {k} is: {v}.")
               for i, (k, v) in enumerate(zip(keys, values))]
    intro = (f"Some special magic {noun} are hidden within the following text. Make sure to memorize it. "
             f"I will quiz you about the {noun} afterwards.\n")
    one = noun[:-1]
    question = (f"\nWhat is the special magic {one} for {keys[0]} mentioned in the provided text? "
                f"The special magic {one} for {keys[0]} mentioned in the provided text is")
    task = "niah_single" if num_needles == 1 else "niah_multikey"
    return Item(task, intro + haystack(n, needles), question, [values[0]])


def gen_niah_multivalue(rng: random.Random, n: int, depth: float, num_values: int = 4) -> Item:
    """One word-pair key with `num_values` values in as many needles (the first at `depth`); all are asked for
    (RULER niah_multivalue)."""
    key = "-".join(pseudo_words(rng, 2))
    values = distinct_strings(rng, num_values, lambda: magic_value(rng, False))
    needles = [(depth if i == 0 else rng.random(), f"One of the special magic numbers for {key} is: {v}.")
               for i, v in enumerate(values)]
    intro = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
             "I will quiz you about the numbers afterwards.\n")
    question = (f"\nWhat are all the special magic numbers for {key} mentioned in the provided text? "
                f"The special magic numbers for {key} mentioned in the provided text are")
    return Item("niah_multivalue", intro + haystack(n, needles), question, values)


def gen_niah_multiquery(rng: random.Random, n: int, depth: float, num_queries: int = 4) -> Item:
    """`num_queries` word-pair keys with one value each (the first at `depth`); every key is asked for
    (RULER niah_multiquery)."""
    words = pseudo_words(rng, 2 * num_queries)
    keys = [f"{a}-{b}" for a, b in zip(words[:num_queries], words[num_queries:])]
    values = distinct_strings(rng, num_queries, lambda: magic_value(rng, False))
    needles = [(depth if i == 0 else rng.random(), f"One of the special magic numbers for {k} is: {v}.")
               for i, (k, v) in enumerate(zip(keys, values))]
    intro = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
             "I will quiz you about the numbers afterwards.\n")
    asked = ", ".join(keys[:-1]) + f", and {keys[-1]}"
    question = (f"\nWhat are all the special magic numbers for {asked} mentioned in the provided text? "
                f"The special magic numbers for {asked} mentioned in the provided text are")
    return Item("niah_multiquery", intro + haystack(n, needles), question, values)


def gen_vt(rng: random.Random, n: int, depth: float, num_chains: int = 2, num_hops: int = 4) -> Item:
    """Chains 'VAR X0 = 12345.', 'VAR X1 = VAR X0.', ... spread in order through the noise; chain 0 is queried.
    (Needle depth does not apply: the hops are spread over the whole context, as in RULER.)"""
    names = distinct_strings(rng, num_chains * (num_hops + 1), lambda: "".join(rng.choices(string.ascii_uppercase, k=5)))
    values = distinct_strings(rng, num_chains, lambda: str(rng.randint(10_000, 99_999)))
    needles = []
    for c in range(num_chains):
        chain = names[c * (num_hops + 1):(c + 1) * (num_hops + 1)]
        depths = sorted(rng.random() for _ in chain)
        needles += [(d, f"VAR {chain[0]} = {values[c]}." if j == 0 else f"VAR {chain[j]} = VAR {chain[j - 1]}.")
                    for j, d in enumerate(depths)]
    needles.sort(key=lambda t: t[0])  # stable: a chain's statements keep their order within one slot
    intro = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n"
    question = (f"\nQuestion: Find all variables that are assigned the value {values[0]} in the text above. "
                f"Answer: According to the chain(s) of variable assignment in the text above, {num_hops + 1} "
                f"variables are assigned the value {values[0]}, they are:")
    return Item("vt", intro + haystack(n, needles), question, names[:num_hops + 1])


def gen_cwe(rng: random.Random, n: int, depth: float, num_cw: int = 10, freq_cw: int = 30, freq_ucw: int = 3) -> Item:
    """A shuffled numbered list: num_cw common words freq_cw times each, n uncommon words freq_ucw times each."""
    words = pseudo_words(rng, num_cw + n)
    entries = [w for w in words[:num_cw] for _ in range(freq_cw)] + [w for w in words[num_cw:] for _ in range(freq_ucw)]
    rng.shuffle(entries)
    intro = ("Below is a numbered list of words. In these words, some appear more often than others. "
             "Memorize the ones that appear most often.\n")
    listing = " ".join(f"{i + 1}. {w}" for i, w in enumerate(entries))
    question = (f"\nQuestion: What are the {num_cw} most common words in the above list? "
                f"Answer: The top {num_cw} words that appear most often in the list are:")
    return Item("cwe", intro + listing, question, words[:num_cw])


def gen_fwe(rng: random.Random, n: int, depth: float, alpha: float = 2.0) -> Item:
    """About n coded words with Zipf(alpha) counts floor(n p_i), shuffled; the answer is the top three.
    The top four get 4, 3, 2, 1 extra copies so that short texts have no ties among them."""
    vocab = max(8, n // 8)
    weights = [1.0 / (i + 1) ** alpha for i in range(vocab)]
    counts = [int(n * w / sum(weights)) + max(0, 4 - i) for i, w in enumerate(weights)]
    coded = distinct_strings(rng, vocab, lambda: "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 6))))
    text = [w for w, c in zip(coded, counts) for _ in range(c)]
    rng.shuffle(text)
    intro = ("Read the following coded text and track the frequency of each coded word. "
             "Find the three most frequently appeared coded words.\n")
    question = ("\nQuestion: What are the three most frequently appeared words in the above coded text? "
                "Answer: According to the coded text above, the three most frequently appeared words are:")
    return Item("fwe", intro + " ".join(text), question, coded[:3])


def gen_mqar(rng: random.Random, n: int, depth: float, num_queries: int = 4) -> Item:
    """n 'key=value' pairs (random three-letter keys, three-digit values), then num_queries queries answered in order; the
    last one, whose pair sits at `depth`, is left open. Earlier queries come answered, as in MQAR's multi-query form."""
    n = max(n, num_queries)
    keys = distinct_strings(rng, n, lambda: "".join(rng.choices(string.ascii_lowercase, k=3)))
    values = [str(rng.randint(100, 999)) for _ in keys]
    target = round(depth * (n - 1))
    others = rng.sample([i for i in range(n) if i != target], num_queries - 1)
    pairs = " ".join(f"{k}={v}" for k, v in zip(keys, values))
    asked = " ".join(f"{keys[i]}={values[i]}" for i in others)
    question = f"\nQueries: {asked} {keys[target]}=" if asked else f"\nQueries: {keys[target]}="
    return Item("mqar", "Remember these key=value pairs.\n" + pairs, question, [values[target]])


def corpus_speeches() -> list[tuple[str, str]]:
    """(speaker, speech) pairs of the embedded Shakespeare corpus: a block that starts with an upper-case name line
    ending in '.' (the plays' layout), its text joined to one line. Cached: parsing takes about a second."""
    global _SPEECHES
    if _SPEECHES is None:
        from lrkv.data import shakespeare_files  # the embedded corpus (lrkv/data.py)

        _SPEECHES = []
        for path in shakespeare_files():
            for block in path.read_text(encoding="utf-8", errors="replace").split("\n\n"):
                head, _, body = block.strip().partition("\n")
                text = " ".join(body.split())
                # short names only (cast lists also start with an upper-case line), short speeches: one per filler unit
                if head.endswith(".") and head[:-1].replace(" ", "").isalpha() and head.isupper() \
                        and len(head) <= 20 and 0 < len(text) <= 100:
                    _SPEECHES.append((head[:-1].title(), text))
    return _SPEECHES


_SPEECHES: list[tuple[str, str]] | None = None


def gen_qa(rng: random.Random, n: int, depth: float, speeches_per_doc: int = 6) -> Item:
    """RULER's QA shape on the embedded corpus: a gold document of `speeches_per_doc` consecutive speeches holding a
    quoted line of 8+ words, placed at `depth` among distractor documents of n speeches in all (drawn from random
    places in the plays; the last may be shorter); the question asks who says the line, the answer is the speaker.
    Distractors that happen to contain the line are left out, so it pins one document."""
    speeches = corpus_speeches()
    gold_rng, rest_rng = random.Random(rng.random()), random.Random(rng.random())  # n only changes the distractors

    def draw(r: random.Random, size: int) -> list[tuple[str, str]]:
        start = r.randrange(len(speeches) - size)
        return speeches[start:start + size]

    while True:
        gold = draw(gold_rng, speeches_per_doc)
        lines = [(who, " ".join(t.split()[:12])) for who, t in gold if len(t.split()) >= 8]
        if lines:
            speaker, line = gold_rng.choice(lines)
            break
    sizes = [speeches_per_doc] * (n // speeches_per_doc) + ([n % speeches_per_doc] if n % speeches_per_doc else [])
    others = [d for d in (draw(rest_rng, size) for size in sizes) if not any(line in t for _, t in d)]
    where = round(depth * len(others))
    docs = others[:where] + [gold] + others[where:]
    body = "\n\n".join(f"Document {i + 1}:\n" + "\n".join(f"{who.upper()}. {t}" for who, t in d)
                         for i, d in enumerate(docs))
    intro = "Answer the question based on the given documents. The following are given documents.\n\n"
    question = (f"\n\nAnswer the question based on the given documents. Question: Which character says "
                f"\"{line}\"? Answer: The character who says it is")
    return Item("qa", intro + body, question, [speaker])


TASKS: dict[str, Callable[..., Item]] = {
    "passkey": gen_passkey,
    "niah_single": gen_niah,
    "niah_multikey": lambda rng, n, depth: gen_niah(rng, n, depth, num_needles=4),
    "niah_multikey_uuid": lambda rng, n, depth: gen_niah(rng, n, depth, num_needles=4, key_type="uuid"),
    "niah_multivalue": gen_niah_multivalue,
    "niah_multiquery": gen_niah_multiquery,
    "vt": gen_vt,
    "cwe": gen_cwe,
    "fwe": gen_fwe,
    "mqar": gen_mqar,
    "qa": gen_qa,
}


# ---------------------------------------------------------------------------------------------------- sizing, scoring


def encode(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def prompt_tokens(tok: Tokenizer, item: Item) -> int:
    return len(encode(tok, item.context)) + len(encode(tok, item.question))


def make_item(task: str, tok: Tokenizer, target_len: int, seed: int, depth: float = 0.5, **params) -> Item:
    """The item with the most filler whose prompt is at most target_len tokens (bisection over the filler count)."""
    if task == "cwe":  # as in RULER, the common words repeat less in short contexts so that they fit at all
        params.setdefault("freq_cw", min(30, max(4, target_len // 150)))
    gen = TASKS[task]

    def size(n: int) -> int:
        return prompt_tokens(tok, gen(random.Random(seed), n, depth, **params))

    base = size(0)
    if base > target_len:
        raise ValueError(f"{task}: even without filler the prompt has {base} tokens > target {target_len}")
    per_unit = max((size(64) - base) / 64, 1e-3)
    lo, hi = 0, int((target_len - base) / per_unit * 1.05) + 2
    while size(hi) <= target_len:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if size(mid) <= target_len else (lo, mid)
    # sizes are only roughly monotone in n (cwe redraws its words, qa its documents): look a little further up
    lo = max([lo] + [m for m in range(lo + 1, lo + 9) if size(m) <= target_len])
    return gen(random.Random(seed), lo, depth, **params)


def string_match_all(prediction: str, answers: list[str]) -> float:
    """RULER's metric for one item: the share of reference answers contained (case-insensitively) in the output."""
    pred = prediction.lower()
    return sum(a.lower() in pred for a in answers) / len(answers)


def ruler_score(predictions: list[str], items: list[Item]) -> float:
    return 100.0 * sum(string_match_all(p, it.answers) for p, it in zip(predictions, items)) / len(items)


# ---------------------------------------------------------------------------------------------------- running


def greedy_answer(decoder, tok: Tokenizer, item: Item, max_new_tokens: int, eos: set[int]) -> str:
    """Prefill the context, then `continue_greedy` through the question."""
    with torch.no_grad():
        logits = decoder.prefill(torch.tensor([encode(tok, item.context)]))
    return tok.decode(continue_greedy(decoder, logits, encode(tok, item.question), max_new_tokens, eos))


@torch.no_grad()
def continue_greedy(decoder, logits: torch.Tensor, question: list[int], max_new_tokens: int,
                    eos: set[int]) -> list[int]:
    """Decode the question token by token, then greedily up to max_new_tokens or a stop id; the new token ids."""
    for t in question:
        logits = decoder.step(torch.tensor([[t]]))
    out: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(logits[0, -1].argmax())
        if nxt in eos:
            break
        out.append(nxt)
        logits = decoder.step(torch.tensor([[nxt]]))
    return out


def stop_ids(tok: Tokenizer) -> set[int]:
    """Our <|endoftext|> when the tokenizer has it: the stop ids of a model built in memory (an export's own are
    open_export(DIR).eos_ids)."""
    return {i for i in [eos_id(tok)] if i is not None}


def answer_budget(tok: Tokenizer, item: Item) -> int:
    """Tokens enough to write every reference answer once, comma separated, plus a little slack."""
    return len(encode(tok, " " + ", ".join(item.answers))) + 4


def make_decoder(model, cache: str, lrqk: SparseConfig):
    return FullDecoder(model) if cache == "full" else SparseDecoder(model, lrqk)


def evaluate(model, tok: Tokenizer, tasks: list[str], lengths: list[int], n: int, caches: list[str],
             lrqk: SparseConfig, depths: list[float], seed: int = 0, eos: set[int] | None = None) -> list[dict]:
    """One row per (task, length, cache): RULER score and, for non-full caches, the share of items whose output
    equals the full cache's output. eos: stop ids (default: our <|endoftext|>)."""
    eos = stop_ids(tok) if eos is None else eos
    rows = []
    for task in tasks:
        for length in lengths:
            items = [make_item(task, tok, length, seed + i, depths[i % len(depths)]) for i in range(n)]
            reference: list[str] | None = None
            for cache in caches:
                t0 = time.time()
                preds = [greedy_answer(make_decoder(model, cache, lrqk), tok, it, answer_budget(tok, it), eos)
                         for it in items]
                row = {"task": task, "length": length, "cache": cache, "n": n, "score": ruler_score(preds, items),
                       "same as full %": "", "s/item": (time.time() - t0) / n}
                if cache == "full":
                    reference = preds
                elif reference is not None:
                    row["same as full %"] = 100.0 * sum(a == b for a, b in zip(preds, reference)) / n
                rows.append(row)
                print(markdown_table([row]).splitlines()[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    ex = open_export(args.export)
    model, tok = ex.model(), ex.tokenizer
    lrqk = sparse_config(args)
    rows = evaluate(model, tok, args.tasks.split(","), [int(x) for x in args.lengths.split(",")], args.n,
                    args.cache.split(","), lrqk, [float(x) for x in args.depths.split(",")], args.seed,
                    set(ex.eos_ids))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows)
    (out / "long_context.md").write_text(f"# Long-context retrieval ({args.export}; LRQK {lrqk.summary()})\n\n{table}")
    print(table)
    return rows


if __name__ == "__main__":
    cli(main)
