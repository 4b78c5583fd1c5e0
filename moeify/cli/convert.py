"""`moeify convert`: dense model in, MoE model out (a moeify directory, a .pt, or a Hugging Face MoE)."""

from __future__ import annotations

import time
from pathlib import Path

import click
from click.core import ParameterSource

from moeify.cli.common import (
    byte_progress,
    check_k,
    debug_option,
    default_output,
    dir_size,
    examples,
    human_bytes,
    load_source,
    out_console,
    source_options,
)
from moeify.cli.streaming import DTYPES, convert_streaming, parse_size, streamable

FORMATS = ("auto", "moeify", "pt", "mixtral", "qwen2_moe", "qwen3_moe")


def convert_config(config_file: Path | None, flags: dict, given: set[str]):
    """The ConvertConfig of a `moeify convert` call: the --config file's fields (if any) with the flags in
    `given` laid over them; without a file, every flag (its default where not given)."""
    from moeify.cli.config_file import read_config_file
    from moeify.config import ConfigError
    from moeify.convert_config import ConvertConfig

    data = read_config_file(config_file) if config_file is not None else {}
    for name in ("experts", "router", "init", "every", "include", "exclude", "seed", "share_router"):
        if config_file is None or name in given:
            data[name] = flags[name]
    if data.get("experts") is None:
        raise click.UsageError("Missing option '--experts': give the number of experts per FFN (or set "
                               "\"experts\" in the --config file)")
    if "k" in given or "k" not in data:  # --k, else the file's k, else 2 (at most the experts)
        data["k"] = check_k(flags["k"], data["experts"] if isinstance(data["experts"], int) else None)
    for name in ("capacity_factor", "router_groups"):  # MoEConfig fields: into the layer options
        if name in given:
            layer = data.get("layer") if isinstance(data.get("layer"), dict) else {}
            data["layer"] = {**layer, name: flags[name]}
    try:
        return ConvertConfig.from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{config_file}: {e}" if config_file is not None else str(e)) from None


def _router_names() -> list[str]:
    from moeify.routers import ROUTERS

    return sorted(ROUTERS)


def _init_names() -> list[str]:
    from moeify.upcycle import INITS

    return list(INITS)


class LazyChoice(click.Choice):
    """A Choice whose values come from a registry when first needed (routers, inits)."""

    def __init__(self, values):
        self._values = values
        super().__init__([])

    @property
    def choices(self):
        return self._values()

    @choices.setter
    def choices(self, _):
        pass


@click.command("convert")
@click.argument("model")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              metavar="FILE", help="Conversion options from a file: a ConvertConfig as JSON, or YAML when "
                                   "FILE ends in .yaml/.yml (every option, including the layer fields the "
                                   "flags do not cover). Flags given with --config override the file's "
                                   "values.")
@click.option("--experts", "-e", type=click.IntRange(min=1), metavar="N",
              help="Number of experts per converted FFN (required unless --config sets experts).")
@click.option("--router", type=LazyChoice(_router_names), default="topk", show_default=True,
              help="Routing scheme.")
@click.option("--k", type=click.IntRange(min=1), metavar="K",
              help="Experts each token is sent to.  [default: 2, or N when N < 2]")
@click.option("--init", type=LazyChoice(_init_names), default="copy", show_default=True,
              help="How experts are filled from the dense weights (none: random, for training from scratch).")
@click.option("--every", type=click.IntRange(min=1), default=1, show_default=True, metavar="N",
              help="Convert every N-th FFN (1 = all).")
@click.option("--include", multiple=True, metavar="GLOB",
              help="Only convert FFNs whose module path matches (repeatable), e.g. 'model.layers.1*'.")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Skip FFNs whose module path matches.")
@click.option("--capacity-factor", type=click.FloatRange(min=0, min_open=True), metavar="F",
              help="Cap tokens per expert at F * tokens * k / experts (default: no cap, no token dropped).")
@click.option("--router-groups", type=click.IntRange(min=1), metavar="N",
              help="--router smile: N nodes (expert groups); a token's experts lie in one (default 1).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for router and expert init.")
@click.option("--share-router", is_flag=True,
              help="Omni-router: one router for all converted FFNs of the same width.")
@click.option("-o", "--output", type=click.Path(path_type=Path), metavar="OUT",
              help="Where to write (default: ./NAME-moeN/). A name ending in .pt writes one pickled file.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="auto", show_default=True,
              help="moeify: safetensors + moeify.json; pt: torch.save(model); mixtral / qwen2_moe / "
                   "qwen3_moe: a Hugging Face checkpoint (LLaMA/Mistral, Qwen2, Qwen3 sources). "
                   "auto: pt for OUT ending in .pt, else moeify.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (never an input).")
@click.option("--dtype", type=click.Choice(DTYPES), help="Floating dtype of the output (default: as the input).")
@click.option("--shard-size", default="2GiB", show_default=True, metavar="SIZE",
              help="Largest safetensors shard written, e.g. 5GB or 500MB.")
@click.option("--stream/--no-stream", default=True, show_default=True,
              help="Convert a Hugging Face safetensors directory one FFN at a time (bounded memory); "
                   "--no-stream loads it whole first.")
@source_options
@debug_option
@examples("""
moeify convert model.pt --experts 64 --trust-pickle          # -> ./model-moe64/
moeify convert ./all-MiniLM-L6-v2 --experts 8 --k 2 -o minilm-moe8
moeify convert moeify.zoo:tiny_llama -e 8 --format mixtral -o tiny-mixtral
moeify convert weights.safetensors --arch mypkg.models:build -e 16 --every 2 -o out.pt
moeify convert moeify.zoo:tiny_llama --config moe.yaml --seed 3    # the file's options, seed 3
""")
@click.pass_context
def convert(ctx: click.Context, model: str, config_file: Path | None, experts: int | None, router: str,
            k: int | None, init: str, every: int, include: tuple[str, ...], exclude: tuple[str, ...],
            capacity_factor: float | None, router_groups: int | None, seed: int, share_router: bool,
            output: Path | None, fmt: str, force: bool, dtype: str | None, shard_size: str, stream: bool, arch: str | None,
            trust_pickle: bool) -> None:
    """Convert the FFNs of MODEL into Mixture-of-Experts layers and write the result to OUT.

    With the defaults (copied experts, top-k routing) the converted model computes what the dense one
    did; `moeify verify MODEL OUT` checks it. Reload the result in Python with `moeify.load(OUT)`.
    """
    import torch

    import moeify
    from moeify.cli.summary import conversion_table, totals_line
    from moeify.errors import MoeifyError
    from moeify.io.atomic import check_destination
    from moeify.report import count_params

    flags = dict(experts=experts, router=router, k=k, init=init, every=every, include=list(include) or None,
                 exclude=list(exclude) or None, capacity_factor=capacity_factor, router_groups=router_groups,
                 seed=seed, share_router=share_router)
    given = {name for name in flags if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT}
    config = convert_config(config_file, flags, given)
    out = output if output is not None else default_output(model, config.experts)
    if fmt == "auto":
        fmt = "pt" if out.suffix in (".pt", ".pth") else "moeify"
    if fmt == "pt" and out.suffix not in (".pt", ".pth"):
        raise click.BadParameter(f"--format pt writes one file; name it with .pt (got {out})",
                                 param_hint="'-o'")
    if out.suffix == ".safetensors":
        raise click.BadParameter(f"{out}: moeify writes a directory (safetensors weights + moeify.json); "
                                 "name a directory, or end the name in .pt for one file", param_hint="'-o'")
    if fmt != "pt" and out.suffix in (".pt", ".pth"):
        raise click.BadParameter(f"--format {fmt} writes a directory; {out} ends in .pt", param_hint="'-o'")
    inputs = [Path(model)] if Path(model).exists() else []
    check_destination(out, force, inputs)  # fail before the slow part
    shard_bytes = parse_size(shard_size)

    console = out_console()
    if stream and streamable(model, fmt):
        if convert_streaming(model, out, fmt, config, dtype=dtype, shard_bytes=shard_bytes, force=force,
                             console=console):
            return
    loaded, load_s = load_source(model, arch, trust_pickle)
    net = loaded.model if dtype is None else loaded.model.to(getattr(torch, dtype))
    if any(isinstance(m, moeify.MoELayer) for m in net.modules()):
        raise MoeifyError(f"{model} already has MoE layers; convert the dense model it came from")
    if fmt not in ("moeify", "pt"):  # a Hugging Face MoE format: refuse a misfit before converting
        from moeify.io.hf_export import check_exportable_source

        check_exportable_source(net, fmt)
    before = count_params(net)
    console.print(f"loaded {model}: {type(net).__name__}, {before:,} parameters ({load_s:.1f}s)")

    start = time.perf_counter()
    from moeify.cli.progress import convert_with_progress

    net = convert_with_progress(net, config)
    convert_s = time.perf_counter() - start
    report = moeify.conversion_report(net)
    console.print(conversion_table(report))
    console.print(totals_line(report))
    console.print(f"conversion took {convert_s:.1f}s")

    from moeify.io.companions import companion_files

    companions = companion_files(model)  # a Hugging Face folder's tokenizer and generation settings
    start = time.perf_counter()
    with byte_progress(f"writing {out}") as progress:
        if fmt in ("moeify", "pt"):
            moeify.save(net, out, source=loaded.source, force=force, inputs=inputs, progress=progress,
                        extra_files=companions, max_shard_bytes=shard_bytes)
        else:
            from moeify.io.hf_export import export_hf

            export_hf(net, out, fmt, force=force, inputs=inputs, progress=progress, extra_files=companions)
    console.print(f"wrote {out} ({human_bytes(dir_size(out))}, {fmt}) in {time.perf_counter() - start:.1f}s")
    if fmt == "moeify":
        console.print(f"next: moeify verify {model} {out}")
