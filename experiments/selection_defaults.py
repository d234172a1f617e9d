"""Which token-selection settings should be the default? Uniform retention, KL on calibration-style text.

    python -m experiments.selection_defaults [--data ../shared/data/tinyshakespeare] [--budget 0.3]

Scores every setting on the same prefilled windows (evict mode) of text that evaluation never uses.
"""

from __future__ import annotations

import argparse
import itertools

from calibrate import data, tasks
from calibrate import scoring as evaluator
from calibrate.models import load_model
from calibrate.paths import shared_data
from runtime.reference import at_budget
from runtime.schedule import Selection


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--data", nargs="+", default=[str(shared_data() / "tinyshakespeare")])
    p.add_argument("--budget", type=float, default=0.3)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--windows", type=int, default=8)
    args = p.parse_args(argv)
    model, tok = load_model(args.model)
    stream = data.token_stream(tok, data.load_texts(args.data))
    ev = evaluator.Evaluator(
        model, tasks.text_examples(data.cut_windows(stream, args.context + 128, args.windows), args.context)
    )
    info = __import__("runtime").model_info(model)
    print(f"uniform schedule at KV fraction {args.budget}, {args.windows} windows of {args.context}+128 tokens")
    print("| per head | query weights | pooling | KL | PPL |\n|---|---|---|---|---|")
    rows = []
    for per_head, weighting, (pooling, kernel) in itertools.product(
        [True, False], ["uniform", "linear"], [("none", 1), ("avg", 5), ("max", 5), ("max", 7), ("max", 9)]
    ):
        sel = Selection(per_head=per_head, query_weighting=weighting, pooling=pooling, pool_kernel=kernel)
        s = at_budget("uniform", info.num_layers, args.budget, args.context, model=info, selection=sel)
        sc = ev.score(s)
        rows.append((sc.kl, per_head, weighting, f"{pooling} {kernel}" if pooling != "none" else "none", sc.ppl))
        print(f"| {per_head} | {weighting} | {rows[-1][3]} | {sc.kl:.4f} | {sc.ppl:.2f} |", flush=True)
    best = min(rows)
    print(f"best: per_head={best[1]} query_weighting={best[2]} pooling={best[3]} (KL {best[0]:.4f})")


if __name__ == "__main__":
    main()
