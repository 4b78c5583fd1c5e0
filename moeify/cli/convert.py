"""`moeify convert`: dense model in, MoE model out (a moeify directory, a .pt, or a Hugging Face MoE)."""

from __future__ import annotations

import time
from pathlib import Path

import click

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

FORMATS = ("auto", "moeify", "pt", "mixtral", "qwen2_moe", "qwen3_moe")


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
@click.option("--experts", "-e", type=click.IntRange(min=1), required=True, metavar="N",
              help="Number of experts per converted FFN.")
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
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for router and expert init.")
@click.option("-o", "--output", type=click.Path(path_type=Path), metavar="OUT",
              help="Where to write (default: ./NAME-moeN/). A name ending in .pt writes one pickled file.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="auto", show_default=True,
              help="moeify: safetensors + moeify.json; pt: torch.save(model); mixtral / qwen2_moe / "
                   "qwen3_moe: a Hugging Face checkpoint (LLaMA/Mistral, Qwen2, Qwen3 sources). "
                   "auto: pt for OUT ending in .pt, else moeify.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (never an input).")
@source_options
@debug_option
@examples("""
moeify convert model.pt --experts 64 --trust-pickle          # -> ./model-moe64/
moeify convert ./all-MiniLM-L6-v2 --experts 8 --k 2 -o minilm-moe8
moeify convert moeify.zoo:tiny_llama -e 8 --format mixtral -o tiny-mixtral
moeify convert weights.safetensors --arch mypkg.models:build -e 16 --every 2 -o out.pt
""")
def convert(model: str, experts: int, router: str, k: int | None, init: str, every: int,
            include: tuple[str, ...], exclude: tuple[str, ...], capacity_factor: float | None, seed: int,
            output: Path | None, fmt: str, force: bool, arch: str | None, trust_pickle: bool) -> None:
    """Convert the FFNs of MODEL into Mixture-of-Experts layers and write the result to OUT.

    With the defaults (copied experts, top-k routing) the converted model computes what the dense one
    did; `moeify verify MODEL OUT` checks it. Reload the result in Python with `moeify.load(OUT)`.
    """
    import moeify
    from moeify.cli.summary import conversion_table, totals_line
    from moeify.errors import MoeifyError
    from moeify.io.atomic import check_destination
    from moeify.report import count_params

    k = check_k(k, experts)
    out = output if output is not None else default_output(model, experts)
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

    console = out_console()
    loaded, load_s = load_source(model, arch, trust_pickle)
    net = loaded.model
    if any(isinstance(m, moeify.MoELayer) for m in net.modules()):
        raise MoeifyError(f"{model} already has MoE layers; convert the dense model it came from")
    if fmt not in ("moeify", "pt"):  # a Hugging Face MoE format: refuse a misfit before converting
        from moeify.io.hf_export import check_exportable_source

        check_exportable_source(net, fmt)
    before = count_params(net)
    console.print(f"loaded {model}: {type(net).__name__}, {before:,} parameters ({load_s:.1f}s)")

    options = dict(experts=experts, router=router, k=k, init=init, every=every,
                   include=list(include) or None, exclude=list(exclude) or None, seed=seed)
    if capacity_factor is not None:
        options["config"] = {"capacity_factor": capacity_factor}
    start = time.perf_counter()
    from moeify.cli.progress import convert_with_progress

    net = convert_with_progress(net, options)
    convert_s = time.perf_counter() - start
    report = moeify.conversion_report(net)
    console.print(conversion_table(report))
    console.print(totals_line(report))
    console.print(f"conversion took {convert_s:.1f}s")

    start = time.perf_counter()
    with byte_progress(f"writing {out}") as progress:
        if fmt in ("moeify", "pt"):
            moeify.save(net, out, source=loaded.source, force=force, inputs=inputs, progress=progress)
        else:
            from moeify.io.hf_export import export_hf

            export_hf(net, out, fmt, force=force, inputs=inputs, progress=progress)
    console.print(f"wrote {out} ({human_bytes(dir_size(out))}, {fmt}) in {time.perf_counter() - start:.1f}s")
    if fmt == "moeify":
        console.print(f"next: moeify verify {model} {out}")
