"""Surgical Refusal Ablation inside an ordinary transformers script: one added line.

    python examples/from_pretrained.py Qwen/Qwen2.5-0.5B-Instruct qwen-sra/

The edit is baked into the weights, so what `save_pretrained` writes is a normal checkpoint: no hooks,
no adapters, no transformers-sra needed to load it.
"""

import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from transformers_sra import apply_surgical_ablation

model_id, output = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(model_id, dtype="auto",
                                             device_map="auto" if torch.cuda.is_available() else None)
tokenizer = AutoTokenizer.from_pretrained(model_id)

report = apply_surgical_ablation(model, tokenizer, progress=True)  # the one line

model.save_pretrained(output)
tokenizer.save_pretrained(output)
report.save(f"{output}/sra_report.json")
chosen = report.chosen
print(f"layer {report.direction_layer}: validation refusal score {report.validation['base_refusal_score']:.3f} -> "
      f"{chosen['refusal_score']:.3f}, KL {chosen['kl']:.3f}, perplexity {chosen['ppl_change']:+.2%}; saved to {output}")
