"""moeify's passes, run in this order by `moeify.convert` (each a `Pass`: `run(model) -> result`, the
result a frozen record with counts and a one-line `summary` that convert's report collects):

- base.py: the `Pass` protocol (name, modifies_model, preserves_computation, run) and `PassRunner`, which
  names a failing pass and the passes that ran before it.
- capture.py: `Capture` traces the smallest modules that trace -> `CaptureResult` (graphs, failures).
- analyse.py: `Analyse` runs the FFN rules over the graphs -> `Analysis` (one `Site` per FFN, with the
  surgery chosen for it, and the `Rejection`s); writes `node.meta["moeify.analyse"]`.
- rules/: one FFN rule a file (plain, gated, fused gated): pattern + check with a reason.
- atoms.py: the modules and functions recognised without looking inside (linear-likes, activations,
  dropouts and casts).
- elementwise.py: which nodes compute elementwise (and why not); activation.py: the activation between
  two projections (named or "custom") and `activation_module`, a module computing it exactly;
  metadata.py: reads of `.device`/`.dtype`/`.shape` (not uses) and conditions on them decided at capture.
- rules/near_miss.py: for a rule that matched nowhere, what came closest (`moeify inspect -v`).
- match.py: the public records `FFNMatch`, `LinearRef`, `Rejection`.
- plan.py: the surgeries (`ModuleSurgery`, `ChainSurgery`, `ForwardSurgery`), chosen once by analyse.
- select.py: `Select` narrows the FFNs found (include/exclude, filter_fn, every) -> `SelectResult`.
- calibrate.py: `Calibrate` records each FFN's inputs on example inputs -> `CalibrateResult`.
- rewrite.py: `Rewrite` executes each site's surgery with its MoE layer -> `RewriteResult`; the dense
  weights in moeify's layout (`dense_weights`).
- token_ids.py: `WireTokenIds` hooks the model's input ids to routers that hash them -> `TokenIdsResult`.

Analysis passes (capture, analyse, select, calibrate) change nothing in the model; rewrite preserves its
computation when the upcycling init claims so. tests/passes/test_pass_promises.py holds every pass in
`PASSES` to its declaration.
"""

from moeify.passes.analyse import Analyse, Analysis, Site, activation_module, analyse
from moeify.passes.base import Pass, PassFailed, PassResult, PassRunner
from moeify.passes.calibrate import Calibrate, CalibrateResult
from moeify.passes.capture import Capture, CaptureResult, capture
from moeify.passes.match import FFNMatch, LinearRef, Rejection
from moeify.passes.plan import ChainSurgery, ForwardSurgery, ModuleSurgery, Surgery
from moeify.passes.rewrite import Replacement, Rewrite, RewriteResult
from moeify.passes.select import Select, SelectResult
from moeify.passes.token_ids import TokenIdsResult, WireTokenIds

# Every pass, in the order convert runs them.
PASSES = (Capture, Analyse, Select, Calibrate, Rewrite, WireTokenIds)

__all__ = [
    "PASSES",
    "Analyse",
    "Analysis",
    "Calibrate",
    "CalibrateResult",
    "Capture",
    "CaptureResult",
    "ChainSurgery",
    "FFNMatch",
    "ForwardSurgery",
    "LinearRef",
    "ModuleSurgery",
    "Pass",
    "PassFailed",
    "PassResult",
    "PassRunner",
    "Rejection",
    "Replacement",
    "Rewrite",
    "RewriteResult",
    "Select",
    "SelectResult",
    "Site",
    "Surgery",
    "TokenIdsResult",
    "WireTokenIds",
    "activation_module",
    "analyse",
    "capture",
]
