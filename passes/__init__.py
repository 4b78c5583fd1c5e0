"""moeify's passes: capture (trace the smallest modules that trace), analyse (FFN rules: pattern +
check with a reason), plan and rewrite (surgery on the user's module tree), calibrate (record FFN inputs).

Each pass reports a one-line count (`summary`) that `convert` collects in its report.
"""

import moeify  # noqa: F401  (first: moeify's API imports these passes; this order avoids a cycle)
from passes.analyse import Analysis, Site, analyse
from passes.capture import CaptureResult, capture
from passes.match import FFNMatch, LinearRef, Rejection

__all__ = ["Analysis", "CaptureResult", "FFNMatch", "LinearRef", "Rejection", "Site", "analyse", "capture"]
