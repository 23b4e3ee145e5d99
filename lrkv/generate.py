"""python -m lrkv.generate --checkpoint DIR --prompt "..." [--prompt ...] [--cache full|lrqk] [--stats] [--stream]

Prints prompt + generated text per prompt on stdout (greedy unless --temperature > 0); the memory plan (lrqk)
and, with --stats, cache counters and tokens/s go to stderr. A folder that is not a loadable export, or an
LRQK plan that does not fit this machine, ends with one `error:` line and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from lrkv.inference.sparse.config import add_sparse_args, sparse_config

LRQK_FIELDS = ("rank", "top_k", "recent", "sinks", "policy", "sparse_query_tail")  # the flags --cache lrqk takes
# the parser is built before torch is imported, so these mirror lrkv.inference (tests/test_cli.py checks they agree)
CACHE_MODES, DTYPE_NAMES = ("full", "lrqk"), ("bf16", "fp32")


def parser() -> argparse.ArgumentParser:
    """The command line; needs no heavy import, so --help answers before torch is loaded."""
    p = argparse.ArgumentParser(prog="python -m lrkv.generate", description="Generate text from an lrkv export folder.")
    p.add_argument("--checkpoint", required=True, help="export folder (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch of prompts")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per prompt (default 64)")
    p.add_argument("--chat", action="store_true",
                   help="send each prompt as the user turn of the export's chat template (instruct models) and print "
                        "only the reply")
    p.add_argument("--cache", choices=CACHE_MODES, default="full",
                   help="full: the model's own KV cache (default); lrqk: the LRQK hybrid GPU-CPU decoder")
    lrqk = p.add_argument_group("lrqk cache (only with --cache lrqk; explicit flags override the preset)")
    add_sparse_args(lrqk, dict.fromkeys(LRQK_FIELDS), preset=True)
    s = p.add_argument_group("sampling")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: the smallest set of tokens whose "
                                                           "probability reaches p (default 1.0 = off)")
    s.add_argument("--sample-top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    s.add_argument("--seed", type=int, default=0, help="sampling seed; the same seed repeats the draws (default 0)")
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable); EOS always stops")
    s.add_argument("--stop-id", type=int, action="append", default=[], help="stop token id (repeatable)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--strict-context", action="store_true",
                   help="refuse a prompt + --max-new-tokens longer than the model's max_seq_len (default: warn)")
    p.add_argument("--stats", action="store_true", help="print hit rate, bytes moved and tokens/s to stderr")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated (one prompt)")
    return p


if __name__ == "__main__":  # --help and usage errors are answered here, before torch and the model code load
    parser().parse_args()

import torch  # noqa: E402

from lrkv.export import open_export  # noqa: E402
from lrkv.inference.generator import DTYPES, Generator, Sampling  # noqa: E402
from lrkv.inference.sparse import MemoryPlanError, check_fits  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    if args.cache == "full":
        given = [f"--{f.replace('_', '-')}" for f in ("lrqk_preset", *LRQK_FIELDS) if getattr(args, f) is not None]
        if given:
            p.error(f"{', '.join(given)} only apply to --cache lrqk")
    if args.stream and len(args.prompt) > 1:
        p.error("--stream prints one prompt's tokens as they come; give a single --prompt")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available on this machine")
    return args


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _rate(tokens: int, seconds: float) -> str:
    return f"{tokens / seconds:.1f} tok/s" if seconds > 0 else "n/a"


def print_stats(gen: Generator) -> None:
    t, st = gen.timing, gen.decoder.stats
    print(f"[stats] cache={gen.cache} prefill: {t['prefill_tokens']} tokens in {t['prefill_s']:.3f} s "
          f"({_rate(t['prefill_tokens'], t['prefill_s'])}); decode: {t['decode_tokens']} tokens in "
          f"{t['decode_s']:.3f} s ({_rate(t['decode_tokens'], t['decode_s'])})", file=sys.stderr)
    if gen.cache == "lrqk":
        c = gen.decoder.cfg  # resolved for this prompt
        print(f"[stats] lrqk settings: {c.summary()}", file=sys.stderr)
    steps = max(st.steps, 1)
    hit_rate = f"{100 * st.hits / st.selections:.1f}%" if st.selections else "n/a"
    print(f"[stats] hit rate {hit_rate} (hits {st.hits}, misses {st.misses}, selections {st.selections}); "
          f"bytes moved CPU->GPU: total {_bytes(st.bytes_moved)}, per step {_bytes(st.bytes_moved / steps)} "
          f"over {st.steps} steps", file=sys.stderr)


def run(args: argparse.Namespace) -> None:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    gen = Generator.from_checkpoint(args.checkpoint, device=device, dtype=dtype, cache=args.cache,
                                    lrqk=sparse_config(args) if args.cache == "lrqk" else None,
                                    strict_context=args.strict_context)
    sampling = Sampling(args.temperature, args.sample_top_k, args.top_p, args.seed)
    if args.chat:
        export = open_export(args.checkpoint)
        prompts = [export.chat_prompt(p) for p in args.prompt]
    else:
        prompts = args.prompt
    shown = [""] * len(prompts) if args.chat else prompts  # a chat reply is printed without the template around it
    if args.cache == "lrqk":  # before any cache memory is allocated
        plan = gen.memory_plan(len(prompts), max(len(gen.encode(p)) for p in prompts) + args.max_new_tokens)
        print(f"[memory plan] {plan}", file=sys.stderr)
        check_fits(plan, gen.device)
    kwargs = dict(max_new_tokens=args.max_new_tokens, sampling=sampling, stop=args.stop, stop_ids=args.stop_id)
    if args.stream:
        print(shown[0], end="", flush=True)
        for deltas in gen.stream(prompts, **kwargs):
            print("".join(d.text for d in deltas), end="", flush=True)
        print()
    else:
        for i, c in enumerate(gen.generate(prompts, **kwargs)):
            print(f"{'' if len(prompts) == 1 else f'[{i}] '}{shown[i]}{c.text}")
    if args.stats:
        print_stats(gen)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # warnings (a prompt past max_seq_len) as one plain stderr line, not Python's file:line form
    warnings.showwarning = lambda message, *_, **__: print(f"warning: {message}", file=sys.stderr)
    try:
        run(args)
    except (ValueError, MemoryPlanError) as e:  # ExportError, TokenizerError, GenerateError, LRQK settings
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
