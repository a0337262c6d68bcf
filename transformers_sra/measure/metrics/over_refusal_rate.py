"""`OverRefusalRate` and `HarmlessOutcomes`: the three outcomes on prompts that only sound unsafe, and on plain ones."""

from __future__ import annotations

from transformers_sra.measure.metrics import refusal_rate  # a module, so evaluate.load finds OverRefusalRate


class OverRefusalRate(refusal_rate.RefusalRate):
    description = ("Share of replies to safe-but-alarming-sounding prompts (killing a process, shooting a photo) "
                   "judged refusals; ablation should not raise it.")
    key = "over_refusal_rate"


class HarmlessOutcomes(refusal_rate.RefusalRate):
    description = ("Outcomes of replies to plain harmless prompts: refusals there are over-refusal, loops there are "
                   "damage the edit does at generation time.")
    key = "harmless_refusal_rate"
