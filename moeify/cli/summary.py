"""Rows and tables built from the passes' records (find_ffns, explain_ffns, conversion_report)."""

from __future__ import annotations

from rich.table import Table
from torch import nn

from moeify.cli.common import human_count


def ffn_params(d_model: int, d_ff: int, gated: bool, bias: bool) -> int:
    h1 = 2 * d_ff if gated else d_ff
    return h1 * d_model + d_model * d_ff + ((h1 + d_model) if bias else 0)


def ffn_rows(model: nn.Module) -> list[dict]:
    import moeify

    rows = []
    for m in moeify.find_ffns(model):
        rows.append({"path": m.path, "d_model": m.d_model, "d_ff": m.d_ff, "activation": m.activation,
                     "gated": m.gated, "bias": m.bias,
                     "parameters": ffn_params(m.d_model, m.d_ff, m.gated, m.bias)})
    return rows


def rejected_rows(model: nn.Module) -> list[dict]:
    import moeify

    _, rejected = moeify.explain_ffns(model)
    return [{"path": path, "reason": reason} for path, reason in rejected]


def conversion_table(report) -> Table:
    table = Table(title="converted", title_justify="left")
    for col, justify in (("module", "left"), ("d_model -> d_ff", "right"), ("experts", "right"),
                         ("parameters", "right")):
        table.add_column(col, justify=justify)
    for row in report.rows:
        table.add_row(row["path"], f"{row['d_model']} -> {row['d_ff']}", "", "")
    return table


def totals_line(before: int, report) -> str:
    return (f"parameters: {human_count(before)} -> {human_count(report.total_params)} "
            f"({report.total_params / max(before, 1):.2f}x); active per token: "
            f"{human_count(report.active_params)}")
