// Klein LoRA Lab: '+ Add LoRA' on Klein LoRA Mixer. Past its four slots, the mixer takes any number of rows, each
// with an on/off switch, a LoRA, a scale and a block preset (the Power Lora Loader way), and its own block-weight
// editor (the ▦ button: a slider per block, as on Klein LoRA Loader (blocks); preset 'custom'). The rows live in the node's
// `more_loras` text (JSON, what the prompt and saved workflows carry); this DOM widget draws them and writes the
// text back on every change. The text stays the source of truth: a text changed elsewhere (undo, a pasted node)
// redraws the rows.
import { app } from "../../scripts/app.js";
import { BlockEditor } from "./block_editor.js";
import { el, injectStyle } from "./dom.js";

export const ROWS_EXTENSION_NAME = "KleinLoraLab.mixerRows";
export const ROWS_NODE_CLASS = "KleinLabLoraMixer";
const WIDGET_NAME = "klein_mixer_rows";
const TEXT_WIDGET = "more_loras";
const NONE = "None";
const SCALE_MIN = -4;
const SCALE_MAX = 4;
const ROW_HEIGHT_PX = 26;
const EDITOR_HEIGHT_PX = 262; // the block editor's own minimum height and its margin
const PROP_LAYOUT = "klein_block_layout"; // the model's block map from the last run (as the loader keeps it)
const SYNC_MS = 400;

const STYLE = `
.klein-rows { display: flex; flex-direction: column; gap: 3px; box-sizing: border-box; width: 100%; padding: 2px 4px;
  color: var(--input-text, #ddd); font: 11px sans-serif; }
.klein-rows-row { display: grid; grid-template-columns: 16px minmax(80px, 1fr) 50px 84px 22px 20px; gap: 4px;
  align-items: center; height: ${ROW_HEIGHT_PX - 4}px; }
.klein-rows-row.is-off { opacity: 0.5; }
.klein-rows-row select, .klein-rows-row input[type=number] { min-width: 0; font-size: 11px; background: #222;
  color: inherit; border: 1px solid #555; border-radius: 3px; height: 20px; }
.klein-rows button { font-size: 11px; padding: 1px 6px; cursor: pointer; border-radius: 3px; border: 1px solid #555;
  background: #2a2d33; color: inherit; }
.klein-rows-error { color: #f0a05a; white-space: pre-wrap; }
.klein-rows-error[hidden] { display: none; }
`;

/** The rows of a more_loras text; null when the text is not a list (the node's own check then names the fault). */
export function parseRows(text) {
  if (!String(text ?? "").trim()) return [];
  try {
    const rows = JSON.parse(text);
    return Array.isArray(rows) ? rows : null;
  } catch {
    return null;
  }
}

class MixerRows {
  constructor(node) {
    this.node = node;
    this.lastText = null;
    this.expanded = new Set(); // rows whose block editor is open
    this.editors = [];
    injectStyle("klein-rows-style", STYLE);
    this.list = el("div", { class: "klein-rows-list", "data-testid": "klein-rows-list" });
    this.error = el("div", { class: "klein-rows-error", "data-testid": "klein-rows-error", hidden: true });
    this.addBtn = el("button", { type: "button", "data-testid": "klein-rows-add", title: "Add a LoRA row" }, [
      "+ Add LoRA",
    ]);
    this.addBtn.addEventListener("click", () => this.add());
    this.root = el("div", { class: "klein-rows", "data-testid": "klein-rows" }, [this.list, this.error, this.addBtn]);
    for (const type of ["pointerdown", "pointermove", "pointerup", "wheel"]) {
      this.root.addEventListener(type, (event) => event.stopPropagation());
    }
    this.timer = setInterval(() => this.sync(false), SYNC_MS);
  }

  widget(name) {
    return this.node.widgets?.find((w) => w.name === name);
  }

  loraChoices() {
    return (this.widget("lora_1")?.options?.values ?? []).filter((v) => v !== NONE);
  }

  presetChoices() {
    return [...(this.widget("preset_1")?.options?.values ?? ["all"]), "custom"];
  }

  text() {
    return String(this.widget(TEXT_WIDGET)?.value ?? "");
  }

  rows() {
    return parseRows(this.text()) ?? [];
  }

  /** Write the rows into the text; `redraw` false when the change came from a row's own block editor (its
   * sliders must stay under the pointer). */
  write(rows, redraw = true) {
    const widget = this.widget(TEXT_WIDGET);
    if (!widget) return;
    const text = rows.length ? JSON.stringify(rows) : "";
    if (!redraw) this.lastText = text;
    widget.value = text;
    widget.callback?.(text, app.canvas, this.node);
    if (redraw) this.sync(true);
    this.node.setDirtyCanvas?.(true, true);
  }

  add() {
    const rows = this.rows();
    const last = rows.at(-1);
    rows.push({ on: true, lora: last?.lora ?? this.loraChoices()[0] ?? "", scale: 1, preset: "all" });
    this.write(rows);
  }

  update(index, key, value) {
    const rows = this.rows();
    if (!rows[index]) return;
    rows[index] = { ...rows[index], [key]: value };
    this.write(rows);
  }

  remove(index) {
    const rows = this.rows();
    rows.splice(index, 1);
    this.expanded = new Set([...this.expanded].filter((i) => i !== index).map((i) => (i > index ? i - 1 : i)));
    this.write(rows);
  }

  toggleBlocks(index) {
    if (this.expanded.has(index)) this.expanded.delete(index);
    else this.expanded.add(index);
    this.sync(true);
  }

  /** A row's block editor reads and writes that row: its `blocks` text and its preset. */
  rowSource(index, presetSelect) {
    const row = () => this.rows()[index] ?? {};
    return {
      text: () => String(row().blocks ?? ""),
      preset: () => String(row().preset ?? "all"),
      group: () => 1, // rows have no group strengths: a group preset applies 1 to its blocks
      write: (text, preset) => {
        const rows = this.rows();
        if (!rows[index]) return;
        rows[index] = { ...rows[index], blocks: text, ...(preset ? { preset } : {}) };
        if (preset) presetSelect.value = preset;
        this.write(rows, false);
      },
      clearOnPreset: false, // a row keeps its blocks under another preset (applied only with 'custom')
      layout: () => this.node.properties?.[PROP_LAYOUT] ?? null,
      loaded: () => null,
    };
  }

  setLayout(payload) {
    if (!payload?.layout) return;
    this.node.properties ??= {};
    this.node.properties[PROP_LAYOUT] = payload.layout;
    this.sync(true);
  }

  sync(force) {
    const text = this.text();
    if (!force && text === this.lastText) return;
    this.lastText = text;
    this.render();
  }

  render() {
    const rows = parseRows(this.lastText);
    this.error.hidden = rows !== null;
    this.error.textContent = rows === null ? "more_loras is not a list of rows: fix the text, or clear it." : "";
    for (const editor of this.editors) editor.destroy();
    this.editors = [];
    this.list.replaceChildren(...(rows ?? []).flatMap((row, i) => this.row(row, i)));
    this.root.dataset.rows = String(rows?.length ?? 0);
    this.resize();
  }

  row(row, i) {
    const on = el("input", { type: "checkbox", title: "on/off", "data-testid": "klein-rows-on" });
    on.checked = row.on !== false;
    on.addEventListener("change", () => this.update(i, "on", on.checked));
    const lora = this.select(this.loraChoices(), row.lora, "klein-rows-lora");
    lora.addEventListener("change", () => this.update(i, "lora", lora.value));
    const scale = el("input", {
      type: "number",
      min: String(SCALE_MIN),
      max: String(SCALE_MAX),
      step: "0.05",
      title: "scale (negative pushes away from the LoRA)",
      "data-testid": "klein-rows-scale",
    });
    scale.value = String(row.scale ?? 1);
    scale.addEventListener("change", () => {
      const value = Math.min(SCALE_MAX, Math.max(SCALE_MIN, Number(scale.value) || 0));
      scale.blur();
      this.update(i, "scale", value);
    });
    const preset = this.select(this.presetChoices(), row.preset ?? "all", "klein-rows-preset");
    preset.addEventListener("change", () => this.update(i, "preset", preset.value));
    const remove = el("button", { type: "button", title: "Remove this row", "data-testid": "klein-rows-remove" }, [
      "×",
    ]);
    remove.addEventListener("click", () => this.remove(i));
    const blocks = el("button", {
      type: "button",
      title: "Block weights of this LoRA (a slider per block; preset custom)",
      "data-testid": "klein-rows-blocks",
    }, ["▦"]);
    blocks.setAttribute("aria-pressed", String(this.expanded.has(i)));
    blocks.addEventListener("click", () => this.toggleBlocks(i));
    const line = el("div", { class: "klein-rows-row", "data-testid": "klein-rows-row", dataset: { index: String(i) } }, [
      on,
      lora,
      scale,
      preset,
      blocks,
      remove,
    ]);
    line.classList.toggle("is-off", row.on === false);
    if (!this.expanded.has(i)) return [line];
    const editor = new BlockEditor(this.node, this.rowSource(i, preset), { timer: false });
    editor.root.dataset.row = String(i);
    this.editors.push(editor);
    return [line, editor.root];
  }

  select(choices, value, testid) {
    const options = choices.includes(value) || !value ? choices : [value, ...choices]; // a file gone: still shown
    const select = el(
      "select",
      { "data-testid": testid },
      options.map((c) => el("option", { value: c }, [c])),
    );
    select.value = value ?? "";
    select.title = value ?? "";
    return select;
  }

  resize() {
    const size = this.node.computeSize?.();
    if (size) this.node.setSize?.([this.node.size[0], Math.max(size[1], 0)]);
  }

  height() {
    const rows = parseRows(this.lastText)?.length ?? 0;
    return rows * ROW_HEIGHT_PX + this.expanded.size * EDITOR_HEIGHT_PX + 30;
  }

  destroy() {
    clearInterval(this.timer);
    for (const editor of this.editors) editor.destroy();
  }
}

function attachRows(node) {
  if (node.kleinRows) return node.kleinRows;
  const rows = new MixerRows(node);
  node.kleinRows = rows;
  const widget = node.addDOMWidget(WIDGET_NAME, "klein_mixer_rows", rows.root, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => rows.height(),
    getMaxHeight: () => rows.height(),
  });
  widget.serialize = false;
  const text = rows.widget(TEXT_WIDGET);
  if (text) {
    const callback = text.callback;
    text.callback = function () {
      const result = callback?.apply(this, arguments);
      rows.sync(false);
      return result;
    };
  }
  const onExecuted = node.onExecuted;
  node.onExecuted = function (output) {
    onExecuted?.apply(this, arguments);
    rows.setLayout(output?.klein_blocks?.[0]);
  };
  const onConfigure = node.onConfigure;
  node.onConfigure = function () {
    const result = onConfigure?.apply(this, arguments);
    rows.sync(true);
    return result;
  };
  const onRemoved = node.onRemoved;
  node.onRemoved = function () {
    rows.destroy();
    return onRemoved?.apply(this, arguments);
  };
  setTimeout(() => rows.sync(true), 0);
  return rows;
}

// ComfyUI may load this module twice (see js/klein_lora_lab.js): register once.
if (!(app.extensions ?? []).some((ext) => ext.name === ROWS_EXTENSION_NAME)) {
  app.registerExtension({
    name: ROWS_EXTENSION_NAME,
    nodeCreated(node) {
      const comfyClass = node.comfyClass ?? node.constructor?.comfyClass;
      if (comfyClass === ROWS_NODE_CLASS) attachRows(node);
    },
  });
}
