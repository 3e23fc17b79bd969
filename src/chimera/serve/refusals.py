"""What the gateway cannot run, and why, in the gateway's words: the brain states capabilities (`Policy.preemptive`,
`Policy.needs_calibration`), the predictor registry says which predictor choices read ground truth; this turns them
into the refusal a config or a test reads."""

from __future__ import annotations

from typing import Any

from chimera.predict.assembly import predictions_need_truth
from chimera.sched.policy import Policy
from chimera.sched.registry import make_policy, policy_entry


def policy_refusal(policy: Policy) -> str | None:
    """Why the gateway cannot run `policy` as built (None: it can). A preemptive policy re-ranks *running* sequences
    inside the engine, which an OpenAI-compatible backend does not expose; a policy calibrated on training calls
    (`prepare`) needs them, and the gateway has none."""
    if policy.preemptive:
        return (f"policy {policy.name!r} needs in-engine preemption (it re-ranks running sequences), which the gateway "
                "cannot do through an OpenAI-compatible backend; run it in the simulator (chimera simulate)")
    missing = policy.needs_calibration()
    if missing:
        return (f"policy {policy.name!r} calibrates {missing!r} on training calls, which the gateway does not have; "
                f"set {missing!r} in the policy config")
    return None


def live_refusal(name: str, lam: float | None = None, **params: Any) -> str | None:
    """Why the gateway cannot run policy `name` with these parameters (None: it can): a preset whose predictor choice
    reads ground truth, then what the built policy's capabilities rule out. Unknown names and parameters raise."""
    entry = policy_entry(name)
    if entry.predictions is not None and predictions_need_truth(entry.predictions):
        return f"policy {name!r} uses {entry.predictions} predictions (ground truth), which only the simulator has"
    return policy_refusal(make_policy(name, lam=lam, **params))
