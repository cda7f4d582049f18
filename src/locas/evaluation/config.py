"""The names the evaluations offer, importable without torch (the `locas` command lists them in its --help)."""

# LoCoMo (locas.evaluation.locomo): the question categories, and the conditions a question is answered under.
CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop", 5: "adversarial"}
CONDITIONS = ("none", "full", "locas", "locas+full", "lora", "lora+full")
WITH_CONTEXT = {"none": "full", "locas": "locas+full", "lora": "lora+full"}  # the same, dialogue in the prompt
