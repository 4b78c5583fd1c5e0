"""`moeify generate DIR --prompt TEXT`: stream a GenAI folder's continuation, then prefill ms and
decode tok/s."""

from __future__ import annotations

import click

from moeify.cli.common import err_console, examples


@click.command("generate")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--prompt", required=True, help="The text to continue.")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--sample", is_flag=True, help="Sample instead of greedy decoding.")
@click.option(
    "--temperature",
    default=1.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Sampling temperature (with --sample).",
)
@examples("""
moeify generate moe-genai --prompt "def main():"
moeify generate moe-genai --prompt "Once upon a time" --max-new-tokens 128 --sample --temperature 0.8
""")
def generate_command(folder: str, prompt: str, max_new_tokens: int, sample: bool, temperature: float) -> None:
    """Generate text from an ONNX Runtime GenAI folder (written by moeify export --genai)."""
    from moeify.genai.generate import generate_text

    def show(piece: str) -> None:
        click.echo(piece, nl=False)

    click.echo(prompt, nl=False)
    result = generate_text(
        folder, prompt, max_new_tokens=max_new_tokens, sample=sample, temperature=temperature, on_text=show
    )
    click.echo()
    err_console().print(
        f"prefill {result.prefill_ms:.1f} ms ({result.prompt_tokens} tokens), decode "
        f"{result.decode_tokens_per_s:.1f} tok/s ({len(result.tokens)} tokens)"
    )
