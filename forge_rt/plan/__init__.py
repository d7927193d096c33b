"""Memory planning: `estimate` predicts a step's peak memory from the model's shapes, `probe` measures
the machine, `choose.plan` picks the savings a run uses; `python -m forge_rt.plan` asks "will it fit?"."""
from forge_rt.plan.choose import MODES, Plan, plan
from forge_rt.plan.estimate import Estimate, Shapes, estimate

__all__ = ["MODES", "Plan", "plan", "Estimate", "Shapes", "estimate"]
