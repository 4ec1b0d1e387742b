"""Your own training loop on scratchformer's parts, without train() or the CLI: the data, one
optimizer step, the evaluation and the checkpoint, each one call.

    python examples/own_loop.py notes.txt --steps 200
"""

import argparse
import dataclasses

import torch

from scratchformer import data
from scratchformer.config import preset, replace
from scratchformer.evaluation import evaluate, unigram_loss
from scratchformer.model import GPT
from scratchformer.records import FORMAT, save_checkpoint
from scratchformer.step import Optimization, forward_backward, update
from scratchformer.tokenizer import BPETokenizer
from scratchformer.windows import sample_windows

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("text", help="a UTF-8 text file or a folder of .txt files")
parser.add_argument("--steps", type=int, default=200)
parser.add_argument("--out", default="own_loop.pt", help="checkpoint file")
args = parser.parse_args()

corpus = data.load_corpus(args.text, progress=False)  # {"train": Split, "eval": Split}
tok = BPETokenizer.train(corpus["train"].documents, 512)
tokens = {name: data.tokenize(corpus[name], tok, progress=False) for name in ("train", "eval")}

model_config, train_config = preset("tiny")
model_config = replace(model_config, vocab_size=tok.vocab_size, context=64, n_layers=2, d_model=64, n_heads=4, d_ff=128)
train_config = replace(train_config, steps=args.steps, batch_size=8, warmup=max(args.steps // 4, 1))
device = torch.device("cpu")
torch.manual_seed(0)
model = GPT(model_config).to(device)
opt = Optimization.for_model(model, model_config, train_config, device)
sampler = torch.Generator().manual_seed(0)

for step in range(1, args.steps + 1):
    x, y = sample_windows(tokens["train"], train_config.batch_size, model_config.context, sampler)
    loss = forward_backward(model, [(x, y)], opt, train_config, device)
    lr = update(model, opt, train_config.clip)
    if step % max(args.steps // 4, 1) == 0:
        print(f"step {step}: train loss {loss:.3f}, lr {lr:.2e}")

result = evaluate(model, tokens["eval"], corpus["eval"].words, device)
print(f"eval loss {result['loss']:.3f} nats/token; a unigram model gets {unigram_loss(tokens['train'], tokens['eval'], tok.vocab_size):.3f}")
save_checkpoint(args.out, {"format": FORMAT, "step": args.steps, "model": model.state_dict(), **opt.state_dict(),
                           "model_config": dataclasses.asdict(model_config), "tokenizer": tok.to_dict()})
print(f"saved {args.out}")
