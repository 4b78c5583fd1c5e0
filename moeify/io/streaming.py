"""Convert a checkpoint to disk with bounded memory: one expert and one tensor at a time.

    moeify.io.streaming.convert_checkpoint("Llama-3-8B/", "llama-moe/", experts=8, k=2, init="copy")
    moeify.io.streaming.convert_checkpoint(model, "out/", config)       # a model in memory: the same path

How (the same steps whatever holds the dense weights, see lazy_source.py):
1. The model's *structure* (parameters on the meta device: no weight memory) is analysed and converted
   with init="none" at the widths the real init gives: that fixes every output tensor's name, shape and
   dtype, so the shards and their headers are planned before any data is read.
2. The output tensors are written in order. A tensor of a converted FFN comes from that FFN's MoE layer,
   built and upcycled by convert's own `_build_layer` from the dense weights read lazily (so it is
   bit-identical to `moeify.convert` of the loaded model); the layer is dropped once its tensors are
   written. Its experts are made by the strategy one at a time (`moeify.upcycle.upcycle_layer_lazily`,
   the same code that fills them in memory) and each is written into its rows of the [E, ...] tensors
   (`ShardWriter.write_part`): the [E, ...] tensors never exist in memory. Every other tensor is read
   and copied through.
3. Everything goes into a temporary directory beside the output, renamed into place at the end; an error
   or Ctrl-C leaves nothing behind.
Calibration inits (router_init="kmeans", clustered split given `calibration=`) first run the calibration
inputs through the dense structure one module at a time (layerwise.py), keeping what each FFN saw.
With share_router, the one router is upcycled by the first layer (as in memory) and written once.

Memory: runtime + one FFN's dense weights (read from the shards) + one expert + one tensor copied
through, whatever E (+ with calibration, the recorded FFN inputs: tokens x d_model per FFN). Expert by
expert: init copy, noise, drop, split (random, or clustered: the partition is made from the dense FFN
first) and granular, with router_init random, zeros or kmeans. Whole layer (runtime + E x the FFN):
init="none" (a random init of the whole layer) and router_init="avg_k" (it reads every expert).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moeify.convert import EXPERT_TENSORS, _build_layer, _expert_width, convert, select_sites
from moeify.convert_config import ConvertConfig, config_from_call
from moeify.errors import MoeifyError, UpcycleError
from moeify.io.atomic import atomic_output
from moeify.io.companions import companion_files, copy_files
from moeify.io.empty_init import empty_params, meta_copy
from moeify.io.layerwise import calibrate_lazily
from moeify.io.lazy_source import CheckpointSource, ModelSource, hf_structure, model_structure
from moeify.io.shard_writer import ShardWriter, Slot
from moeify.io.weights import DEFAULT_SHARD_BYTES
from moeify.layer import MoELayer
from moeify.report import REPORT_ATTR, conversion_report
from moeify.upcycle.strategies import experts_one_at_a_time
from moeify.version import __version__

Progress = Callable[[int, int], None]  # (bytes done, bytes total)
HF_EXPERT_NAMES = {"gate.weight": "router.weight", "experts.gate_up_proj": "w1", "experts.down_proj": "w2"}


class NotStreamable(MoeifyError):
    """The checkpoint's tensors do not map one to one onto the model's (renamed or missing ones, which
    transformers fixes up when loading); raised before anything is written. Loading it whole works."""


class TensorReader:
    """Dense tensors by the structure's names: from the source, through tied aliases, cast to `dtype`
    (floating tensors only). Also what `_build_layer` reads an FFN's weights from (`get_parameter`)."""

    def __init__(self, source, structure: nn.Module, dtype: torch.dtype | None):
        self.source, self.dtype = source, dtype
        self.buffers = dict(structure.named_buffers())
        self.canonical = _tied_names(structure)

    def name_in_source(self, name: str) -> str | None:
        for candidate in (name, *self.canonical.get(name, ())):
            if candidate in self.source:
                return candidate
        return None

    def out_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return self.dtype if self.dtype is not None and dtype.is_floating_point else dtype

    def get_parameter(self, name: str) -> torch.Tensor:
        found = self.name_in_source(name)
        if found is None:
            if name in self.buffers:  # a buffer the checkpoint does not store: the constructor's value
                t = self.buffers[name]
                return t.to(self.out_dtype(t.dtype))
            raise MoeifyError(f"tensor {name} is in no file of the checkpoint; the config and the weights "
                              "do not match")
        t = self.source.get(found)
        return t.to(self.out_dtype(t.dtype))

    get = get_parameter


def _tied_names(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """name -> the other names of the same parameter object (tied weights)."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return {n: tuple(m for m in names if m != n) for names in by_id.values() for n in names}


def _aliases(model: nn.Module) -> dict[str, str]:
    """Dropped state-dict name -> the kept name it is the same tensor as (first name kept, as `dedupe`)."""
    seen: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            aliases[name] = seen[id(t)]
        else:
            seen[id(t)] = name
    return aliases


def check_fits(structure: nn.Module, reader: TensorReader, label: str) -> None:
    """Every tensor the structure needs is in the source with its shape, and the source has no extra
    weights: else a one-line error naming the file (the config disagrees with the weights)."""
    source = reader.source
    needed = structure.state_dict(keep_vars=True)
    extra = sorted(n for n in source.names() if n not in needed and not n.endswith("rotary_emb.inv_freq"))
    for name, t in needed.items():
        found = reader.name_in_source(name)
        if found is None:
            if name in reader.buffers:
                continue
            if extra:
                raise NotStreamable(f"the tensor names in {label} differ from the model's (first missing: "
                                    f"{name}, first unknown: {extra[0]}): transformers renames them when "
                                    "loading, streaming does not; convert in memory (--no-stream)")
            raise NotStreamable(f"tensor {name} of the model its config describes is in no file of {label} "
                                "(transformers would initialise it at random); streaming copies tensors and "
                                "cannot: convert in memory (--no-stream)")
        if tuple(source.shape(found)) != tuple(t.shape):
            raise MoeifyError(f"{found} has shape {tuple(source.shape(found))} in {source.where(found)} but "
                              f"{tuple(t.shape)} in the model its config describes; the config and the "
                              "weights disagree")
    if extra:
        raise MoeifyError(f"{source.where(extra[0])} has {len(extra)} tensor(s) the model its config describes "
                          f"lacks (first: {extra[0]}); the config and the weights disagree")


def _set_dtypes(structure: nn.Module, reader: TensorReader) -> None:
    """Give the structure's tensors the dtypes they will be written in (source dtype, or `dtype`)."""
    for name, t in structure.state_dict(keep_vars=True).items():
        found = reader.name_in_source(name)
        want = reader.out_dtype(reader.source.dtype(found) if found is not None else t.dtype)
        if t.dtype != want:
            t.data = t.data.to(want)


@dataclass
class Plan:
    """The output: its tensors in order, where each comes from, and the converted structure."""

    structure: nn.Module  # converted, parameters on meta
    sites: tuple  # the selected FFN sites, in order
    layer_paths: dict[str, int]  # MoE layer path in the structure -> its site index
    slots: list[Slot]
    origin: dict[str, tuple]  # output name -> ("source", name) | ("layer", path, local name) | ("const", t)
    aliases: dict[str, str]


def _check_calibration(config: ConvertConfig, calibration) -> None:
    """A calibration-based init without calibration inputs fails before anything is read or written."""
    if calibration is None and config.init.init != "none" and config.init.resolved_router_init == "kmeans":
        raise UpcycleError("router_init='kmeans' needs calibration inputs (example model inputs, run through "
                           "the model one module at a time); pass calibration=..., or use router_init='random' "
                           "or 'zeros'")


def _in_memory_hint(reader: TensorReader, slots: list[Slot]) -> str:
    """What to do instead, with the memory it takes: the loaded model, its converted copy, the output."""
    dense_bytes = _dense_bytes(reader)
    out_bytes = sum(slot.nbytes for slot in slots)
    return (f"load the model and convert it in memory (moeify.convert(model, config, calibration=...)), "
            f"which needs about {_gib(2 * dense_bytes + out_bytes)} of RAM")


def _gib(n: int) -> str:
    return f"{n / 1024**3:.1f} GiB"


def _refuse_unstreamable(config: ConvertConfig) -> None:
    """Options the streamed path cannot honour yet: MPO experts."""
    if config.layer.get("expert_param", "dense") != "dense":
        raise MoeifyError("MPO experts (expert_param='mpo') are not streamed yet (each dense matrix is decomposed "
                          "whole); convert in memory with moeify.convert (--no-stream)")


def plan_conversion(structure: nn.Module, reader: TensorReader, config: ConvertConfig) -> Plan:
    """Analyse and convert the structure (init="none", the real init's widths) and lay out the output."""
    _, _, sites = select_sites(structure, config)
    widths = {site.match.name: _expert_width(config, site) for site in sites}
    with empty_params():
        convert(structure, config.replace(init="none", expert_d_ff=widths), inplace=True)
    report = conversion_report(structure)
    recorded = report.config.replace(init=config.init)  # what `moeify.convert` with `config` records
    setattr(structure, REPORT_ATTR, dataclasses.replace(report, config=recorded))

    paths = list(dict.fromkeys(n for n, m in structure.named_modules() if isinstance(m, MoELayer)))
    if len(paths) != len(sites) or any(not p.startswith(s.match.name) for p, s in zip(paths, sites)):
        raise MoeifyError(f"internal: {len(paths)} MoE layers placed for {len(sites)} FFNs; convert in memory "
                          "(moeify.convert) and report this")
    layer_paths = {p: i for i, p in enumerate(paths)}
    aliases = _aliases(structure)
    slots, origin = [], {}
    for name, t in structure.state_dict(keep_vars=True).items():
        if name in aliases:
            continue
        slots.append(Slot(name, tuple(t.shape), t.dtype))
        owner = _owner(name, paths)
        origin[name] = ("layer", owner, name[len(owner) + 1:]) if owner is not None else ("source", name)
    return Plan(structure, tuple(sites), layer_paths, slots, origin, aliases)


def _owner(name: str, paths: list[str]) -> str | None:
    for path in paths:
        if name.startswith(path + ".") or path == "":
            return path
    return None


def hf_layout(plan: Plan, fmt: str) -> tuple[list[Slot], dict[str, tuple], object]:
    """The output of `--format fmt`: the HF MoE names (see hf_export), where each comes from, the config."""
    from moeify.io.hf_export import hf_config, hf_state_dict

    structure = plan.structure
    config, layers = hf_config(structure, fmt)
    module_path = {id(m): p for p, m in structure.named_modules()}
    mlp_to_layer = {hf_mlp: module_path[id(layer)] for hf_mlp, layer in layers.values()}
    slots, origin = [], {}
    for name, t in hf_state_dict(structure, fmt, layers).items():
        if name in plan.aliases:
            continue
        hf_mlp = next((m for m in mlp_to_layer if name.startswith(m + ".")), None)
        if name in plan.origin:
            origin[name] = plan.origin[name]
        elif hf_mlp is not None and name[len(hf_mlp) + 1:] in HF_EXPERT_NAMES:
            origin[name] = ("layer", mlp_to_layer[hf_mlp], HF_EXPERT_NAMES[name[len(hf_mlp) + 1:]])
        else:
            origin[name] = ("const", t)  # Qwen2-MoE's zero shared expert
        slots.append(Slot(name, tuple(t.shape), t.dtype))
    return slots, origin, config


def write_tensors(plan: Plan, slots: list[Slot], origin: dict, reader: TensorReader, config: ConvertConfig,
                  writer: ShardWriter, calibration: dict[str, torch.Tensor] | None = None) -> None:
    """Produce each output tensor in order: MoE layers one at a time, everything else copied through.
    `calibration`: FFN name -> its recorded inputs, for calibration-based inits.
    An init that makes its experts one at a time (`experts_one_at_a_time`) has each layer's expert tensors
    (w1, w2, b1, b2, [E, ...] each) written expert by expert when the layer is reached, one expert in
    memory; otherwise the layer is built whole."""
    lazy = experts_one_at_a_time(config.init)
    expert_slots: dict[str, dict[str, Slot]] = {}  # layer path -> "w1" etc. -> its output slot
    for slot in slots:
        kind, *where = origin[slot.name]
        if kind == "layer" and where[1] in EXPERT_TENSORS:
            expert_slots.setdefault(where[0], {})[where[1]] = slot
    current: tuple[str, dict] | None = None
    shared_routers: dict[int, nn.Module] = {}  # with share_router: built by the first layer, kept
    last_index = -1
    written: set[str] = set()  # layers whose experts are written (lazy)
    for slot in slots:
        kind, *where = origin[slot.name]
        if kind == "layer":
            path, local = where
            if lazy and local in EXPERT_TENSORS and path in written:
                continue  # written with its layer, expert by expert
            if current is None or current[0] != path:
                # the previous layer is written: free it, its expert tensors become the next one's storage
                spare = {k: current[1][k] for k in ("w1", "w2")} if current is not None else None
                current = None
                index = plan.layer_paths[path]
                if config.share_router and index < last_index:  # the first layer must build the router
                    raise MoeifyError(f"internal: MoE layer {path} comes after a later one in the output; "
                                      "convert in memory (--no-stream) and report this")
                last_index = index
                site = plan.sites[index]
                inputs = (calibration or {}).get(site.match.name)
                _, layer, experts = _build_layer(reader, site, config, index, inputs, shared_routers, spare,
                                                 lazy_experts=lazy)
                spare = None
                current = (path, {k: v.detach() for k, v in layer.state_dict().items()})
                del layer
                if experts is not None:
                    _write_experts(writer, experts, expert_slots.get(path, {}))
                    written.add(path)
                    if local in EXPERT_TENSORS:
                        continue
            tensor = current[1][local]
        elif kind == "source":
            tensor = reader.get(where[0])
        else:
            tensor = where[0]
        writer.write(slot.name, tensor)
        del tensor


@torch.no_grad()
def _write_experts(writer: ShardWriter, experts, slots: dict[str, Slot]) -> None:
    """Expert e's tensors into rows e of the layer's [E, ...] outputs, one expert at a time (row-major:
    expert e's bytes are the e-th contiguous piece). Cast as `copy_` into the layer's tensor would; a bias
    the dense FFN lacks is zeros."""
    for e, expert in enumerate(experts):
        for local, slot in slots.items():
            value = getattr(expert, local)
            if value is None:
                value = torch.zeros(slot.shape[1:], dtype=slot.dtype)
            if tuple(value.shape) != slot.shape[1:]:
                raise MoeifyError(f"internal: expert {e} of {slot.name} has shape {tuple(value.shape)}, "
                                  f"planned {slot.shape[1:]}; convert in memory (--no-stream) and report "
                                  "this")
            piece = value.to(slot.dtype)
            writer.write_part(slot.name, piece, e * piece.numel() * piece.element_size())
            del value, piece


def convert_checkpoint(source: str | Path | nn.Module, out: str | Path, config: ConvertConfig | None = None,
                       *, fmt: str = "moeify", dtype: torch.dtype | None = None, calibration=None,
                       max_shard_bytes: int = DEFAULT_SHARD_BYTES, force: bool = False,
                       progress: Progress | None = None, **options):
    """Convert `source` (a Hugging Face safetensors directory, or a dense model in memory) and write the
    result to `out` (`fmt`: "moeify", or "mixtral" / "qwen2_moe" / "qwen3_moe"), streaming.

    dtype: the output's floating dtype (default: each tensor's own). progress(done, total) in bytes.
    calibration: example model inputs (a tensor, tuple or dict of kwargs) for calibration-based inits
    (router_init="kmeans", clustered split): run through the dense model one module at a time, each
    module's weights read just before it runs (moeify/io/layerwise.py); the bytes read count in progress.
    Same options and same result as `moeify.save(moeify.convert(model, config, calibration=...), out)`
    (or `export_hf`). Returns the conversion's `ConversionReport`.
    """
    config = config_from_call(config, options)
    _check_calibration(config, calibration)
    _refuse_unstreamable(config)
    out = Path(out)
    if isinstance(source, nn.Module):
        structure, tensors, inputs = model_structure(source), ModelSource(source), ()
        label = f"the {type(source).__name__} in memory"
        from moeify.io.recipe import resolve_source

        record = resolve_source(source, None)
        generation, companions = getattr(source, "generation_config", None), []
    else:
        path = Path(source)
        if not path.is_dir() or not (path / "config.json").exists():
            raise MoeifyError(f"{path} is not a Hugging Face model directory (config.json + safetensors); "
                              "streaming conversion reads those")
        tensors, inputs, label = CheckpointSource(path), (path,), str(path)
        structure, record = hf_structure(path)
        # the tokenizer and generation settings travel with the weights, as in-memory convert copies them
        generation, companions = None, companion_files(path)
    if fmt != "moeify":
        from moeify.io.hf_export import check_exportable_source

        check_exportable_source(structure, fmt)
    reader = TensorReader(tensors, structure, dtype)
    check_fits(structure, reader, label)
    _set_dtypes(structure, reader)
    dense = meta_copy(structure) if calibration is not None else None  # the plan converts `structure`
    plan = plan_conversion(structure, reader, config)
    if fmt == "moeify":
        slots, origin, hf_cfg = plan.slots, plan.origin, None
    else:
        slots, origin, hf_cfg = hf_layout(plan, fmt)
    phases = _Phases(progress, _dense_bytes(reader) if dense is not None else 0, sum(s.nbytes for s in slots))
    recorded = None
    if dense is not None:
        _, _, sites = select_sites(dense, config)
        recorded = calibrate_lazily(dense, sites, reader, calibration, on_load=phases.read,
                                    in_memory_hint=_in_memory_hint(reader, slots))
        del dense
    with atomic_output(out, directory=True, force=force, inputs=inputs) as tmp:
        writer = ShardWriter(tmp, slots, max_shard_bytes, {"moeify_version": __version__},
                             phases.writing if progress is not None else None)
        try:
            write_tensors(plan, slots, origin, reader, config, writer, recorded)
            files = writer.files()
            _finish(tmp, plan, fmt, hf_cfg, record, files, generation)
            copy_files(companions, tmp, skip={f.name for f in tmp.iterdir()})
        except OSError as e:
            raise MoeifyError(f"writing {out} failed: {e.strerror or e}; check the disk space and "
                              "permissions") from e
        finally:
            writer.abort()
    return conversion_report(plan.structure)


def _dense_bytes(reader: TensorReader) -> int:
    source = reader.source
    return sum(math.prod(source.shape(n)) * reader.out_dtype(source.dtype(n)).itemsize
               for n in source.names())


class _Phases:
    """One progress over the whole job: the dense bytes calibration reads (`read_total`, 0 without
    calibration), then the output bytes written."""

    def __init__(self, progress: Progress | None, read_total: int, write_total: int):
        self.progress, self.read_total, self.write_total = progress, read_total, write_total
        self.done_reading = 0

    def read(self, nbytes: int) -> None:
        self.done_reading = min(self.read_total, self.done_reading + nbytes)
        if self.progress is not None:
            self.progress(self.done_reading, self.read_total + self.write_total)

    def writing(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(self.read_total + done, self.read_total + total)


def _finish(tmp: Path, plan: Plan, fmt: str, hf_cfg, record: dict, files: list[str], generation) -> None:
    """The files beside the weights: moeify.json, or the HF config (+ generation config)."""
    from moeify.io.recipe import RECIPE_NAME, build_recipe, conversion_record

    if fmt == "moeify":
        recipe = build_recipe(plan.structure, record, conversion_record(plan.structure), plan.aliases, files)
        (tmp / RECIPE_NAME).write_text(json.dumps(recipe, indent=2, sort_keys=True) + "\n")
        return
    hf_cfg.save_pretrained(str(tmp))
    if generation is not None:  # a model in memory: its generation settings (a folder's are companions)
        generation.save_pretrained(str(tmp))

