// Drives the LoRA nodes' page pieces in the real ComfyUI frontend, classic canvas and Vue nodes:
// - the block-weight editor on Klein LoRA Loader (blocks) (js/block_editor.js): the 4B map before a run, preset
//   buttons and a slider writing the block_vector text, a typed 9B vector redrawing 32 sliders, a run on the tiny
//   model teaching it the model's block count and showing what was loaded, a custom vector run accepted;
// - the Klein LoRA Mixer's per-LoRA on/off toggle: one LoRA switched off leaves it out of the queued prompt and of
//   what the node applied.
// Usage: node lora_nodes.mjs <server-url> <profile-dir> <artifacts-dir>; $KLEIN_LAB_LORAS_CONFIG names a JSON file
// {model, run, timeoutMs}. Prints one JSON line with what the page showed.
import fs from "node:fs";
import path from "node:path";
import { holdsWithin, openBrowser, openFrontend, runDriver, switchRenderer, waitFor } from "./comfy_page.mjs";

const [url, profileDir, artifactsDir] = process.argv.slice(2);
const config = JSON.parse(fs.readFileSync(process.env.KLEIN_LAB_LORAS_CONFIG, "utf8"));
const EDITOR = '[data-testid="klein-blocks"]';
const SETTLE_TIMEOUT_MS = 30_000; // for the page to reach a state it is heading to (loaded machines are slow)

// Waits until the block editor shows what the loader's widgets hold (its vector text and preset), with its sliders
// drawn (a preset button, a slider or a widget change redraws it from the widgets).
async function editorSynced(page) {
  await waitFor(
    page,
    (sel) => {
      const root = document.querySelector(sel);
      const node = window.app.graph.nodes.find((n) => n.type === "KleinLabLoraLoaderBlocks");
      const value = (name, fallback) => String(node?.widgets.find((w) => w.name === name)?.value ?? fallback);
      return (
        !!root &&
        Number(root.dataset.count) > 0 &&
        root.dataset.vector === value("block_vector", "") &&
        root.dataset.preset === value("preset", "all")
      );
    },
    EDITOR,
    SETTLE_TIMEOUT_MS,
  );
}

// Waits until the mixer's `more_loras` text holds `count` rows (when given) whose first row has the values in
// `first`, and its rows widget draws that many rows.
async function rowsHold(page, { count, first = {} }) {
  await waitFor(
    page,
    ({ count, first }) => {
      const node = window.app.graph.nodes.find((n) => n.type === "KleinLabLoraMixer");
      const rows = JSON.parse(node?.widgets.find((w) => w.name === "more_loras")?.value || "[]");
      const shown = Number(document.querySelector('[data-testid="klein-rows"]')?.dataset.rows ?? -1);
      return (
        shown === rows.length &&
        (count === undefined || rows.length === count) &&
        Object.entries(first).every(([key, value]) => rows[0]?.[key] === value)
      );
    },
    { count, first },
    SETTLE_TIMEOUT_MS,
  );
}

// Records the server's executed / error / success events in the page (once).
async function recordEvents(page) {
  await page.evaluate(async () => {
    if (window.__kleinEvents) return;
    window.__kleinEvents = [];
    const { api } = await import("/scripts/api.js");
    for (const type of ["executed", "execution_error", "execution_success"]) {
      api.addEventListener(type, ({ detail }) => window.__kleinEvents.push({ type, detail }));
    }
  });
}

// A graph: UNETLoader (tiny model) -> `type` -> Klein Model Info (an output node); returns the node ids.
async function buildGraph(page, type, widgets) {
  return page.evaluate(
    async ({ type, widgets, model, run }) => {
      const app = window.app;
      app.graph.clear();
      const make = (t, pos) => {
        const node = window.LiteGraph.createNode(t);
        node.pos = pos;
        app.graph.add(node);
        return node;
      };
      const loader = make("UNETLoader", [20, 40]);
      const lora = make(type, [300, 40]);
      const info = make("KleinLabModelInfo", [880, 40]);
      loader.connect(0, lora, 0);
      lora.connect(0, info, 0);
      const set = (node, name, value) => {
        const widget = node.widgets.find((w) => w.name === name);
        if (!widget) throw new Error(`${node.type} has no widget ${name}`);
        widget.value = value;
        widget.callback?.(value);
      };
      set(loader, "unet_name", model);
      const loras = lora.widgets.find((w) => w.name === "lora_name" || w.name === "lora_1").options.values;
      const ours = loras.filter((v) => v.includes(run)).sort();
      for (const [name, value] of Object.entries(widgets)) {
        set(lora, name, typeof value === "number" && name.startsWith("lora") ? ours[value] : value);
      }
      app.canvas.ds.scale = 1;
      app.canvas.ds.offset = [40, 60]; // below the top bar: the node's title shows in the page screenshot
      app.graph.setDirtyCanvas(true, true);
      return { lora: String(lora.id), info: String(info.id), loras: ours };
    },
    { type, widgets, model: config.model, run: config.run },
  );
}

// Queues the graph from the page and waits for the run to succeed or fail; returns the node's executed output.
async function queue(page, nodeId) {
  const start = await page.evaluate(() => window.__kleinEvents.length);
  await page.evaluate(() => window.app.extensionManager.command.execute("Comfy.QueuePrompt"));
  await page.waitForFunction(
    (start) => window.__kleinEvents.slice(start).some((e) => e.type !== "executed"),
    start,
    { timeout: config.timeoutMs, polling: 200 },
  );
  return page.evaluate(
    ([start, nodeId]) => {
      const events = window.__kleinEvents.slice(start);
      const error = events.find((e) => e.type === "execution_error");
      const executed = events.find((e) => e.type === "executed" && String(e.detail.node) === nodeId);
      return { ok: !error, error: error?.detail?.exception_message ?? null, output: executed?.detail?.output ?? null };
    },
    [start, nodeId],
  );
}

// The prompt the page would queue now: the inputs of one node.
async function promptInputs(page, nodeId) {
  return page.evaluate(async (nodeId) => {
    const { output } = await window.app.graphToPrompt();
    return output[nodeId]?.inputs ?? null;
  }, nodeId);
}

async function editorState(page) {
  return page.evaluate((sel) => {
    const root = document.querySelector(sel);
    if (!root) return null;
    const node = window.app.graph.nodes.find((n) => n.type === "KleinLabLoraLoaderBlocks");
    const cols = [...root.querySelectorAll('[data-testid="klein-blocks-col"]')];
    const loaded = root.querySelector('[data-testid="klein-blocks-loaded"]');
    const warning = root.querySelector('[data-testid="klein-blocks-warning"]');
    return {
      count: Number(root.dataset.count),
      layout: root.dataset.layout,
      vectorWidget: node.widgets.find((w) => w.name === "block_vector").value,
      presetWidget: node.widgets.find((w) => w.name === "preset").value,
      blocks: cols.map((c) => c.dataset.block),
      groups: cols.map((c) => c.dataset.group),
      colours: [...new Set(cols.map((c) => getComputedStyle(c).borderTopColor))],
      values: cols.map((c) => Number(c.dataset.value)),
      untouched: cols.filter((c) => c.classList.contains("is-untouched")).length,
      warning: warning.hidden ? "" : warning.textContent,
      loaded: loaded.hidden
        ? null
        : {
            text: loaded.textContent,
            modules: Number(loaded.dataset.modules),
            blocks: Number(loaded.dataset.blocks),
            format: loaded.dataset.format,
          },
      inVueNode: !!root.closest("[data-node-id]"),
      visible: root.getBoundingClientRect().height > 100,
    };
  }, EDITOR);
}

async function setWidget(page, type, name, value) {
  await page.evaluate(
    ([type, name, value]) => {
      const node = window.app.graph.nodes.find((n) => n.type === type);
      const widget = node.widgets.find((w) => w.name === name);
      widget.value = value;
      widget.callback?.(value);
    },
    [type, name, value],
  );
  // The editor re-reads the widgets on their callback (or within its sync period, for changes made without one).
  if (type === "KleinLabLoraLoaderBlocks") await editorSynced(page);
}

async function editorScenario(page, mode) {
  const r = {};
  const ids = await buildGraph(page, "KleinLabLoraLoaderBlocks", { lora_name: 0, preset: "all", block_vector: "" });
  await page.waitForSelector(EDITOR, { timeout: 20_000 });
  await page.waitForFunction((sel) => Number(document.querySelector(sel)?.dataset.count) > 0, EDITOR, {
    timeout: 20_000,
  });
  r.closed = await page.evaluate((sel) => {
    const root = document.querySelector(sel);
    return { open: root.dataset.open, height: root.getBoundingClientRect().height, sliders: root.querySelectorAll("input[type=range]").length, visibleSliders: [...root.querySelectorAll("input[type=range]")].filter((x) => x.getClientRects().length).length };
  }, EDITOR);
  await page.locator('[data-testid="klein-blocks-toggle"]').click();
  await waitFor(
    page,
    (sel) => document.querySelector(sel)?.dataset.open === "true",
    EDITOR,
    SETTLE_TIMEOUT_MS,
  );
  await editorSynced(page);
  r.before = await editorState(page);
  await page.locator('[data-testid="klein-blocks-preset-identity"]').click();
  await editorSynced(page);
  r.identity = await editorState(page);
  r.identityPrompt = await promptInputs(page, ids.lora);
  // A hand-made 4B vector for the docs' picture: binding full, texture low, identity full, composition fading.
  const shaped = "1, 1, 1, 1, 1, 0.2, 0.2, 0.3, 0.3, 0.4, 0.5, 1, 1, 1, 1, 1, 1, 1, 1, 0.9, 0.8, 0.6, 0.5, 0.3, 0.2";
  await setWidget(page, "KleinLabLoraLoaderBlocks", "block_vector", shaped);
  r.shaped = await editorState(page);
  await page.locator(EDITOR).screenshot({ path: path.join(artifactsDir, `block-editor-4b-${mode}.png`) });
  const nine = Array.from({ length: 32 }, (_, i) => (i % 2 ? "0.5" : "1")).join(", ");
  await setWidget(page, "KleinLabLoraLoaderBlocks", "block_vector", nine);
  r.nine = await editorState(page);
  await page.locator('[data-testid="klein-blocks-preset-reset"]').click();
  await editorSynced(page);
  r.reset = await editorState(page);
  r.run1 = await queue(page, ids.lora);
  // The node's ui output reaches the editor with the `executed` event: it shows what was loaded.
  r.loadedShown = await holdsWithin(
    page,
    (sel) => document.querySelector(sel)?.querySelector('[data-testid="klein-blocks-loaded"]')?.hidden === false,
    EDITOR,
    SETTLE_TIMEOUT_MS,
  );
  r.afterRun = await editorState(page);
  await page.locator('[data-testid="klein-blocks-preset-texture"]').click();
  await editorSynced(page);
  const slider = page.locator('[data-testid="klein-blocks-col"][data-group="texture"] input').first();
  await slider.focus();
  for (let i = 0; i < 4; i++) await page.keyboard.press("ArrowDown"); // 1 -> 0.8, as a hand on the slider
  await editorSynced(page);
  r.slid = await editorState(page);
  await setWidget(page, "KleinLabLoraLoaderBlocks", "preset", "identity");
  r.presetCombo = await editorState(page);
  await page.locator('[data-testid="klein-blocks-preset-texture"]').click();
  await editorSynced(page);
  r.run2 = await queue(page, ids.lora);
  r.final = await editorState(page);
  await page.locator(EDITOR).screenshot({ path: path.join(artifactsDir, `block-editor-${mode}.png`) });
  await page.screenshot({ path: path.join(artifactsDir, `block-editor-${mode}-page.png`) });
  return r;
}

async function mixerScenario(page, mode) {
  const r = {};
  const ids = await buildGraph(page, "KleinLabLoraMixer", { lora_1: 0, lora_2: 1, scale_1: 1, scale_2: 0.5, on_1: true, on_2: true, more_loras: "" });
  r.loras = ids.loras;
  await page.evaluate((id) => {
    const node = window.app.graph.getNodeById(Number(id));
    node.setSize([460, node.size[1]]); // room for the rows' file names (as an artist widens the node)
    window.app.graph.setDirtyCanvas(true, true);
  }, ids.lora);
  r.bothPrompt = await promptInputs(page, ids.lora);
  r.both = await queue(page, ids.lora);
  await setWidget(page, "KleinLabLoraMixer", "on_2", false);
  r.offPrompt = await promptInputs(page, ids.lora);
  r.off = await queue(page, ids.lora);
  await page.screenshot({ path: path.join(artifactsDir, `mixer-toggle-${mode}-page.png`) });
  // '+ Add LoRA': two rows past the slots, edited through their own fields.
  const rows = '[data-testid="klein-rows"]';
  r.rowsBefore = await page.evaluate((sel) => Number(document.querySelector(sel)?.dataset.rows ?? -1), rows);
  await page.locator('[data-testid="klein-rows-add"]').click();
  await page.locator('[data-testid="klein-rows-add"]').click();
  await page.locator('[data-testid="klein-rows-lora"]').nth(0).selectOption(ids.loras[0]);
  await page.locator('[data-testid="klein-rows-lora"]').nth(1).selectOption(ids.loras[1]);
  await page.locator('[data-testid="klein-rows-scale"]').nth(0).fill("0.25");
  await page.locator('[data-testid="klein-rows-scale"]').nth(0).press("Enter");
  await rowsHold(page, { count: 2, first: { scale: 0.25 } });
  r.rowsCount = await page.evaluate((sel) => Number(document.querySelector(sel)?.dataset.rows ?? -1), rows);
  r.rowsPrompt = await promptInputs(page, ids.lora);
  r.rowsRun = await queue(page, ids.lora);
  await page.locator('[data-testid="klein-rows-on"]').nth(0).uncheck();
  await rowsHold(page, { first: { on: false } });
  r.rowOffPrompt = await promptInputs(page, ids.lora);
  r.rowOffRun = await queue(page, ids.lora);
  await page.screenshot({ path: path.join(artifactsDir, `mixer-rows-${mode}-page.png`) });
  await page.locator(rows).screenshot({ path: path.join(artifactsDir, `mixer-rows-${mode}.png`) });
  await page.locator('[data-testid="klein-rows-remove"]').nth(1).click();
  await rowsHold(page, { count: 1 });
  r.removedPrompt = await promptInputs(page, ids.lora);
  // The row's own block editor: the model's map (from the runs above), a group button, the row back on, a run.
  await page.locator('[data-testid="klein-rows-blocks"]').nth(0).click();
  const rowEditor = `${rows} [data-testid="klein-blocks"]`;
  await page.waitForFunction((sel) => Number(document.querySelector(sel)?.dataset.count) > 0, rowEditor, {
    timeout: 20_000,
  });
  await page.locator(`${rowEditor} [data-testid="klein-blocks-preset-texture"]`).click();
  await page.locator('[data-testid="klein-rows-on"]').nth(0).check();
  await rowsHold(page, { first: { on: true } });
  r.rowEditor = await page.evaluate((sel) => {
    const root = document.querySelector(sel);
    const cols = [...root.querySelectorAll('[data-testid="klein-blocks-col"]')];
    return {
      count: Number(root.dataset.count),
      layout: root.dataset.layout,
      values: cols.map((c) => Number(c.dataset.value)),
      groups: cols.map((c) => c.dataset.group),
      rowPreset: document.querySelector('[data-testid="klein-rows-preset"]').value,
    };
  }, rowEditor);
  r.rowBlocksPrompt = await promptInputs(page, ids.lora);
  r.rowBlocksRun = await queue(page, ids.lora);
  await page.locator(rows).screenshot({ path: path.join(artifactsDir, `mixer-row-blocks-${mode}.png`) });
  await page.screenshot({ path: path.join(artifactsDir, `mixer-row-blocks-${mode}-page.png`) });
  return r;
}

async function main() {
  const { context, page, pageErrors } = await openBrowser(profileDir, { width: 1400, height: 900 });
  const result = { modes: {}, pageErrors };
  try {
    await openFrontend(page, url);
    await recordEvents(page);
    for (const mode of ["classic", "vue"]) {
      await switchRenderer(page, mode);
      result.modes[mode] = { editor: await editorScenario(page, mode), mixer: await mixerScenario(page, mode) };
    }
  } finally {
    await context.close();
  }
  return result;
}

runDriver(main);
