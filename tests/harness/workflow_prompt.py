"""UI-format workflows (what the frontend saves) -> API prompts (what /prompt runs), and the tiny-model swap.

`workflow_to_prompt(workflow, object_info)` does what the frontend's `app.graphToPrompt()` does, using the
server's /object_info (V1 and V3 nodes look the same there):
- every node except the UI-only ones (Note, MarkdownNote, Reroute, PrimitiveNode) and muted ones (mode 2)
  becomes `{"class_type", "inputs", "_meta": {"title"}}` under its id as a string;
- `widgets_values` map to the node's widget inputs in declaration order (required, then optional); an input is
  a widget unless its type is a socket type (MODEL, IMAGE, ...) or it is `forceInput`;
- a widget that carries a frontend-only companion value in `widgets_values` has that value skipped: INT (and
  FLOAT/COMBO) widgets with `control_after_generate` (an INT named `seed`/`noise_seed` gets one unless the spec
  says `control_after_generate: false`), and `image_upload` combos (the upload button);
- a linked input (a socket, or a widget converted to an input) takes the link `[origin_id, origin_slot]`,
  followed through Reroute nodes and bypassed nodes (mode 4: the input of the same type passes through); a link
  from a PrimitiveNode keeps the target's own widget value (the primitive writes it there);
- subgraphs are refused with a clear error (no shipped workflow uses them).
The browser tier (tests/browser/test_workflows_load.py) checks this converter against the real
`app.graphToPrompt()` for every shipped workflow.

`swap_for_tiny(prompt, object_info, input_dir=..., ...)` rewrites a converted prompt to run on the CPU test
server: the tiny Klein, the random Flux2 VAE, the fake CLIP loader, small sizes and step counts (the table
`TINY_OVERRIDES` plus clamping by input name), albums and reference images created in the server's input
folder under the names the workflow uses, and LoRA/run choices the server does not have replaced by ones
it has.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from .server import TINY_MODEL_NAME, VAE_NAME

UI_ONLY_TYPES = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode"})
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
SEED_NAMES = frozenset({"seed", "noise_seed"})
MODE_MUTED = 2
MODE_BYPASSED = 4

# ------------------------------------------------------------------------------------------ UI -> API prompt


class WorkflowError(ValueError):
    """The workflow cannot be converted; the message names the node and what is wrong."""


@dataclass(frozen=True)
class WidgetSlot:
    """One widget input of a node: its name and how many frontend-only values follow it in widgets_values."""

    name: str
    extra_values: int


def _input_specs(spec: Mapping[str, Any]) -> list[tuple[str, list[Any]]]:
    """(name, [type, options]) of every required then optional input, in the server's declaration order."""
    inputs = spec.get("input", {})
    order = spec.get("input_order") or {k: list(inputs.get(k, {})) for k in ("required", "optional")}
    out = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            entry = list(inputs[section][name])
            out.append((name, entry if len(entry) > 1 else [*entry, {}]))
    return out


def is_widget_input(entry: Sequence[Any]) -> bool:
    """A combo (a list of options, or the V3 'COMBO' type) or a primitive type that is not forceInput."""
    kind, options = entry[0], entry[1] or {}
    if options.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _extra_values(name: str, entry: Sequence[Any]) -> int:
    """Frontend-only values stored after this widget: the control-after-generate mode, the upload button."""
    kind, options = entry[0], entry[1] or {}
    control = options.get("control_after_generate")
    if kind == "INT" and control is None:
        control = name in SEED_NAMES  # the frontend adds the control to any INT seed without an explicit flag
    extra = 1 if control else 0
    if options.get("image_upload") or options.get("video_upload") or options.get("audio_upload"):
        extra += 1
    return extra


def widget_slots(spec: Mapping[str, Any]) -> list[WidgetSlot]:
    """The widgets the frontend creates for a node, in the order their values appear in widgets_values."""
    return [WidgetSlot(n, _extra_values(n, e)) for n, e in _input_specs(spec) if is_widget_input(e)]


def widget_values_by_name(node: Mapping[str, Any], spec: Mapping[str, Any]) -> dict[str, Any]:
    """widgets_values of a saved node keyed by widget name (values beyond the node's widgets are ignored:
    extensions may add display-only widgets after the inputs')."""
    values = node.get("widgets_values") or []
    slots = widget_slots(spec)
    if isinstance(values, dict):
        return {s.name: values[s.name] for s in slots if s.name in values}
    specs = dict(_input_specs(spec))
    out: dict[str, Any] = {}
    pos = 0
    for slot in slots:
        # A widget the save does not cover (a node that gained an input since) keeps its default, as in the UI.
        out[slot.name] = values[pos] if pos < len(values) else widget_default(specs[slot.name])
        pos += 1 + slot.extra_values
    return out


def widget_default(entry: Sequence[Any]) -> Any:
    """The value a new widget starts with: the spec's default, else a combo's first option, else the type's zero."""
    kind, options = entry[0], entry[1] or {}
    if "default" in options:
        return options["default"]
    choices = kind if isinstance(kind, list) else options.get("options")
    if choices:
        return choices[0]
    return {"INT": options.get("min", 0), "FLOAT": options.get("min", 0.0), "BOOLEAN": False}.get(kind, "")


@dataclass
class _Graph:
    nodes: dict[int, dict[str, Any]]
    links: dict[int, tuple[int, int, int, int, str]] = field(default_factory=dict)

    @classmethod
    def of(cls, workflow: Mapping[str, Any]) -> _Graph:
        graph = cls({int(n["id"]): n for n in workflow["nodes"]})
        for link in workflow.get("links", []):
            if isinstance(link, dict):  # newer saves may write links as objects
                link = [link["id"], link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"]]
                link.append("*")
            graph.links[int(link[0])] = (int(link[1]), int(link[2]), int(link[3]), int(link[4]), str(link[5]))
        return graph

    def source(self, link_id: int | None, seen: frozenset[int] = frozenset()) -> tuple[int, int] | None:
        """The real (node, slot) behind a link: through Reroutes and bypassed nodes; None when it ends nowhere."""
        if link_id is None or link_id not in self.links:
            return None
        origin, slot, *_ = self.links[link_id]
        node = self.nodes.get(origin)
        if node is None or origin in seen:
            return None
        if node["type"] == "Reroute":
            return self.source(node["inputs"][0].get("link"), seen | {origin})
        if node.get("mode") == MODE_BYPASSED:
            return self.source(_bypass_input_link(node, slot), seen | {origin})
        if node.get("mode") == MODE_MUTED:
            return None
        return origin, slot


def _bypass_input_link(node: Mapping[str, Any], out_slot: int) -> int | None:
    """The input a bypassed node passes to its output `out_slot`: the same slot if the types match, else the
    first linked input of the output's type (as LiteGraph's bypass does)."""
    out_type = node["outputs"][out_slot]["type"]
    inputs = node.get("inputs", [])
    if out_slot < len(inputs) and inputs[out_slot].get("type") == out_type and inputs[out_slot].get("link"):
        return inputs[out_slot]["link"]
    return next((i["link"] for i in inputs if i.get("type") == out_type and i.get("link") is not None), None)


def workflow_to_prompt(workflow: Mapping[str, Any], object_info: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The API prompt the frontend would queue for this UI-format workflow (see the module docstring)."""
    subgraphs = {s.get("id") for s in (workflow.get("definitions") or {}).get("subgraphs", [])}
    graph = _Graph.of(workflow)
    prompt: dict[str, dict[str, Any]] = {}
    for node_id, node in sorted(graph.nodes.items()):
        kind = node["type"]
        if kind in UI_ONLY_TYPES or node.get("mode") in (MODE_MUTED, MODE_BYPASSED):
            continue
        if kind in subgraphs:
            raise WorkflowError(f"node {node_id} is a subgraph ({kind}); convert it to nodes before testing.")
        if kind not in object_info:
            raise WorkflowError(f"node {node_id}: type {kind!r} is not installed on the server (missing node).")
        spec = object_info[kind]
        inputs: dict[str, Any] = widget_values_by_name(node, spec)
        for slot in node.get("inputs", []):
            link = slot.get("link")
            if link is None:
                continue
            source = graph.source(link)
            if source is None:
                continue  # the link ends at a muted node or nowhere: the frontend leaves the input out
            origin = graph.nodes[graph.links[link][0]]
            if origin["type"] == "PrimitiveNode":
                continue  # the primitive's value already sits in this node's widgets_values
            inputs[slot["name"]] = [str(source[0]), source[1]]
        prompt[str(node_id)] = {"inputs": inputs, "class_type": kind, "_meta": {"title": node.get("title", kind)}}
    return prompt


def output_node_ids(prompt: Mapping[str, Any], object_info: Mapping[str, Any]) -> list[str]:
    """Ids of the prompt's output nodes (what ComfyUI executes the graph for)."""
    return [i for i, n in prompt.items() if object_info[n["class_type"]].get("output_node")]


# ------------------------------------------------------------------------------------------ tiny-model swap

SIZE = 32  # pixels: a 2x2 latent keeps the random VAE and the tiny model fast on the CPU
CONTEXT_DIM = 64  # TinySpec().context_dim, the fake CLIP's width

# Per node type: input -> value on the tiny model (applied when the node has that input).
TINY_OVERRIDES: dict[str, dict[str, Any]] = {
    "UNETLoader": {"unet_name": TINY_MODEL_NAME, "weight_dtype": "default"},
    "VAELoader": {"vae_name": VAE_NAME},
    "KleinLabTrainLora": {
        "rank": 4,
        "steps": 3,
        "batch_size": 1,
        "checkpoint_every": 1,
        "sample_every": 3,
        "sample_steps": 2,
        "resume": False,
    },
    # A sweep trains one tiny run per value (3 steps each, a checkpoint every step), whatever its knob.
    "KleinLabSweep": {"rank": 4, "steps": 3, "checkpoint_every": 1, "sample_every": 3, "sample_steps": 2},
    "KSampler": {"steps": 2},
    "ImageScaleToTotalPixels": {"megapixels": 0.01},  # about 100 x 100 px
    # Grids: every cell is a render plus a VAE decode; 2 x 2 cells (x the workflow's prompts) prove the wiring.
    "KleinLabScrubRun": {"checkpoints": "last 2", "scales": "0,1"},
    "KleinLabMixerGrid": {"scales_a": "0,1", "scales_b": "0,1"},
    "KleinLabCompareFrames": {"index_a": 0, "index_b": 3},  # first and last cell of a 2 x 2 grid
    "KSamplerAdvanced": {"steps": 2, "start_at_step": 0, "end_at_step": 2},
    # One checkpoint at one scale, one prompt per group: 6 generations instead of (1 + 3 × 4) × 5.
    "KleinLabDiagnoseRun": {
        "checkpoints": "last 1",
        "scales": "1",
        "trigger_prompts": "a photo of [trigger]",
        "novel_prompts": "a photo of [trigger] riding a bicycle",
        "trigger_free_prompts": "a bowl of fruit on a wooden table",
    },
}
# By input name on any node, clamped to the input's min/max/step: sizes, steps, batch and frame counts.
TINY_BY_NAME: dict[str, int] = {
    "width": SIZE,
    "height": SIZE,
    "resolution": SIZE,
    "steps": 2,
    "sample_steps": 2,
    "batch_size": 1,
}
# Per-block vectors are written for a real Klein (4B: 5 double + 20 single blocks, 9B: 8 + 24); the tiny Klein has
# TinySpec()'s 2 + 6, so a vector is resampled onto it group by group (each tiny block takes the value of the
# real block at the same relative depth in its stream).
REAL_BLOCKS = {25: (5, 20), 32: (8, 24)}
TINY_BLOCKS = (2, 6)
ALBUM_INPUTS = frozenset({"folder", "album", "album_folder", "dataset_folder"})
PAIR_INPUTS = {"reference_folder": "reference", "target_folder": "target"}


def _clamp(value: int, options: Mapping[str, Any]) -> int:
    step = int(options.get("step") or 1)
    lo = options.get("min", value)
    value = max(value, lo)
    value = lo + -(-(value - lo) // step) * step if step > 1 else value  # round up onto the input's step grid
    return min(value, options.get("max", value))


def make_album(folder: Path, *, count: int = 3, label: str = "square", tint: int = 0) -> Path:
    """A tiny captioned album: coloured squares (one landscape), same-name .txt captions (the last one none)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        size = (SIZE * 2, SIZE) if i == 1 else (SIZE, SIZE)
        img = Image.new("RGB", size, (60 * i, 200 - 50 * i, (90 + tint) % 256))
        img.paste((255, 255, 255), (4, 4, 12, 12))
        img.save(folder / f"{i:03d}.png")
        if i != count - 1:
            (folder / f"{i:03d}.txt").write_text(f"a small {label} number {i}")
    return folder


def resample_block_vector(text: str, tiny: tuple[int, int] = TINY_BLOCKS) -> str:
    """A 4B or 9B per-block vector ('1, 0.5 0 ...') as the tiny model's vector; other lengths stay as they are."""
    values = [v for v in text.replace(",", " ").split() if v]
    if len(values) not in REAL_BLOCKS:
        return text
    double, single = REAL_BLOCKS[len(values)]
    streams = ((values[:double], tiny[0]), (values[double:], tiny[1]))
    return ", ".join(src[i * len(src) // n] for src, n in streams for i in range(n))


def _album_path(input_dir: Path, value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() else input_dir / value


@dataclass
class TinySwap:
    """What swap_for_tiny changed, for the test's messages and output checks."""

    prompt: dict[str, dict[str, Any]]
    albums: list[Path] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)


def swap_for_tiny(
    prompt: Mapping[str, Any],
    object_info: Mapping[str, Any],
    *,
    input_dir: Path,
    run_names: Mapping[str, str] | None = None,
    available: Sequence[str] = (),
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> TinySwap:
    """The prompt rewritten for the CPU test server (see the module docstring).

    run_names: node id -> run name for training nodes (a fresh name per test run).
    available: choices to use where a combo's value is not offered by the server, first match not yet used
        on that node wins (e.g. a tiny run's name, then its checkpoints as the loras list shows them).
    overrides: extra per-node-type input values on top of TINY_OVERRIDES.
    """
    table = {k: dict(v) for k, v in TINY_OVERRIDES.items()}
    for kind, values in (overrides or {}).items():
        table.setdefault(kind, {}).update(values)
    out = TinySwap(copy.deepcopy(dict(prompt)))
    for node_id, node in out.prompt.items():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CLIPLoader":  # no tiny text encoder exists: the fake CLIP has ComfyUI's interface
            node["class_type"], node["inputs"] = "KleinLabTestCLIPLoader", {"context_dim": CONTEXT_DIM}
            continue
        specs = dict(_input_specs(object_info[kind]))
        used: set[str] = set()
        for name, value in list(inputs.items()):
            if isinstance(value, list) or name not in specs:
                continue  # a link
            entry = specs[name]
            options = entry[1] or {}
            if name in table.get(kind, {}):
                inputs[name] = table[kind][name]
            elif name in TINY_BY_NAME and entry[0] == "INT":
                inputs[name] = _clamp(min(value, TINY_BY_NAME[name]), options)
            elif name == "block_vector" and isinstance(value, str):
                inputs[name] = resample_block_vector(value)
            elif name in ALBUM_INPUTS and isinstance(value, str) and value:
                out.albums.append(make_album(_album_path(input_dir, value), label=f"{kind} {node_id}"))
            elif name in PAIR_INPUTS and isinstance(value, str) and value:
                tint = 40 if PAIR_INPUTS[name] == "target" else 0
                out.albums.append(make_album(_album_path(input_dir, value), label=PAIR_INPUTS[name], tint=tint))
            elif options.get("image_upload") and isinstance(value, str):
                # An empty choice is one the artist makes on open (no invented file name): make one up here.
                value = inputs[name] = value or f"reference_{node_id}.png"
                path = input_dir / value
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (SIZE, SIZE), (30, 120, 200)).save(path)
                out.images.append(path)
            choices = entry[0] if isinstance(entry[0], list) else options.get("options")
            current = inputs[name]
            if choices is not None and not options.get("image_upload") and current not in choices:
                offered = [a for a in available if a in choices]
                # Two LoRA slots of one node (A x B) get different files where the server has them.
                pick = next((a for a in offered if a not in used), offered[0] if offered else None)
                if pick is not None:
                    inputs[name] = pick
                    used.add(pick)
                    out.replaced.append(f"{node_id}.{name}: {current!r} -> {pick!r}")
        if run_names and node_id in run_names and "run_name" in inputs:
            inputs["run_name"] = run_names[node_id]
    return out
