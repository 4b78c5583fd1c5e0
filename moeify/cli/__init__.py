"""The `moeify` command line: one file per command, registered on the `main` group here.

Errors: a `MoeifyError` (a mistake the user can fix) prints one line and exits 1; bad option values are
usage errors and exit 2 (click's convention); anything else is a bug and prints one line too, with a hint.
`--debug` (before or after the command name) shows the traceback instead.
"""

from __future__ import annotations

import click

from moeify import __version__
from moeify.cli.common import DEBUG_KEY, debug_option, err_console


class MoeifyGroup(click.Group):
    """A click group that turns moeify's errors into one-line messages and exit codes."""

    def invoke(self, ctx: click.Context):
        from moeify.config import ConfigError
        from moeify.errors import MoeifyError
        from moeify.upcycle import UpcycleError

        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except (ConfigError, UpcycleError) as e:  # option values the layer or the init refuse: usage
            if ctx.meta.get(DEBUG_KEY):
                raise
            raise click.UsageError(str(e)) from None
        except MoeifyError as e:
            if ctx.meta.get(DEBUG_KEY):
                raise
            _fail(f"error: {e}", 1)
        except KeyboardInterrupt:
            if ctx.meta.get(DEBUG_KEY):
                raise
            _fail("interrupted; nothing was written", 130)
        except Exception as e:
            if ctx.meta.get(DEBUG_KEY):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            _fail(f"error: unexpected {type(e).__name__}: {first} (run again with --debug for the traceback "
                  "and report it)", 1)


def _fail(message: str, code: int):
    err_console().print(message, markup=False, highlight=False, soft_wrap=True)
    raise click.exceptions.Exit(code)


@click.group(cls=MoeifyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version=__version__, prog_name="moeify")  # works from a checkout too
@debug_option
def main() -> None:
    """Turn dense PyTorch models into Mixture-of-Experts models.

    \b
    Start here:
      moeify demo                                   build, convert, verify a tiny model
      moeify inspect MODEL -v                       which FFNs would be converted
      moeify convert MODEL --experts 8              write MODEL-moe8/
      moeify verify MODEL MODEL-moe8                compare outputs, show expert load

    MODEL is a Hugging Face directory, a .pt / .safetensors file (with --arch for weights only),
    module:callable (e.g. moeify.zoo:tiny_llama) or a directory written by moeify.
    """


def _register() -> None:
    from moeify.cli.convert import convert
    from moeify.cli.demo import demo
    from moeify.cli.generate import generate_command
    from moeify.cli.inspect import inspect
    from moeify.cli.onnx_commands import COMMANDS as ONNX_COMMANDS
    from moeify.cli.verify import verify

    for command in (inspect, convert, verify, demo, *ONNX_COMMANDS, generate_command):
        main.add_command(command)


_register()

__all__ = ["main"]
