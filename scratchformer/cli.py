"""The `scratchformer` command: train, eval, generate, tokenizer, info.

    scratchformer train                      # the tiny model on the bundled corpus, on CPU, in minutes
    scratchformer train --preset seed --device cuda --amp bf16
    scratchformer generate --checkpoint runs/tiny --prompt "The history of"
"""

from __future__ import annotations

import argparse
import codecs
import difflib
import errno
import math
import os
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import NoReturn

HELP = {
    "train": "train a model (default: the tiny preset on the bundled WikiText-2 mini corpus)",
    "eval": "loss and perplexity of a checkpoint on a corpus split",
    "generate": "continue a prompt with a trained model",
    "tokenizer": "train a BPE tokenizer, or encode / decode with one",
    "info": "what this installation was built with (tokenizer, kernels, GPU)",
    "selftest": "check every fused kernel configuration against the reference on this GPU",
}


class CliError(Exception):
    """A problem with the user's input: printed as one line, no traceback."""


def _add_runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when available)")
    p.add_argument("--kernels", default="auto", choices=["auto", "fused", "reference", "torch"],
                   help="backend of attention and LayerNorm: our CUDA kernels (fused), the from-scratch reference, "
                        "PyTorch's own, or auto (fused where it can run)")


# (group, option, type, what it sets): the model and training settings a preset fills in.
PRESET_OPTIONS = (
    ("model", "n-layers", int, "transformer blocks"),
    ("model", "d-model", int, "width of the residual stream"),
    ("model", "n-heads", int, "attention (query) heads; must divide --d-model"),
    ("model", "n-kv-heads", int, "key/value heads: 1 is multi-query, a divisor of --n-heads grouped-query; unset is one per query head"),
    ("model", "d-ff", int, "hidden width of each feed-forward layer"),
    ("model", "context", int, "longest sequence the model sees, in tokens"),
    ("model", "dropout", float, "dropout probability"),
    ("training", "steps", int, "optimizer steps in the whole run"),
    ("training", "batch-size", int, "sequences per optimizer step, over all processes and accumulation"),
    ("training", "grad-accum", int, "micro-batches per optimizer step (must divide --batch-size)"),
    ("training", "lr-scale", float, "factor on Vaswani's learning rate d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)"),
    ("training", "warmup", int, "steps over which the learning rate rises"),
    ("training", "label-smoothing", float, "probability mass spread over all tokens in the training loss"),
    ("training", "clip", float, "largest gradient norm (0: no clipping)"),
    ("training", "eval-every", int, "steps between evaluations on the eval split"),
    ("training", "checkpoint-every", int, "steps between checkpoints"),
    ("training", "seed", int, "seed of the initial weights and of the training windows"),
)


def _preset_values(field: str) -> str:
    """'tiny: 2, seed: 4': a setting's value in each preset, for --help."""
    from .config import PRESETS

    values = []
    for name, configs in PRESETS.items():
        for config in configs:
            if hasattr(config, field):
                value = getattr(config, field)
                values.append(f"{name}: {'unset' if value is None else value}")
    return ", ".join(values)


class _Parser(argparse.ArgumentParser):
    """Usage mistakes as one line on stderr and exit status 1, like every other bad input."""

    def error(self, message: str) -> NoReturn:
        self.exit(1, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_train(commands) -> None:
    from .config import PRESETS

    t = commands.add_parser("train", help=HELP["train"], description=HELP["train"] + ". Presets: " + ", ".join(PRESETS)
                            + ". Any option below overrides the preset; with --resume, the run's own settings are the defaults.")
    t.add_argument("--preset", help="tiny (CPU demo), seed (the write-up's model) or gpt2 (GPT-2 small, fine-tuning "
                                     "settings); default tiny, or gpt2 with --init-from")
    t.add_argument("--init-from", metavar="GPT2", help="start from a pretrained GPT-2: a Hugging Face name (gpt2, gpt2-medium, ...; "
                                                      "downloaded once) or a local folder; its shape, GPT-2's tokenizer, the gpt2 "
                                                      "preset's training settings unless --preset names others (needs the hf extra)")
    t.add_argument("--data", help="wikitext2-mini (bundled, no network), wikitext2 (downloads the train split once), "
                                   "or a UTF-8 text file / folder of .txt files; default wikitext2-mini, or the run's own with --resume")
    t.add_argument("--out", help="run folder for checkpoint, tokenizer, metrics.csv and loss.png (default runs/PRESET)")
    t.add_argument("--resume", action="store_true", help="continue the checkpoint in --out, on its own corpus and tokenizer")
    t.add_argument("--tokenizer", help="bpe: train a byte-level BPE on the training split (default); gpt2: GPT-2's vocabulary "
                                       "of 50257 tokens; or a tokenizer file (`scratchformer tokenizer train` writes one)")
    t.add_argument("--vocab-size", type=int, help="size of the trained BPE vocabulary, at least 257 (default 8192)")
    groups = {name: t.add_argument_group(f"{name} (overrides the preset)") for name in ("model", "training")}
    for group, name, kind, what in PRESET_OPTIONS:
        groups[group].add_argument(f"--{name}", type=kind, help=f"{what} ({_preset_values(name.replace('-', '_'))})")
    g = groups["model"]
    g.add_argument("--positions", choices=["sinusoidal", "rotary", "learned"], help=f"position encoding ({_preset_values('positions')})")
    g.add_argument("--tied", action="store_true", help=f"reuse the embedding matrix as the output layer ({_preset_values('tie_embeddings')})")
    g.add_argument("--document-mask", action=argparse.BooleanOptionalAction,
                   help="attention stops at each <|endoftext|>, so no token sees an earlier document (default: on for "
                        "corpora of several documents, off for one text file)")
    g = groups["training"]
    g.add_argument("--amp", choices=["auto", "off", "bf16", "fp16"], default="auto", help="mixed precision (default: bf16 on GPUs that have it, off on CPU)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    t.add_argument("--sample-tokens", type=int, default=60, help="tokens of text to print after training (0: none)")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_runtime(t)


def _parser() -> argparse.ArgumentParser:
    from .config import PRESETS, Sampling

    parser = _Parser(prog="scratchformer", description="A GPT-2-style language model built from scratch, on its own kernels.")
    parser.add_argument("--version", action="version", version=f"scratchformer {metadata.version('scratchformer')}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    _add_train(commands)

    e = commands.add_parser("eval", help=HELP["eval"], description=HELP["eval"])
    which = e.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="a run folder, its checkpoint.pt or its model.safetensors")
    which.add_argument("--hf", metavar="GPT2", help="a pretrained GPT-2 instead: a Hugging Face name (gpt2, ...; downloaded "
                                                 "once) or a local folder, with GPT-2's tokenizer (needs the hf extra)")
    e.add_argument("--data", help="corpus (default: the one it was trained on; wikitext2-mini with --hf)")
    e.add_argument("--split", default="eval", help="eval (default), test (wikitext2 only) or train")
    e.add_argument("--stride", type=int, help="score each window's last STRIDE tokens only, so every token has at least "
                                              "context - STRIDE tokens before it (default: the context, windows side by side)")
    e.add_argument("--detokenize", action="store_true", help="undo WikiText's tokenization (1 @,@ 000 -> 1,000) first, as "
                                                             "the GPT-2 paper did; word counts stay the original's")
    e.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off", help="mixed precision (default off)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_runtime(e)

    gen = commands.add_parser("generate", help=HELP["generate"], description=HELP["generate"] + ", streaming the text as it comes.")
    which = gen.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="a run folder, its checkpoint.pt or its model.safetensors")
    which.add_argument("--hf", metavar="GPT2", help="a pretrained GPT-2 instead: a Hugging Face name or a local folder (hf extra)")
    gen.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    gen.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate at most (default 100)")
    gen.add_argument("--temperature", type=float, default=Sampling.temperature,
                     help=f"divides the logits; 0 is greedy (default {Sampling.temperature})")
    gen.add_argument("--top-k", type=int, help="sample from the k most likely tokens")
    gen.add_argument("--top-p", type=float, help="nucleus sampling: the smallest set of tokens with probability >= p")
    gen.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 makes tokens already in the text less likely (default 1.0: off)")
    gen.add_argument("--seed", type=int, help="fix the random choices for a reproducible text")
    _add_runtime(gen)

    tk = commands.add_parser("tokenizer", help=HELP["tokenizer"], description=HELP["tokenizer"])
    tk_cmd = tk.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=_Parser)
    tt = tk_cmd.add_parser("train", help="learn a BPE vocabulary from a corpus's training split")
    tt.add_argument("--data", default="wikitext2-mini", help="corpus, as for train (default wikitext2-mini)")
    tt.add_argument("--vocab-size", type=int, default=8192, help="tokens in the vocabulary, at least 257 (default 8192)")
    tt.add_argument("--out", required=True, help="where to write the tokenizer (JSON)")
    for action, what in (("encode", "text to token ids"), ("decode", "token ids to text")):
        a = tk_cmd.add_parser(action, help=what)
        a.add_argument("--tokenizer", default="gpt2", help="gpt2 (default), a tokenizer.json, or a run folder (its tokenizer.json)")
        a.add_argument("input", nargs="+", help="the text" if action == "encode" else "the ids")

    commands.add_parser("info", help=HELP["info"], description=HELP["info"])
    st = commands.add_parser("selftest", help=HELP["selftest"], description=HELP["selftest"] + ": forward and backward on "
                             "small problems against the float64 reference, as `auto` does once per configuration before trusting it.")
    st.add_argument("--device", default="cuda", help="the GPU to check (default cuda, the current one)")
    parser.commands = {**commands.choices, **{f"tokenizer {a}": p for a, p in tk_cmd.choices.items()}}
    return parser


def _parse(argv: list[str]) -> argparse.Namespace:
    """The arguments; an option the command does not have is that command's error, with the
    nearest option it does have."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        command = parser.commands[args.command + (f" {args.action}" if args.command == "tokenizer" else "")]
        known = [s for action in command._actions for s in action.option_strings]
        hints = [close[0] for e in extra if e.startswith("-") and (close := difflib.get_close_matches(e.split("=")[0], known, 1))]
        command.error(f"unrecognized arguments: {' '.join(extra)}" + (f": did you mean {' '.join(hints)}?" if hints else ""))
    return args


def _load_tokenizer(name: str):
    """gpt2, a tokenizer file, or a run folder's tokenizer.json."""
    from .tokenizer import BPETokenizer

    if name == "gpt2":
        return BPETokenizer.from_gpt2()
    if Path(name).is_dir():
        if not (Path(name) / "tokenizer.json").exists():
            raise CliError(f"--tokenizer {name}: a folder without a tokenizer.json: give a run folder or a tokenizer file")
        name = str(Path(name) / "tokenizer.json")
    return BPETokenizer.load(name)


def _cmd_selftest(args) -> int:
    import torch

    from . import build_info
    from .ops import selfcheck
    from .run import pick_device

    if not torch.cuda.is_available():
        print("scratchformer selftest: no CUDA GPU visible: the fused kernels run only on GPUs, so there is nothing "
              "to check here (every op runs PyTorch's own)")
        return 0
    info = build_info()
    if not info.cuda_kernels:
        raise CliError("this installation has no CUDA kernels (`scratchformer info` says why): reinstall with nvcc present")
    device = pick_device(args.device)
    results = selfcheck.all_checks(device)
    print(f"{selfcheck.device_name(device)}, {info.kernels_cuda and 'CUDA ' + info.kernels_cuda}, torch {info.torch}\n")
    print("| op | configuration | worst output: kernel error vs reference error (float64 truth) | verdict |")
    print("| --- | --- | --- | --- |")
    for r in results:
        print(f"| {r.op} | {r.config} | {r.worst()} | {'ok' if r.passed else 'FAIL'} |")
    failed = [r for r in results if not r.passed]
    print(f"\n{len(results) - len(failed)} of {len(results)} configurations match the reference"
          + (f"; `auto` runs PyTorch's op instead of the {len(failed)} that do not" if failed else ""))
    return 1 if failed else 0


def _cmd_info(args) -> int:
    from . import build_info

    print(build_info())
    return 0


MIN_VOCAB = 257  # the 256 bytes and <|endoftext|>


def _check_vocab_size(size: int) -> None:
    if size < MIN_VOCAB:
        raise CliError(f"--vocab-size must be at least {MIN_VOCAB} (the 256 bytes and <|endoftext|>), got {size}")


# Settings named as the options that set them: "d_model (128) must ..." -> "--d-model (128) must ...".
_OPTIONS = {name.replace("-", "_"): f"--{name}" for _, name, _, _ in PRESET_OPTIONS} | {
    "vocab_size": "--vocab-size", "positions": "--positions", "tie_embeddings": "--tied", "amp": "--amp"}


def _as_options(message: str) -> str:
    """A config's error in the CLI's words: settings with an underscore wherever they appear, the
    others ("context", "positions") where they lead the sentence."""
    message = re.sub(r"\b[a-z]+(?:_[a-z]+)+\b", lambda m: _OPTIONS.get(m.group(), m.group()), message)
    return re.sub(r"^[a-z]+\b", lambda m: _OPTIONS.get(m.group(), m.group()), message)


def _check_train_options(args, tokenizer: str | None) -> None:
    """The options that cannot go together, refused before any work starts."""
    if args.init_from:
        if args.resume:
            raise CliError("--init-from starts a new run from pretrained weights, --resume continues a run: give one of them")
        if tokenizer != "gpt2":
            raise CliError("--init-from trains GPT-2's weights with GPT-2's tokenizer: leave --tokenizer out")
        shape = [f"--{n}" for group, n, _, _ in PRESET_OPTIONS
                 if group == "model" and n not in ("context", "dropout") and getattr(args, n.replace("-", "_")) is not None]
        shape += ["--positions"] * (args.positions is not None) + ["--tied"] * args.tied
        if shape:
            raise CliError(f"{', '.join(shape)}: the model's shape comes from the pretrained weights (--init-from); "
                           "only --context (shorter) and --dropout can change")
    if args.vocab_size is not None:
        if tokenizer == "gpt2":
            raise CliError("--vocab-size sets the size of a trained BPE; GPT-2's vocabulary has 50257 tokens: leave it out")
        if tokenizer not in (None, "bpe"):
            raise CliError(f"--vocab-size sets the size of a trained BPE; --tokenizer {tokenizer} has its own: leave it out")
        _check_vocab_size(args.vocab_size)
    if args.sample_tokens < 0:
        raise CliError(f"--sample-tokens must be 0 or more, got {args.sample_tokens}")


def _cmd_train(args) -> int:
    from . import ops
    from .config import preset, replace
    from .records import resume_checkpoint
    from .run import check_out_dir, pick_device
    from .training import train

    # Every option is checked here, before any work starts.
    name = args.preset or ("gpt2" if args.init_from else "tiny")
    model_cfg, train_cfg = preset(name)
    out = args.out or os.path.join("runs", name)
    check_out_dir(Path(out))
    tokenizer = args.tokenizer or ("gpt2" if name == "gpt2" or args.init_from else None)
    _check_train_options(args, tokenizer)
    if args.resume:  # the run's own settings, unless overridden here
        saved = resume_checkpoint(out)
        preset_cfg, model_cfg = model_cfg, type(model_cfg)(**saved["model_config"])
        if args.preset and replace(preset_cfg, vocab_size=model_cfg.vocab_size, document_token=model_cfg.document_token) != model_cfg:
            raise CliError(f"--preset {args.preset}: {out} holds a model of other settings: resume without --preset, or use another --out")
        train_cfg = type(train_cfg)(**saved["train_config"])
        if args.vocab_size is not None and args.vocab_size != model_cfg.vocab_size:
            raise CliError(f"{out} holds a model with a vocabulary of {model_cfg.vocab_size}, not {args.vocab_size}: "
                           "resume without --vocab-size, or train into another --out")
    try:
        model_cfg = replace(
            model_cfg, vocab_size=args.vocab_size, n_layers=args.n_layers, d_model=args.d_model, n_heads=args.n_heads,
            n_kv_heads=args.n_kv_heads, d_ff=args.d_ff, context=args.context, dropout=args.dropout, positions=args.positions,
            tie_embeddings=True if args.tied else None,
        )
    except ValueError as e:
        raise CliError(_as_options(str(e))) from None
    init_weights = None
    if args.init_from:
        pretrained, _ = _hf_gpt2(args.init_from, "--init-from")
        if args.context is not None and args.context > pretrained.config.context:
            raise CliError(f"--context {args.context}: {args.init_from} was trained with a context of {pretrained.config.context}: "
                           "give at most that")
        model_cfg = replace(pretrained.config, context=args.context, dropout=args.dropout)
        init_weights = pretrained.state_dict()
        init_weights["position_embedding.weight"] = init_weights["position_embedding.weight"][: model_cfg.context]
    device = pick_device(args.device)
    amp = args.amp
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" and torch_bf16(device) else "off"
    try:
        train_cfg = replace(
            train_cfg, steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr_scale=args.lr_scale,
            warmup=args.warmup, label_smoothing=args.label_smoothing, clip=args.clip, eval_every=args.eval_every,
            checkpoint_every=args.checkpoint_every, seed=args.seed, amp=amp,
        )
    except ValueError as e:
        raise CliError(_as_options(str(e))) from None
    ops.set_backend(args.kernels)
    result = train(model_cfg, train_cfg, args.data, out, tokenizer=tokenizer, device=str(device), resume=args.resume,
                   compile=args.compile, progress=not args.no_progress, init_weights=init_weights, document_mask=args.document_mask)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    written = [f for f in ("checkpoint.pt", "model.safetensors", "tokenizer.json", "metrics.csv", "loss.png") if (result.out_dir / f).exists()]
    print(f"run saved in {result.out_dir}: {', '.join(written)}")
    if result.final_eval is not None:
        print(f"eval loss {result.final_eval['loss']:.3f} nats/token against {result.unigram_loss:.3f} for the unigram "
              f"baseline (perplexity {result.final_eval['ppl']:.1f} against {math.exp(result.unigram_loss):.1f})")
    if args.sample_tokens > 0:
        tok = result.tokenizer
        ids = result.model.generate([tok.eot_id], args.sample_tokens, temperature=0.8, top_k=40, seed=0)[1:]
        print("sample:", tok.decode(ids.tolist()).strip())
    return 0


def torch_bf16(device) -> bool:
    import torch

    return torch.cuda.is_bf16_supported() if device.type == "cuda" else False


def _hf_gpt2(name: str, option: str):
    """(our GPT with the weights of a Hugging Face GPT-2, GPT-2's tokenizer); `name` is a hub
    name or a local folder."""
    from .records import CHECKPOINT, WEIGHTS

    folder = Path(name)
    if (folder / CHECKPOINT).exists() or ((folder / WEIGHTS).exists() and not (folder / "config.json").exists()):
        use = f"give it with --checkpoint {name}" if option == "--hf" else f"continue it with --resume --out {name}"
        raise CliError(f"{option} {name}: a scratchformer run folder, not a Hugging Face model: {use}")
    try:
        from .hf import ConversionError, from_hf

        model = from_hf(name)
    except ImportError:
        raise CliError(f'{option} needs Hugging Face transformers: pip install "scratchformer[hf]"') from None
    except ConversionError as e:
        raise CliError(f"{option} {name}: {e}") from None
    from .tokenizer import BPETokenizer

    tok = BPETokenizer.from_gpt2()
    if model.config.vocab_size < tok.vocab_size:
        raise CliError(f"{option} {name}: its vocabulary has {model.config.vocab_size} tokens, fewer than GPT-2's {tok.vocab_size}")
    return model.float(), tok


def _model_from(args):
    from . import ops
    from .records import load_checkpoint, model_from_checkpoint
    from .run import check_backend, pick_device

    device = pick_device(args.device)
    if getattr(args, "hf", None):
        payload = {"data": "wikitext2-mini", "step": None}
        model, tok = _hf_gpt2(args.hf, "--hf")
    else:
        payload = load_checkpoint(args.checkpoint)
        model, tok = model_from_checkpoint(payload)
    ops.set_backend(args.kernels)
    check_backend(model.config, device, "off")  # --kernels fused on a CPU fails here, before any output
    return payload, model.to(device), tok, device


def _cmd_eval(args) -> int:
    from . import data as datamod
    from .evaluation import evaluate, summary

    if args.stride is not None and args.stride < 1:
        raise CliError(f"--stride must be at least 1, got {args.stride}")
    payload, model, tok, device = _model_from(args)
    if args.stride is not None and args.stride > model.config.context:
        raise CliError(f"--stride {args.stride}: at most the model's context, {model.config.context}")
    data = args.data or payload["data"]
    if not args.data and data not in datamod.CORPORA and not Path(data).exists():
        raise CliError(f"the run's corpus {data} is not there any more: give it (or another text) with --data")
    corpus = datamod.load_corpus(data)
    if args.split not in corpus:
        raise CliError(f"--split {args.split}: {data} has the splits {', '.join(corpus)}")
    split = corpus[args.split]
    recorded = payload.get("sources", {}).get(args.split)
    if not args.data and recorded is not None and recorded != split.sha256:
        raise CliError(f"the run's corpus {data} changed since it was trained on it (the {args.split} split's SHA-256 differs): "
                       f"the result would not be the run's; to evaluate on the text as it is now, give --data {data}")
    if args.detokenize:
        split = datamod.wikitext_detokenize(split)
    tokens = datamod.tokenize(split, tok, datamod.token_cache_path(data, args.split + "-detok" * args.detokenize, tok))
    result = evaluate(model, tokens, split.words, device, args.amp, stride=args.stride, progress=not args.no_progress)
    which = args.hf if args.hf else f"step {payload['step']}"
    print(f"{split.name}: {result['tokens']} tokens, loss {result['loss']:.4f}, {summary(result, digits=2)} ({which})")
    return 0


def _cmd_generate(args) -> int:
    from .config import Sampling

    try:
        Sampling(args.temperature, args.top_k, args.top_p, args.repetition_penalty).validate()
    except ValueError as e:
        message = str(e)
        for name in ("temperature", "top_k", "top_p", "repetition_penalty"):
            message = message.replace(name, "--" + name.replace("_", "-"))
        raise CliError(message) from None
    if args.max_new_tokens < 1:
        raise CliError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.seed is not None and not -(2**63) <= args.seed < 2**64:
        raise CliError(f"--seed must be in [-2^63, 2^64), got {args.seed}")
    _, model, tok, _ = _model_from(args)
    prompt = tok.encode(args.prompt, special="allow") if args.prompt else [tok.eot_id]
    context = model.config.context
    if len(prompt) > context:
        print(f"scratchformer generate: note: the prompt has {len(prompt)} tokens, more than the model's context of "
              f"{context}: generating from its last {context}", file=sys.stderr)
        prompt = prompt[-context:]
    if args.prompt[-1:].isspace():
        # The tokenizer attaches a space to the word after it, so a prompt that ends in one asks
        # the model to continue mid-token (GPT-2's tools warn about this too).
        print("scratchformer generate: note: the prompt ends in whitespace, which often makes a worse "
              "continuation: leave the trailing space out", file=sys.stderr)
    print(args.prompt, end="", flush=True)
    # A character may span tokens: the incremental decoder holds back an unfinished one.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def show(token):
        if int(token[0]) != tok.eot_id:
            print(decoder.decode(tok.decode_bytes([int(token[0])])), end="", flush=True)

    model.generate(prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.repetition_penalty,
                   eos=tok.eot_id, seed=args.seed, streamer=show)
    print(decoder.decode(b"", final=True))
    return 0


def _cmd_tokenizer(args) -> int:
    if args.action == "train":
        from . import data as datamod
        from .tokenizer import BPETokenizer, vocab_shortfall

        _check_vocab_size(args.vocab_size)
        out = Path(args.out)
        if out.is_dir():
            raise CliError(f"--out {out}: is a folder: give the path of the file to write, e.g. {out / 'tokenizer.json'}")
        folder = out.parent
        if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
            raise CliError(f"--out {out}: {folder} is not " + ("a writable folder" if folder.is_dir() else "an existing folder")
                           + ": create it, or write somewhere else")
        corpus = datamod.load_corpus(args.data)
        tok = BPETokenizer.train(corpus["train"].documents, args.vocab_size, progress=True)
        tok.save(args.out)
        print(f"{args.out}: {tok.vocab_size} tokens ({len(tok.merges)} merges) from {corpus['train'].name}")
        if tok.vocab_size < args.vocab_size:
            print(f"scratchformer tokenizer: note: {vocab_shortfall(tok, args.vocab_size, corpus['train'].name)}", file=sys.stderr)
        return 0
    tok = _load_tokenizer(args.tokenizer)
    if args.action == "encode":
        print(" ".join(map(str, tok.encode(" ".join(args.input), special="allow"))))
    else:
        try:
            ids = [int(i) for i in args.input]
        except ValueError as e:
            raise CliError(f"decode takes integer token ids: {e}") from None
        print(tok.decode(ids))
    return 0


def _check_utf8(argv: list[str]) -> None:
    """Python turns bytes that are not UTF-8 in arguments into lone surrogates: name the argument."""
    for i, arg in enumerate(argv):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            option = argv[i - 1] if i and argv[i - 1].startswith("-") and not arg.startswith("-") else None
            shown = arg.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            raise CliError(f"{'the value of ' + option if option else 'argument ' + repr(shown)} is not valid UTF-8: "
                           "give text in UTF-8 (check the terminal's or the file's encoding)") from None


def _user_errors() -> tuple[type[Exception], ...]:
    """The errors printed as one line. Looked up only when something was raised, so that the
    tokenizer commands never import torch (which ops and step need)."""
    from .ops import FusedUnavailableError
    from .step import TrainingDiverged

    return CliError, ValueError, FusedUnavailableError, TrainingDiverged


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), "")
    try:
        _check_utf8(argv)
    except CliError as e:
        print(f"scratchformer{' ' + command if command in HELP else ''}: error: {e}", file=sys.stderr)
        return 1
    try:
        args = _parse(argv)
    except SystemExit as e:  # --help (0) or a usage mistake (1), already printed
        return int(e.code or 0)
    run = {"train": _cmd_train, "eval": _cmd_eval, "generate": _cmd_generate, "tokenizer": _cmd_tokenizer, "info": _cmd_info,
           "selftest": _cmd_selftest}[args.command]
    try:
        return run(args)
    except _user_errors() as e:
        if os.environ.get("SCRATCHFORMER_DEBUG"):
            raise
        # The ops name backends as in Python ("backend 'auto'"); here they are --kernels values.
        message = re.sub(r"backend '(\w+)'", r"--kernels \1", str(e)).replace("or 'torch' / 'reference'", "or --kernels torch / reference")
        print(f"scratchformer {args.command}: error: {message}", file=sys.stderr)
        return 1
    except OSError as e:  # a folder that cannot be written, a path that went away
        if os.environ.get("SCRATCHFORMER_DEBUG"):
            raise
        where = f"{e.filename}: " if e.filename else ""
        hint = "free some space, or write elsewhere" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "check the path and its permissions"
        print(f"scratchformer {args.command}: error: {where}{e.strerror or e}: {hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # training's says where the run can resume from
        print(f"\nscratchformer {args.command}: {e or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
