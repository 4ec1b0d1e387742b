"""Train a small GPT on your own text from Python, then continue a prompt with it.

    python examples/train_on_your_text.py notes.txt                  # a UTF-8 text file, or a folder of .txt files
    python examples/train_on_your_text.py notes.txt --steps 1000 --device cuda

The last tenth of the text (of the files, for a folder) is held out to evaluate on. Everything the
`scratchformer train` command does is this one `train` call: the run folder gets the checkpoint,
model.safetensors, tokenizer.json, metrics.csv and loss.png, and `scratchformer generate
--checkpoint runs/my-text` works on it afterwards.
"""

import argparse

from scratchformer.config import preset, replace
from scratchformer.training import train

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("text", help="a UTF-8 text file or a folder of .txt files")
parser.add_argument("--out", default="runs/my-text", help="run folder (default runs/my-text)")
parser.add_argument("--steps", type=int, default=300)
parser.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary learned from your text")
parser.add_argument("--device", default="auto")
parser.add_argument("--prompt", default="The")
args = parser.parse_args()

# Start from a preset and change what you like: any ModelConfig / TrainConfig field.
model_config, train_config = preset("tiny")
model_config = replace(model_config, vocab_size=args.vocab_size, context=128, n_layers=4, positions="rotary")
train_config = replace(train_config, steps=args.steps, eval_every=max(args.steps // 3, 1),
                       checkpoint_every=max(args.steps // 3, 1), warmup=max(args.steps // 3, 1))

result = train(model_config, train_config, args.text, args.out, tokenizer="bpe", device=args.device)
print(f"eval loss {result.final_eval['loss']:.3f} nats/token; a unigram model gets {result.unigram_loss:.3f}")

tok = result.tokenizer
out = result.model.generate(tok.encode(args.prompt), 60, temperature=0.8, top_k=40, eos=tok.eot_id, seed=0)
print(tok.decode(out.tolist()))
