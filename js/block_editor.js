// Klein LoRA Lab block-weight editor: a DOM widget on Klein LoRA Loader (blocks) with a slider per block of the
// model, coloured by the course's four groups (binding = double blocks, texture = early single blocks, identity =
// middle single blocks, composition = late single blocks), preset buttons, and what the last run loaded.
//
// The node's `block_vector` text stays the source of truth (it is what the prompt and saved workflows carry): the
// sliders are drawn from it and every slider move or preset button writes it back (with preset = 'custom'). With
// a non-custom preset and no vector, the sliders show what the preset and the group strengths apply; the first
// touch turns that into a vector. The block count comes from the model the node last ran on (its `ui` payload,
// kept in the node's properties so a saved workflow remembers it) or, before any run, from the vector's length
// (Klein 4B: 25 blocks, 9B: 32) through GET /klein_lab/blocks; a vector of another length is shown as a warning.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { el, injectStyle } from "./dom.js";

export const BLOCKS_EXTENSION_NAME = "KleinLoraLab.blockEditor";
export const BLOCKS_NODE_CLASS = "KleinLabLoraLoaderBlocks";
const WIDGET_NAME = "klein_block_editor";
const PROP_LAYOUT = "klein_block_layout";
const PROP_LOADED = "klein_block_loaded";
const GROUPS = ["binding", "texture", "identity", "composition"];
export const GROUP_COLOURS = {
  binding: "#e8a838",
  texture: "#4fb3d9",
  identity: "#7cc860",
  composition: "#c88cff",
};
const SLIDER_MIN = -1;
const SLIDER_MAX = 2;
const SLIDER_STEP = 0.05;
const MIN_HEIGHT_PX = 250;
const CLOSED_HEIGHT_PX = 26; // the loader's editor starts closed: one line (a button and what the blocks are)
const LINE_PX = 15;
const PROP_OPEN = "klein_block_editor_open";
const SYNC_MS = 400; // the vector text may change without a callback (typed in a Vue widget, undo): re-read it
const FALLBACK_VARIANT = "klein-4b";

const STYLE = `
.klein-blocks { display: flex; flex-direction: column; gap: 4px; box-sizing: border-box; width: 100%;
  padding: 4px; color: var(--input-text, #ddd); font: 11px sans-serif; }
.klein-blocks [hidden] { display: none !important; }
.klein-blocks.is-open { min-height: ${MIN_HEIGHT_PX}px; }
.klein-blocks-head { display: flex; gap: 6px; align-items: center; }
.klein-blocks-head button { font-size: 11px; padding: 1px 6px; cursor: pointer; border-radius: 3px;
  border: 1px solid #555; background: #2a2d33; color: inherit; white-space: nowrap; }
.klein-blocks-presets { display: flex; flex-wrap: wrap; gap: 3px; align-items: center; }
.klein-blocks-presets button { font-size: 11px; padding: 1px 6px; cursor: pointer; border-radius: 3px;
  border: 1px solid #555; background: #2a2d33; color: inherit; }
.klein-blocks-presets button[data-group] { border-left: 4px solid var(--klein-group); }
.klein-blocks-info { opacity: 0.8; min-width: 0; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.klein-blocks-warning { color: #f0a05a; white-space: pre-wrap; }
.klein-blocks-grid { display: flex; gap: 1px; align-items: stretch; overflow-x: auto; padding-bottom: 2px; }
.klein-blocks-col { display: flex; flex-direction: column; align-items: center; flex: 1 0 16px; min-width: 16px;
  border-top: 4px solid var(--klein-group); background: rgba(255,255,255,0.03); padding-top: 2px; }
.klein-blocks-col.is-untouched { opacity: 0.45; }
.klein-blocks-col input[type=range] { writing-mode: vertical-lr; direction: rtl; height: 110px; width: 16px;
  margin: 0; accent-color: var(--klein-group); cursor: ns-resize; }
.klein-blocks-col .klein-blocks-value { font-size: 9px; height: 12px; }
.klein-blocks-col .klein-blocks-label { font-size: 9px; opacity: 0.8; }
.klein-blocks-legend { display: flex; flex-wrap: wrap; gap: 2px 10px; }
.klein-blocks-legend i { display: inline-block; width: 10px; height: 10px; margin-right: 3px; vertical-align: -1px;
  border-radius: 2px; }
.klein-blocks-loaded { white-space: pre-wrap; background: rgba(255,255,255,0.06); padding: 3px 5px; border-radius: 3px; }
`;

/** '1, 0.5 0' -> [1, 0.5, 0]; blank -> []; null when an item is not a number (the node's own error then says so). */
export function parseVector(text) {
  const items = String(text ?? "")
    .trim()
    .split(/[\s,]+/)
    .filter(Boolean);
  const values = items.map(Number);
  return values.every(Number.isFinite) ? values : null;
}

/** [1, 0.5, 0] -> '1, 0.5, 0' (the vector widget's text; rounded to the slider's step). */
export function formatVector(values) {
  return values.map((v) => String(Math.round(v * 1000) / 1000)).join(", ");
}

/** The group of each block index of a layout. */
function groupOf(layout) {
  const out = new Array(layout.names.length).fill("binding");
  for (const [group, indices] of Object.entries(layout.groups)) for (const i of indices) out[i] = group;
  return out;
}

/** Short label of a block name: double_blocks.3 -> D3, single_blocks.12 -> S12. */
function shortName(name) {
  const [kind, index] = name.split(".");
  return `${kind.startsWith("double") ? "D" : "S"}${index}`;
}

let variantLayouts = null; // GET /klein_lab/blocks, once per page
async function fetchLayouts() {
  if (!variantLayouts) {
    variantLayouts = api
      .fetchApi("/klein_lab/blocks")
      .then((r) => (r.ok ? r.json() : {}))
      .catch(() => ({}));
  }
  return variantLayouts;
}

/** Where a loader's editor reads and writes: the node's widgets, and the model's map in its properties. */
export function widgetSource(node) {
  const widget = (name) => node.widgets?.find((w) => w.name === name);
  const set = (name, value) => {
    const w = widget(name);
    if (!w || w.value === value) return;
    w.value = value;
    w.callback?.(value, app.canvas, node);
  };
  return {
    text: () => String(widget("block_vector")?.value ?? ""),
    preset: () => String(widget("preset")?.value ?? "all"),
    group: (g) => Number(widget(`${g}_strength`)?.value ?? 1),
    write(text, preset) {
      if (preset) set("preset", preset);
      set("block_vector", text);
      node.setDirtyCanvas?.(true, true);
    },
    clearOnPreset: true, // the loader refuses a vector with another preset: choosing one clears it
    layout: () => node.properties?.[PROP_LAYOUT] ?? null,
    loaded: () => node.properties?.[PROP_LOADED] ?? null,
  };
}

export class BlockEditor {
  /** `source`: text(), preset(), group(g), write(text, preset?), clearOnPreset, layout(), loaded(). */
  constructor(node, source = widgetSource(node), { timer = true, presets = true, collapsible = false } = {}) {
    this.node = node;
    this.source = source;
    this.withPresets = presets;
    this.collapsible = collapsible; // the loader's editor opens with its button; a mixer row's is opened by the row
    this.variants = {};
    this.layout = null;
    this.layoutSource = "";
    this.lastText = null;
    this.lastPreset = null;
    this.build();
    fetchLayouts().then((layouts) => {
      this.variants = layouts ?? {};
      this.sync(true);
    });
    this.timer = timer ? setInterval(() => this.sync(false), SYNC_MS) : null;
  }

  build() {
    injectStyle("klein-blocks-style", STYLE);
    const t = (id) => ({ "data-testid": id });
    this.presets = el("div", { class: "klein-blocks-presets", ...t("klein-blocks-presets") }, [
      this.presetButton("all", "all", "Every block at 1."),
      ...GROUPS.map((g) => this.presetButton(g, g, `Only the ${g} blocks at 1, the others at 0.`)),
      this.presetButton("none", "none", "Every block at 0."),
      this.presetButton("reset", "reset", "Clear the vector: preset 'all' with the group strengths."),
    ]);
    this.info = el("div", { class: "klein-blocks-info", ...t("klein-blocks-info") });
    this.warning = el("div", { class: "klein-blocks-warning", ...t("klein-blocks-warning"), hidden: true });
    this.grid = el("div", { class: "klein-blocks-grid", ...t("klein-blocks-grid") });
    this.legend = el(
      "div",
      { class: "klein-blocks-legend" },
      GROUPS.map((g) => el("span", {}, [el("i", { style: `background:${GROUP_COLOURS[g]}` }), g])),
    );
    this.loaded = el("div", { class: "klein-blocks-loaded", ...t("klein-blocks-loaded"), hidden: true });
    this.toggle = el("button", { type: "button", "data-testid": "klein-blocks-toggle", title: "Show or hide the sliders" });
    this.toggle.addEventListener("click", () => this.setOpen(!this.isOpen()));
    this.toggle.hidden = !this.collapsible;
    this.root = el("div", { class: "klein-blocks", ...t("klein-blocks") }, [
      el("div", { class: "klein-blocks-head" }, [this.toggle, this.info]),
      this.presets,
      this.warning,
      this.grid,
      this.legend,
      this.loaded,
    ]);
    this.applyOpen();
    // Dragging a slider must not drag the node or pan the canvas.
    for (const type of ["pointerdown", "pointermove", "pointerup", "wheel"]) {
      this.root.addEventListener(type, (event) => event.stopPropagation());
    }
  }

  isOpen() {
    return !this.collapsible || Boolean(this.node.properties?.[PROP_OPEN]);
  }

  setOpen(open) {
    this.node.properties ??= {};
    this.node.properties[PROP_OPEN] = open;
    this.applyOpen();
    this.render();
    this.fit(open ? 520 : 0);
  }

  /** Grow (or shrink) the node to the editor's height; at least `width` wide. */
  fit(width = 0) {
    const size = this.node.computeSize?.();
    if (size && this.node.size) this.node.setSize?.([Math.max(this.node.size[0], width), size[1]]);
    this.node.setDirtyCanvas?.(true, true);
  }

  applyOpen() {
    const open = this.isOpen();
    this.root.classList.toggle("is-open", open);
    this.root.dataset.open = String(open);
    this.toggle.textContent = open ? "▾ blocks" : "▸ blocks";
    this.toggle.ariaPressed = String(open);
    this.presets.hidden = !open || !this.withPresets;
    this.grid.hidden = !open;
    this.legend.hidden = !open;
  }

  /** The widget's height: the sliders when open, else one line; plus the warning and what the run loaded. */
  height() {
    const lines = (el) => (el.hidden ? 0 : el.textContent.split("\n").length * LINE_PX + 8);
    return (this.isOpen() ? MIN_HEIGHT_PX : CLOSED_HEIGHT_PX) + lines(this.warning) + lines(this.loaded);
  }

  presetButton(label, preset, title) {
    const button = el("button", { type: "button", title, "data-testid": `klein-blocks-preset-${preset}` }, [label]);
    if (GROUP_COLOURS[preset]) {
      button.dataset.group = preset;
      button.style.setProperty("--klein-group", GROUP_COLOURS[preset]);
    }
    button.addEventListener("click", () => this.applyPreset(preset));
    return button;
  }

  // --- the model's blocks --------------------------------------------------------------------------------------
  chooseLayout(count) {
    const ran = this.source.layout();
    const known = [
      ...(ran ? [[ran, "this model (last run)"]] : []),
      ...Object.entries(this.variants).map(([name, layout]) => [layout, name]),
    ];
    const match = known.find(([layout]) => layout.names.length === count);
    if (match) return match;
    if (ran) return [ran, "this model (last run)"];
    const fallback = this.variants[FALLBACK_VARIANT];
    return fallback ? [fallback, FALLBACK_VARIANT] : [null, ""];
  }

  /** The value every block has now: the vector when it fits, else what the preset and group strengths apply. */
  effective(layout, vector, preset) {
    if (vector && vector.length === layout.names.length) return vector.slice();
    const groups = groupOf(layout);
    return groups.map((g) => {
      if (preset !== "all" && preset !== g) return preset === "custom" ? 1 : 0;
      return this.source.group(g);
    });
  }

  // --- sync with the widgets -----------------------------------------------------------------------------------
  sync(force) {
    if (!this.root.isConnected && !force) return;
    const text = this.source.text();
    const preset = this.source.preset();
    const groupValues = GROUPS.map((g) => this.source.group(g)).join(",");
    if (!force && text === this.lastText && preset === this.lastPreset && groupValues === this.lastGroups) return;
    if (this.source.clearOnPreset && !force && preset !== this.lastPreset && preset !== "custom" && text.trim()) {
      // Another preset chosen in the combo: the vector would be refused with it; the sliders show the preset.
      this.lastPreset = preset;
      this.writeText("");
      return;
    }
    this.lastText = text;
    this.lastPreset = preset;
    this.lastGroups = groupValues;
    this.render();
  }

  writeText(text, preset) {
    this.source.write(text, preset);
    this.lastText = null; // re-read and redraw
    this.sync(true);
  }

  applyPreset(preset) {
    if (!this.layout) return;
    if (preset === "reset") {
      this.writeText("", "all");
      return;
    }
    const groups = groupOf(this.layout);
    const values = groups.map((g) => (preset === "all" || preset === g ? 1 : 0));
    this.writeText(formatVector(values), "custom");
  }

  onSlider(index, value) {
    const values = this.effective(this.layout, parseVector(this.lastText), this.lastPreset);
    values[index] = value;
    this.writeText(formatVector(values), "custom");
  }

  // --- drawing ---------------------------------------------------------------------------------------------------
  render() {
    const vector = parseVector(this.lastText);
    const count = vector?.length ?? 0;
    const [layout, source] = this.chooseLayout(count);
    this.layout = layout;
    this.layoutSource = source;
    this.root.dataset.vector = this.lastText ?? "";
    this.root.dataset.preset = this.lastPreset ?? "";
    if (!layout) {
      this.info.textContent = "loading the block map…";
      return;
    }
    const names = layout.names;
    this.root.dataset.count = String(names.length);
    this.root.dataset.layout = source;
    this.info.textContent =
      `${source}: ${layout.double} double + ${layout.single} single blocks` +
      (this.lastPreset === "custom" ? " — custom vector" : ` — preset '${this.lastPreset}' (a slider makes it custom)`);
    const warnings = [];
    if (vector === null) warnings.push("The block vector has an item that is not a number: fix the text.");
    else if (count && count !== names.length) {
      warnings.push(
        `The block vector has ${count} values; ${source} has ${names.length} blocks. Pick a preset button to ` +
          "rewrite it, or move a slider.",
      );
    }
    if (this.lastPreset === "custom" && !count) warnings.push("Preset 'custom' needs a vector: move a slider.");
    this.warning.textContent = warnings.join("\n");
    this.warning.hidden = !warnings.length;
    const values = this.effective(layout, vector, this.lastPreset);
    const groups = groupOf(layout);
    const touched = this.touchedBlocks();
    if (this.grid.childElementCount !== names.length || this.grid.dataset.names !== names.join(",")) {
      this.grid.replaceChildren(...names.map((name, i) => this.column(name, i, groups[i])));
      this.grid.dataset.names = names.join(",");
    }
    [...this.grid.children].forEach((col, i) => {
      const slider = col.querySelector("input");
      if (document.activeElement !== slider || !col.matches(":active")) slider.value = String(values[i]);
      col.querySelector(".klein-blocks-value").textContent = String(Math.round(values[i] * 100) / 100);
      col.dataset.value = String(values[i]);
      col.classList.toggle("is-untouched", touched !== null && !touched.has(names[i]));
    });
  }

  column(name, index, group) {
    const slider = el("input", {
      type: "range",
      min: String(SLIDER_MIN),
      max: String(SLIDER_MAX),
      step: String(SLIDER_STEP),
      title: `${name} (${group})`,
      "aria-label": `${name} strength`,
      "data-testid": "klein-blocks-slider",
    });
    slider.addEventListener("input", () => this.onSlider(index, Number(slider.value)));
    return el(
      "div",
      {
        class: "klein-blocks-col",
        style: `--klein-group:${GROUP_COLOURS[group]}`,
        dataset: { block: name, group },
        "data-testid": "klein-blocks-col",
      },
      [el("span", { class: "klein-blocks-value" }), slider, el("span", { class: "klein-blocks-label" }, [shortName(name)])],
    );
  }

  // --- what the last run loaded ------------------------------------------------------------------------------------
  touchedBlocks() {
    const loaded = this.source.loaded();
    if (!loaded?.length) return null;
    return new Set(loaded.flatMap((l) => l.blocks));
  }

  setLoaded(payload) {
    if (!payload?.layout) return;
    this.node.properties ??= {};
    this.node.properties[PROP_LAYOUT] = payload.layout;
    this.node.properties[PROP_LOADED] = payload.loaded ?? [];
    this.showLoaded();
    this.sync(true);
    if (this.collapsible) this.fit();
  }

  showLoaded() {
    const loaded = this.node.properties?.[PROP_LOADED];
    const layout = this.node.properties?.[PROP_LAYOUT];
    if (!layout) return;
    const lines = (loaded ?? []).map((l) => {
      const blocks = l.blocks.length ? `${l.blocks.length} blocks (${l.blocks.map(shortName).join(" ")})` : "no block";
      const extra = l.global_modules ? ` + ${l.global_modules} global modules` : "";
      const missing = l.not_loaded ? `; ${l.not_loaded} keys NOT loaded` : "";
      return `loaded ${l.lora} @ ${l.strength}: ${l.modules} modules in ${blocks}${extra}; format ${l.format}, ${l.adapter}${missing}`;
    });
    if (!lines.length) lines.push("nothing loaded (strength 0)");
    this.loaded.textContent = lines.join("\n");
    this.loaded.hidden = false;
    this.loaded.dataset.modules = String((loaded ?? []).reduce((n, l) => n + l.modules, 0));
    this.loaded.dataset.blocks = String((loaded ?? []).reduce((n, l) => n + l.blocks.length, 0));
    this.loaded.dataset.format = (loaded ?? []).map((l) => l.format).join(",");
  }

  destroy() {
    if (this.timer) clearInterval(this.timer);
  }
}

function attachEditor(node) {
  if (node.kleinBlocks) return node.kleinBlocks;
  const editor = new BlockEditor(node, widgetSource(node), { collapsible: true });
  node.kleinBlocks = editor;
  const widget = node.addDOMWidget(WIDGET_NAME, "klein_block_editor", editor.root, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => editor.height(),
    getMaxHeight: () => editor.height() + (editor.isOpen() ? 400 : 0),
  });
  widget.serialize = false;
  for (const name of ["block_vector", "preset", ...GROUPS.map((g) => `${g}_strength`)]) {
    const w = node.widgets?.find((x) => x.name === name);
    if (!w) continue;
    const callback = w.callback;
    w.callback = function () {
      const result = callback?.apply(this, arguments);
      editor.sync(false);
      return result;
    };
  }
  const onExecuted = node.onExecuted;
  node.onExecuted = function (output) {
    onExecuted?.apply(this, arguments);
    editor.setLoaded(output?.klein_blocks?.[0]);
  };
  // A loaded workflow's widget values and properties arrive after nodeCreated.
  const onConfigure = node.onConfigure;
  node.onConfigure = function () {
    const result = onConfigure?.apply(this, arguments);
    editor.applyOpen(); // a saved node remembers whether its sliders were open
    editor.showLoaded();
    editor.sync(true);
    return result;
  };
  const onRemoved = node.onRemoved;
  node.onRemoved = function () {
    editor.destroy();
    return onRemoved?.apply(this, arguments);
  };
  setTimeout(() => editor.sync(true), 0);
  return editor;
}

// ComfyUI may load this module twice (see js/klein_lora_lab.js): register once.
if (!(app.extensions ?? []).some((ext) => ext.name === BLOCKS_EXTENSION_NAME)) {
  app.registerExtension({
    name: BLOCKS_EXTENSION_NAME,
    nodeCreated(node) {
      const comfyClass = node.comfyClass ?? node.constructor?.comfyClass;
      if (comfyClass === BLOCKS_NODE_CLASS) attachEditor(node);
    },
  });
}
