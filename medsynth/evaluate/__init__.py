"""`medsynth evaluate`: how real, how diverse, and whether the model copied its training data.

Works on folders of volumes, so it can judge any tool's output. Both sets are brought onto one
grid by the same plan (the checkpoint's, or one computed from the real set) and the same
preprocessing as training, so they are compared exactly as the model saw its data. Every headline
number carries a 95% bootstrap (or Wilson) interval and the sample sizes behind it; seeds are fixed.
How much compute the resampling and the classifier get is one `EvaluationBudget`.

Modules: `report` (the orchestrator, the budget, the verdict), `realism` (C2ST, MMD, intensity W1,
features), `memorisation` (diversity, copying), `similarity` (MS-SSIM, shifted NCC), `stats`,
`figures`.
"""

from medsynth.evaluate.report import SMALL_SET, TOO_SMALL, EvaluationBudget, run_evaluation, summary_rows, verdict

__all__ = ["SMALL_SET", "TOO_SMALL", "EvaluationBudget", "run_evaluation", "summary_rows", "verdict"]
