"""Score a model made by another abliteration tool against its base, with transformers-sra's metrics.

    python examples/evaluate_other_tool.py BASE_MODEL EDITED_MODEL [LIMIT]

The same as ``sra evaluate --base BASE --edited EDITED``. The base is measured first (and cached on disk),
then released, so only one model is in memory at a time. LIMIT caps each held-out set (quicker, wider
intervals).
"""

import gc
import sys

from transformers import AutoModelForCausalLM, AutoTokenizer

from transformers_sra.measure.evaluation import EvalSets, cached_evaluation, evaluate_model

base_id, edited_id = sys.argv[1], sys.argv[2]
sets = EvalSets.default(limit=int(sys.argv[3]) if len(sys.argv) > 3 else None)


def load(name):
    return AutoModelForCausalLM.from_pretrained(name, dtype="auto"), AutoTokenizer.from_pretrained(name)


model, tokenizer = load(base_id)
base = cached_evaluation(model, tokenizer, sets)
del model
gc.collect()
model, tokenizer = load(edited_id)
edited = evaluate_model(model, tokenizer, sets, base=base)

for key in ("refusal_rate", "over_refusal_rate", "first_token_kl", "perplexity", "math_perplexity", "code_perplexity"):
    before, after = base.metrics.get(key), edited.metrics.get(key)
    if after is not None:
        print(f"{key:18s} base {before if before is not None else 0:.4f}  edited {after:.4f}")
