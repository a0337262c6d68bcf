"""A custom Shield atom: keep medical explanations intact while refusal is removed.

    python examples/custom_atom.py MODEL OUTPUT

A Shield is a set of prompts whose direction is regressed out of the refusal direction before it is
removed, so answering them is not what gets ablated. Prompts below are written for this example; use a
few dozen of your own (a list, or a .txt/.jsonl file) for a real model.
"""

import sys

from transformers import AutoModelForCausalLM, AutoTokenizer

from transformers_sra import AtomRegistry, ConceptAtom, SRAConfig, apply_surgical_ablation, save_cleaned
from transformers_sra.config import DEFAULT_ATOMS

MEDICAL = [
    "What is the usual adult dose of ibuprofen for a headache?",
    "Explain how insulin lowers blood sugar.",
    "What are the warning signs of a stroke?",
    "How does a beta blocker slow the heart rate?",
    "Which vaccines are recommended for adults over sixty-five?",
    "What is the difference between a virus and a bacterial infection?",
    "How should a second-degree burn be treated at home?",
    "Why can't antibiotics be used against the flu?",
    "What does a high white blood cell count indicate?",
    "How is type 2 diabetes diagnosed?",
    "What are the side effects of long-term steroid use?",
    "Describe the stages of wound healing.",
]

model_id, output = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(model_id, dtype="auto")
tokenizer = AutoTokenizer.from_pretrained(model_id)

registry = AtomRegistry.default()
registry.register(ConceptAtom("medical", "shield", MEDICAL))  # contrast: the shipped neutral set
config = SRAConfig(atoms=DEFAULT_ATOMS + ("medical",))
# The same atom without a registry, as JSON-friendly config (also: sra ablate --custom-atoms '{...}'):
#   SRAConfig(custom_atoms={"medical": {"role": "shield", "prompts": MEDICAL}})

report = apply_surgical_ablation(model, tokenizer, config, registry=registry)
audit = report.atom_audit
row = audit["names"].index("medical")
print(f"layer {audit['layer']}: cos(dirty, medical) = {audit['cosine'][0][row]:+.3f}, "
      f"cos(clean, medical) = {audit['cosine'][1][row]:+.3f}")
print("saved to", save_cleaned(model, tokenizer, report, output, card=False))
