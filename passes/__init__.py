"""moeify's passes: capture (trace the smallest modules that trace), analyse (FFN rules: pattern +
check with a reason), plan and rewrite (surgery on the user's module tree), calibrate (record FFN inputs).

Each pass reports a one-line count (`summary`) that `convert` collects in its report.
"""

from moeify.passes.analyse import Analysis, Site, analyse
from moeify.passes.capture import CaptureResult, capture
from moeify.passes.match import FFNMatch, LinearRef, Rejection

__all__ = ["Analysis", "CaptureResult", "FFNMatch", "LinearRef", "Rejection", "Site", "analyse", "capture"]
