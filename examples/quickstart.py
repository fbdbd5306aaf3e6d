"""Load the embedded default weight-sparse model the Hugging Face way, generate, and look inside.

    python examples/quickstart.py
"""

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

MODEL = Path(__file__).resolve().parents[1] / "modeling_csp" / "default_model"
if not (MODEL / "config.json").exists():
    raise SystemExit(
        f"The embedded default model is not in this checkout yet ({MODEL}). Train it with "
        "`python scripts/train_default_tokenizer.py && python scripts/train_default_model.py`, or convert a "
        "released model with `python -m conversion.convert_checkpoint csp_yolo1 DST`."
    )

model = AutoModelForCausalLM.from_pretrained(MODEL, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(MODEL, trust_remote_code=True)
weights = [p for p in model.parameters() if p.ndim == 2]
density = sum(int(p.count_nonzero()) for p in weights) / sum(p.numel() for p in weights)
print(f"{model.config.n_layer} layers, d_model {model.config.d_model}, {100 * density:.1f}% of weights nonzero")

prompt = 'def greet(name):\n    message = "Hello, '
ids = tokenizer(prompt, return_tensors="pt").input_ids
with torch.no_grad():
    out = model.generate(ids, max_new_tokens=24, do_sample=False)
print(tokenizer.decode(out[0]))

# Every hook point carries the reference's name; record some and ablate one layer's MLP neurons.
with torch.no_grad(), model.record_activations(r"\d+\.mlp\.post_act") as acts:
    logits = model(ids).logits
print({name: f"{int((a[0, -1] != 0).sum())} active of {a.shape[-1]}" for name, a in acts.items()})
quote, apostrophe = tokenizer.encode('"')[0], tokenizer.encode("'")[0]
with torch.no_grad(), model.intervene({"1.mlp.post_act": torch.zeros_like}):
    ablated = model(ids).logits
print(f'logit("\\"") - logit("\'"): full {logits[0, -1, quote] - logits[0, -1, apostrophe]:.2f}, '
      f"with layer 1's MLP zeroed {ablated[0, -1, quote] - ablated[0, -1, apostrophe]:.2f}")
