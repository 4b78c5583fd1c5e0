"""`moeify export MODEL -o DIR --genai`: the ONNX Runtime GenAI folder of a converted decoder.

`export_command` in onnx_commands.py hands over here when --genai is given; the work is
`moeify.genai.export_genai`.
"""

from __future__ import annotations

from pathlib import Path

from moeify.cli.common import err_console, out_console
from moeify.errors import MoeifyError
from moeify.io.companions import TOKENIZER_FILES


def tokenizer_folder(model: str, tokenizer: str | None) -> Path:
    """--tokenizer, else MODEL itself when it is a folder holding tokenizer files."""
    if tokenizer is not None:
        return Path(tokenizer)
    path = Path(model)
    if path.is_dir() and any((path / name).is_file() for name in TOKENIZER_FILES):
        return path
    raise MoeifyError(
        f"no tokenizer files in {model}; pass --tokenizer DIR (the source model's Hugging Face "
        "folder) for the GenAI folder"
    )


def export_genai_command(
    model: str,
    output: str,
    precision: str,
    provider: str,
    tokenizer: str | None,
    arch: str | None,
    trust_pickle: bool,
    force: bool,
    route: str = "auto",
    experts_op: str = "auto",
) -> None:
    from moeify.cli.onnx_commands import load_model_ref
    from moeify.genai import export_genai

    tokenizer_dir = tokenizer_folder(model, tokenizer)
    module, _ = load_model_ref(model, arch=arch, trust_pickle=trust_pickle)
    with err_console().status(f"exporting {model} for ONNX Runtime GenAI ({precision}, {provider}) ..."):
        out = export_genai(
            module,
            output,
            precision=precision,
            provider=provider,
            tokenizer_dir=tokenizer_dir,
            experts_op=experts_op,
            force=force,
            route=route,
        )
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 1024**2
    out_console().print(
        f"wrote {out}/ ({size:.1f} MB, {precision}, {provider}); try: moeify generate {out} --prompt 'Hello'"
    )
