"""The edits SRA is compared with, named once: every module, table, card, test and benchmark may import these.

``standard`` is the field's usual abliteration, the *unfiltered* difference of means of all harmful and harmless
training prompts at SRA's direction layer, baked flat at γ = 1 into every writer (`method.baselines` bakes it).
"""

BASELINES = ("standard", "standard_filtered", "rank1")
LABELS = {"base": "base model", "standard": "standard ablation", "standard_filtered": "standard ablation, filtered",
          "rank1": "SRA rank 1 (no mining)", "sra": "SRA"}
DESCRIPTIONS = {
    "standard": "Standard ablation: the difference of means of all harmful and harmless training prompts at SRA's "
                "direction layer, baked flat (γ = 1) into every writer, as abliteration tools do.",
    "standard_filtered": "Standard ablation of SRA's own dirty direction (filtered training prompts), flat γ = 1.",
    "rank1": "SRA's first clean direction alone, with its searched strength profile (no mining).",
}
