"""A shipped circuit of the embedded model, looked at the way an interpretability user would.

    python examples/circuit_walkthrough.py [TASK]       # default: bracket_brace

The task (bracket_brace): after `x = [1, 2` the model should close with `]`, after `x = {1, 2` with `}`. The
shipped circuit is the set of nodes that still does the task with every other node mean-ablated. We
1. cache a forward pass (`run_with_cache`) and read the circuit's attention heads: where does the last
   position look? (at the opening bracket, if the circuit works the way the paper describes for quotes);
2. run the circuit alone (everything else mean-ablated), then patch out its most important node;
3. rank every node by attribution (gradient x (mean - activation), one backward pass) and compare with
   the pruned circuit.
Any task with a circuit in `modeling_csp/default_model/circuits/` works (see its index.json).
"""

import sys

import torch

from modeling_csp.circuits.ablation import compute_mean_activations, mean_ablate, task_logits
from modeling_csp.circuits.evaluation import node_attributions
from modeling_csp.circuits.graph import CircuitGraph, parse_node_id
from modeling_csp.model.loading import DEFAULT_MODEL_DIR, load_model_and_tokenizer
from modeling_csp.circuits.pruning import top_k_masks
from modeling_csp.circuits.tasks import make_task_dataset
from modeling_csp.model.tokenization import token_texts

TASK = sys.argv[1] if len(sys.argv) > 1 else "bracket_brace"

model, tokenizer = load_model_and_tokenizer("default")
circuit = CircuitGraph.load(DEFAULT_MODEL_DIR / "circuits" / f"{TASK}.json", model=model)
masks = circuit.masks(model.config)
means = compute_mean_activations(model, tokenizer)
batch = make_task_dataset(TASK, tokenizer, n=64, seed=0, max_len=model.config.block_size).test
print(f"circuit: {circuit.n_nodes} of {sum(m.numel() for m in masks.values())} nodes, {circuit.n_edges} edges")


def logit_diff(logits: torch.Tensor) -> torch.Tensor:
    """Correct minus incorrect answer, per prompt."""
    return logits.gather(1, batch.correct_ids[:, None])[:, 0] - logits.gather(1, batch.alternative_ids[:, None])[:, 0]


# 1. One cached forward pass: the attention patterns of the heads the circuit keeps q or k channels of.
heads = sorted({(int(node.split(".")[0]), parse_node_id(node)[1] // model.config.d_head)
                for node in circuit.nodes if ".attn.q:" in node or ".attn.k:" in node})
prompt = 0
length = int(batch.attention_mask[prompt].sum())
ids = batch.input_ids[prompt:prompt + 1, -length:]
with torch.no_grad():
    out, cache = model.run_with_cache(ids, names=[f"{layer}.attn.pattern" for layer, _ in heads])
tokens = token_texts(tokenizer, ids[0].tolist())  # whole characters, never U+FFFD
print(f"prompt: {tokenizer.decode(ids[0])!r}")
for layer, head in heads:
    row = cache[f"{layer}.attn.pattern"][0, head, -1]  # the last position's attention over the prompt
    top = int(row.argmax())
    print(f"layer {layer} head {head}: the last position attends to {tokens[top]!r} at position {top} "
          f"(weight {float(row[top]):.2f})")

# 2. The circuit alone, and without its most important node.
with torch.no_grad():
    full = logit_diff(task_logits(model, batch)).mean()
    with mean_ablate(model, masks, means):
        alone = logit_diff(task_logits(model, batch)).mean()
    key = max((n for n in circuit.nodes if circuit.nodes[n] is not None), key=lambda n: circuit.nodes[n])
    location, index = parse_node_id(key)
    patched = {loc: m.clone() for loc, m in masks.items()}
    patched[location][index] = False
    with mean_ablate(model, patched, means):
        without = logit_diff(task_logits(model, batch)).mean()
print(f"mean logit difference (correct - incorrect): full model {full:.2f}, circuit alone {alone:.2f}, "
      f"circuit without {key} {without:.2f}")

# 3. Attribution: every node's first-order effect of mean ablation, from one backward pass.
attributions = node_attributions(model, batch, means)
by_attribution = top_k_masks(attributions, circuit.n_nodes)
overlap = sum(int((by_attribution[loc] & masks[loc]).sum()) for loc in masks)
best = max(((loc, i) for loc in attributions for i in range(attributions[loc].numel())),
           key=lambda li: float(attributions[li[0]][li[1]]))
print(f"attribution: the top {circuit.n_nodes} nodes share {overlap} with the pruned circuit; "
      f"the top node is {best[0]}:{best[1]} ({'in' if bool(masks[best[0]][best[1]]) else 'not in'} the circuit)")
