"""A Hugging Face transformers model on scratchformer's attention, norms and loss, in one line.

    pip install "scratchformer[hf]"
    python examples/hf_model.py                      # a small Llama-style model with random weights: offline
    python examples/hf_model.py --model gpt2         # GPT-2 from the Hub (downloaded the first time)
    python examples/hf_model.py --model gpt2 --device cuda --dtype bfloat16

The one line is `scratchformer.hf.apply(model)`: every layer's attention then runs
`ops.causal_attention` (our fused kernel on a GPU), every LayerNorm and RMSNorm our norms, and
`model(..., labels=...)` its loss through `ops.linear_cross_entropy`, without the logits. Calls
attention cannot compute exactly (a padding mask, attention dropout while training, ...) run on
PyTorch's SDPA and are counted: the script prints the counts at the end.
"""

import argparse

import torch
import transformers

import scratchformer.hf
from scratchformer import data
from scratchformer.tokenizer import BPETokenizer

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", help="a Hugging Face model name or folder (default: a small random Llama-style model)")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
parser.add_argument("--steps", type=int, default=20)
args = parser.parse_args()
dtype = getattr(torch, args.dtype)

if args.model:
    config = transformers.AutoConfig.from_pretrained(args.model)
    if hasattr(config, "attn_pdrop"):
        config.attn_pdrop = 0.0  # GPT-2's attention dropout would send every training call to SDPA
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, config=config, dtype=dtype)
else:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=50257, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      bos_token_id=50256, eos_token_id=50256)  # grouped-query attention: 2 K/V heads
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
tok = BPETokenizer.from_gpt2()
if model.config.vocab_size < tok.n_vocab:
    parser.error(f"{args.model} has a vocabulary of {model.config.vocab_size} tokens; this example feeds it GPT-2's {tok.n_vocab}")
print(f"{type(model).__name__}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; on scratchformer's ops: "
      f"{scratchformer.hf.apply(model)}")
model.to(args.device)

# Fine-tune a few steps on bundled WikiText, tokenized with GPT-2's vocabulary.
text = "".join(data.load_corpus("wikitext2-mini", progress=False)["train"].documents[:10])
ids = torch.tensor(tok.encode_ordinary(text))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4 if args.model else 1e-3)
generator = torch.Generator().manual_seed(0)
model.train()
for step in range(1, args.steps + 1):
    starts = torch.randint(0, len(ids) - 129, (4,), generator=generator)
    batch = torch.stack([ids[s : s + 128] for s in starts.tolist()]).to(args.device)
    loss = model(batch, labels=batch).loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step == 1 or step % max(args.steps // 4, 1) == 0:
        print(f"step {step}: loss {loss.item():.3f}")

# Generate with transformers' own generate(): prefill and every decoding step on our attention.
model.eval()
prompt = torch.tensor([tok.encode("The history of")], device=args.device)
out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False,
                     pad_token_id=tok.eot_id)
print(repr(tok.decode(out[0].tolist())))
print(f"attention calls: {scratchformer.hf.stats()}; fallbacks by reason: {scratchformer.hf.fallbacks() or 'none'}")
