"""Quality of the quantized paths on real text: perplexity, and the mean KL divergence of
each path's next-token distributions from a float reference on the same file.

    python scripts/quality.py [--model F.gguf] [--rules RULES ...] [--text FILE] [--ctx 512] [--json]

The reference is hybrid under torch-cpu (every weight dequantized to float32, plain torch).
Each path under test is hybrid under --rules (repeatable: a rule file, a built-in name or
YAML text; default: the family's built-in CPU rules) and, when llama-cpp-python can be
imported (or --llama-path holds it), llama.cpp through Llama(logits_all=True) on the same
token ids. The text (default scripts/data/quality.txt, ~2,800 tokens of plain English
written for this project) is tokenized once by hybrid's tokenizer and cut into chunks of
--ctx tokens, each evaluated from an empty cache; as llama.cpp's perplexity tool does, only
the second half of each chunk is scored, so every scored token has at least ctx/2 of context.
--decode evaluates hybrid one token at a time (the decode step's kernels) instead of one
forward per chunk (the prefill's); llama.cpp likewise."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np
import torch

TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "quality.txt")
REFERENCE_RULES = "torch-cpu"


class HybridPath:
    def __init__(self, path: str, rules: str | None, decode: bool):
        import hybrid

        self.model = hybrid.load(path, rules=rules)
        self.decode = decode
        source = self.model.ruleset.source if self.model.ruleset else None
        self.name = f"hybrid {os.path.basename(str(source)) if source and len(str(source)) < 200 else 'rules text'}"

    @torch.inference_mode()
    def logits(self, ids: list[int]) -> torch.Tensor:
        if not self.decode:
            return self.model.logits(ids, chunk=len(ids))
        cache = self.model.new_cache(1, len(ids))
        return torch.cat([self.model.forward(torch.tensor([[t]]), [i], [0], cache)[0] for i, t in enumerate(ids)]).cpu()


class LlamaPath:
    def __init__(self, path: str, ctx: int, decode: bool, plain_buffers: bool):
        import llama_cpp

        if plain_buffers:  # no repacked or AMX buffers, where those fault
            defaults = llama_cpp.llama_model_default_params

            def params():
                p = defaults()
                p.use_extra_bufts = False
                return p

            llama_cpp.llama_cpp.llama_model_default_params = params
        self.llm = llama_cpp.Llama(path, n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True,
                                   n_threads=os.cpu_count(), n_threads_batch=os.cpu_count(), verbose=False)
        self.decode = decode
        self.name = f"llama.cpp {llama_cpp.__version__}"
        self.system_info = llama_cpp.llama_print_system_info().decode().strip()

    def logits(self, ids: list[int]) -> torch.Tensor:
        self.llm.reset()
        for s in range(0, len(ids), 1 if self.decode else len(ids)):
            self.llm.eval(ids[s : s + (1 if self.decode else len(ids))])
        return torch.from_numpy(np.array(self.llm.scores[: len(ids)], dtype=np.float32))


def score(paths, reference, chunks: list[list[int]]) -> list[dict]:
    """Per path: perplexity, KL(reference || path) mean / 99th percentile, top-1 agreement,
    over the second half of every chunk."""
    acc = {p.name: {"nll": [], "kl": [], "same_top1": 0} for p in [reference, *paths]}
    for ids in chunks:
        first = len(ids) // 2
        targets = torch.tensor(ids[first + 1 :])
        ref_lp = reference.logits(ids)[first:-1].double().log_softmax(-1)
        for p in [reference, *paths]:
            lp = ref_lp if p is reference else p.logits(ids)[first:-1].double().log_softmax(-1)
            a = acc[p.name]
            a["nll"] += (-lp.gather(1, targets[:, None])[:, 0]).tolist()
            a["kl"] += (ref_lp.exp() * (ref_lp - lp)).sum(-1).clamp_min(0).tolist()
            a["same_top1"] += int((lp.argmax(-1) == ref_lp.argmax(-1)).sum())
    rows = []
    for p in [reference, *paths]:
        a = acc[p.name]
        rows.append({
            "path": p.name + (" (float reference)" if p is reference else ""),
            "perplexity": math.exp(float(np.mean(a["nll"]))),
            "mean_kl": float(np.mean(a["kl"])),
            "kl_p99": float(np.percentile(a["kl"], 99)),
            "top1_agreement": a["same_top1"] / len(a["kl"]),
            "scored_tokens": len(a["kl"]),
        })
    return rows


def format_table(report: dict) -> str:
    lines = [f"model: {os.path.basename(report['model'])}; text: {os.path.basename(report['text'])} "
             f"({report['text_tokens']} tokens, {report['chunks']} chunks of {report['ctx']}, "
             f"{report['rows'][0]['scored_tokens']} scored); evaluation: {report['evaluation']}"]
    if report.get("llama_system_info"):
        lines.append(f"llama.cpp system info: {report['llama_system_info']}")
    lines += ["", "| path | perplexity | mean KL vs float | KL 99th pct | top-1 = float |", "|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['path']} | {r['perplexity']:.3f} | {r['mean_kl']:.5f} | {r['kl_p99']:.4f} | {r['top1_agreement']:.1%} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", "-m", help="a GGUF file (default: the built-in model)")
    ap.add_argument("--rules", action="append", metavar="RULES",
                    help="hybrid rules to judge: a rule file, a built-in name or YAML text; repeatable "
                         "(default: the family's built-in CPU rules)")
    ap.add_argument("--text", default=TEXT, help="a UTF-8 text file (default: scripts/data/quality.txt)")
    ap.add_argument("--ctx", type=int, default=512, help="chunk length in tokens (default 512)")
    ap.add_argument("--decode", action="store_true", help="evaluate one token at a time (the decode path)")
    ap.add_argument("--no-llama", action="store_true", help="skip llama.cpp even where it is installed")
    ap.add_argument("--llama-path", metavar="DIR", help="a directory holding the llama_cpp package to use")
    ap.add_argument("--llama-plain-buffers", action="store_true",
                    help="llama.cpp without its extra CPU buffers (repacked weights, AMX): only where those fault")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args()

    from hybrid.cli.defaults import default_model_path

    path = args.model or default_model_path()
    if not os.path.isfile(path):
        ap.error(f"--model {path}: no such file (a GGUF file)")
    if args.ctx < 4:
        ap.error(f"--ctx must be at least 4, got {args.ctx}")
    reference = HybridPath(path, REFERENCE_RULES, args.decode)
    with open(args.text, encoding="utf-8") as f:
        ids = reference.model.tokenizer.encode(f.read())
    chunks = [ids[s : s + args.ctx] for s in range(0, len(ids) - args.ctx + 1, args.ctx)]
    if not chunks:
        ap.error(f"{args.text}: {len(ids)} tokens, fewer than one chunk of --ctx {args.ctx}")
    rules = args.rules or [_cpu_rules(reference.model)]
    paths = [HybridPath(path, r, args.decode) for r in rules]
    report = {"model": path, "text": args.text, "text_tokens": len(ids), "ctx": args.ctx, "chunks": len(chunks),
              "evaluation": "one token at a time (decode)" if args.decode else "one forward per chunk (prefill)"}
    if not args.no_llama:
        if args.llama_path:
            sys.path.insert(0, args.llama_path)
        try:
            llama = LlamaPath(path, args.ctx, args.decode, args.llama_plain_buffers)
        except ImportError:
            print("llama-cpp-python is not installed: its row is left out (see --help)", file=sys.stderr)
        else:
            paths.append(llama)
            report["llama_system_info"] = llama.system_info
    report["rows"] = score(paths, reference, chunks)
    print(json.dumps(report, indent=1) if args.json else format_table(report))


def _cpu_rules(model) -> str:
    """The family's built-in CPU rule file (hybrid.load picks the GPU one where CUDA is)."""
    from hybrid.models import family_name

    return f"{family_name(model.config.model_type)}-cpu"


if __name__ == "__main__":
    main()
