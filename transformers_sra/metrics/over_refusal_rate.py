"""`OverRefusalRate`: the refusal rate on prompts that only sound unsafe (``over_refusal_test``)."""

from __future__ import annotations

from transformers_sra.metrics import refusal_rate  # a module, so evaluate.load finds OverRefusalRate


class OverRefusalRate(refusal_rate.RefusalRate):
    description = ("Share of replies to safe-but-alarming-sounding prompts (killing a process, shooting a photo) "
                   "judged refusals; ablation should not raise it.")
    key = "over_refusal_rate"
