// Drives the training panel (js/train_panel.js) in the real ComfyUI frontend, in the classic canvas and with Vue
// nodes: the style workflow with the tiny model, the random VAE and the fake CLIP loader swapped in is queued from
// the page; the driver watches the chart and the gallery fill, hovers the chart, reloads the page mid-run, presses
// Stop & keep, then Resume with a few more steps; it also opens a planted run (its sweet-spot mark) and a failing
// prompt (the pack's error on the node). Prints one JSON line with what the page showed.
// Usage: node train_panel.mjs <server-url> <profile-dir> <artifacts-dir>; $KLEIN_LAB_PANEL_CONFIG names a JSON file
// {workflow, album, runs: {classic, vue}, planted, timeoutMs}.
import fs from "node:fs";
import path from "node:path";
import {
  holdsWithin,
  nextPaint,
  openBrowser,
  openFrontend,
  prepareStyleWorkflow,
  queuePrompt,
  runDriver,
  switchRenderer,
  waitFor,
  waitReady,
  workflowStored,
} from "./comfy_page.mjs";

const [url, profileDir, artifactsDir] = process.argv.slice(2);
const config = JSON.parse(fs.readFileSync(process.env.KLEIN_LAB_PANEL_CONFIG, "utf8"));
const ROOT = '[data-testid="klein-panel"]';
const TYPE = "KleinLabTrainLora";

// The style workflow with the test loaders and small sizes, the Train node at the top left of the window at scale 1
// (its panel on screen; text previews, which would sit on top of its taller panel, taken out); returns its id.
async function prepare(page, workflow, album, run, widgets) {
  const remove = ["MarkdownNote", "PreviewAny"];
  const layout = { shiftRight: 700, scale: 1, corner: [90, 20] };
  const ids = await prepareStyleWorkflow(page, { workflow, album, run, widgets, remove, ...layout });
  return ids.train;
}

async function observe(page) {
  return page.evaluate((sel) => {
    const root = document.querySelector(sel);
    if (!root) return null;
    const q = (id) => root.querySelector(`[data-testid="${id}"]`);
    const node = window.app.graph.nodes.find((n) => n.type === "KleinLabTrainLora");
    return {
      points: Number(root.dataset.points),
      chartPoints: Number(q("klein-panel-chart").dataset.points),
      clinicPoints: Number(q("klein-panel-clinic").dataset.points),
      scale: q("klein-panel-chart").dataset.scale,
      status: root.dataset.status,
      run: root.dataset.run,
      statusText: q("klein-panel-status").textContent,
      message: q("klein-panel-message").hidden ? "" : q("klein-panel-message").textContent,
      mark: q("klein-panel-mark").hidden ? null : { step: q("klein-panel-mark").dataset.step, text: q("klein-panel-mark").textContent },
      rows: [...root.querySelectorAll('[data-testid="klein-panel-row"]')].map((r) => Number(r.dataset.step)),
      labels: [...root.querySelectorAll('[data-testid="klein-panel-cell-label"]')].map((l) => l.textContent),
      imgs: [...root.querySelectorAll('[data-testid="klein-panel-cell"] img')].map((i) => ({ src: i.src, ok: i.complete && i.naturalWidth > 0 })),
      stopDisabled: q("klein-panel-stop").disabled,
      resumeHidden: q("klein-panel-resume").hidden,
      inVueNode: !!root.closest("[data-node-id]"),
      widgets: Object.fromEntries((node?.widgets ?? []).filter((w) => ["rank", "alpha", "learning_rate", "steps", "preset", "resume"].includes(w.name)).map((w) => [w.name, w.value])),
    };
  }, ROOT);
}

const pointsAtLeast = ([sel, n]) => Number(document.querySelector(sel)?.dataset.points ?? 0) >= n;
const statusIs = ([sel, s]) => document.querySelector(sel)?.dataset.status === s;
// The panel read the history of run `run` (a new run name, a new node, a reload): nothing is loading any more.
const historyRead = ([sel, run]) => {
  const root = document.querySelector(sel);
  const node = window.app.graph.nodes.find((n) => n.kleinPanel?.root === root);
  return !!node && node.kleinPanel.loading == null && root.dataset.run === run;
};

async function shotPanel(page, name) {
  const file = path.join(artifactsDir, `${name}.png`);
  await page.locator(ROOT).screenshot({ path: file });
  await page.screenshot({ path: path.join(artifactsDir, `${name}-page.png`) });
  return file;
}

async function scenario(page, mode) {
  const r = { mode };
  const run = config.runs[mode];
  await switchRenderer(page, mode);
  const id = await prepare(page, config.workflow, config.album, run, config.widgets);
  await waitFor(page, historyRead, [ROOT, run], 60_000);
  r.before = await observe(page);
  const t0 = Date.now();
  await queuePrompt(page);
  await waitFor(page, pointsAtLeast, [ROOT, 2], config.timeoutMs);
  r.early = await observe(page);
  r.firstPointMs = Date.now() - t0;
  await waitFor(page, ([sel, n]) => document.querySelectorAll(`${sel} [data-testid="klein-panel-row"]`).length >= n, [ROOT, 2], config.timeoutMs);
  await waitFor(page, ([sel, n]) => Number(document.querySelector(sel)?.dataset.points ?? 0) > n, [ROOT, r.early.points + 1], config.timeoutMs);
  await waitFor(
    page,
    (sel) => [...document.querySelectorAll(`${sel} [data-testid="klein-panel-cell"] img`)].every((i) => i.complete && i.naturalWidth > 0),
    ROOT,
    60000,
  );
  r.later = await observe(page);
  await shotPanel(page, `panel-${mode}-training`);
  // Hover the middle of the loss chart: the readout names the step and the values.
  const box = await page.locator(`${ROOT} [data-testid="klein-panel-chart"]`).boundingBox();
  await page.mouse.move(box.x + box.width * 0.7, box.y + box.height / 2);
  await waitFor(
    page,
    (sel) => {
      const hover = document.querySelector(`${sel} [data-testid="klein-panel-hover"]`);
      return !!hover && !hover.hidden && hover.textContent !== "";
    },
    ROOT,
    30_000,
  );
  r.hover = await page.locator(`${ROOT} [data-testid="klein-panel-hover"]`).textContent();
  const linear = (await observe(page)).scale;
  await page.locator(`${ROOT} [data-testid="klein-panel-scale"]`).click();
  await waitFor(
    page,
    ([sel, was]) => document.querySelector(`${sel} [data-testid="klein-panel-chart"]`)?.dataset.scale !== was,
    [ROOT, linear],
    30_000,
  );
  r.logScale = (await observe(page)).scale;
  // Click the newest image: it opens large with its label.
  await page.locator(`${ROOT} [data-testid="klein-panel-cell"]`).first().click();
  r.enlarged = await page.locator(`${ROOT} [data-testid="klein-panel-big"] figcaption`).allTextContents();
  await page.locator(`${ROOT} [data-testid="klein-panel-big"]`).click();
  // A/B: the newest step as A, the base (step 0) as B.
  await page.locator(`${ROOT} [data-testid="klein-panel-pick-a"]`).first().click();
  await page.locator(`${ROOT} [data-testid="klein-panel-pick-b"]`).last().click();
  r.compare = await page.locator(`${ROOT} [data-testid="klein-panel-big"] figcaption`).allTextContents();
  await shotPanel(page, `panel-${mode}-compare`);
  await page.locator(`${ROOT} [data-testid="klein-panel-big"]`).click();

  // A page reload mid-run: the panel reads the history from the run folder and keeps following the run.
  r.beforeReload = await observe(page);
  // Reload only once the frontend stored the workflow with the Train node as it is now (its run name).
  r.persisted = await workflowStored(page, id);
  await page.reload({ waitUntil: "domcontentloaded" });
  await waitReady(page);
  await waitFor(page, pointsAtLeast, [ROOT, r.beforeReload.points], 60000);
  r.afterReload = await observe(page);

  // Stop & keep, then Resume with a few more steps.
  await page.evaluate(() => {
    const node = window.app.graph.nodes.find((n) => n.type === "KleinLabTrainLora");
    window.app.canvas.ds.scale = 1;
    window.app.canvas.ds.offset = [90 - node.pos[0], 20 - node.pos[1]];
    window.app.graph.setDirtyCanvas(true, true);
  });
  // The panel follows the canvas on its next draw: wait until the Stop button is inside the window.
  await waitFor(
    page,
    (sel) => {
      const box = document.querySelector(`${sel} [data-testid="klein-panel-stop"]`)?.getBoundingClientRect();
      return !!box && box.top >= 0 && box.left >= 0 && box.bottom <= innerHeight && box.right <= innerWidth;
    },
    ROOT,
    30_000,
  );
  await page.locator(`${ROOT} [data-testid="klein-panel-stop"]`).click();
  await waitFor(page, statusIs, [ROOT, "stopped"], config.timeoutMs);
  r.stopped = await observe(page);
  r.stopMs = Date.now() - t0;
  await shotPanel(page, `panel-${mode}-stopped`);
  const last = r.stopped.points; // points are steps 1..N: N is the step the run stopped at
  await page.evaluate((steps) => {
    const node = window.app.graph.nodes.find((n) => n.type === "KleinLabTrainLora");
    const widget = node.widgets.find((w) => w.name === "steps");
    widget.value = steps;
    widget.callback?.(steps);
  }, last + 2);
  await page.locator(`${ROOT} [data-testid="klein-panel-resume"]`).click();
  await waitFor(page, statusIs, [ROOT, "finished"], config.timeoutMs);
  r.finished = await observe(page);
  r.nodeId = id;
  return r;
}

// s/step with the page connected: a run of config.bench.steps steps queued from the page, the panel following it.
async function bench(page) {
  await switchRenderer(page, "classic");
  const widgets = structuredClone(config.widgets);
  Object.assign(widgets.KleinLabTrainLora, { steps: config.bench.steps, sample_every: 0, checkpoint_every: 0 });
  await prepare(page, config.workflow, config.album, config.bench.run, widgets);
  const t0 = Date.now();
  await queuePrompt(page);
  await waitFor(page, statusIs, [ROOT, "finished"], config.timeoutMs);
  const obs = await observe(page);
  return { wallMs: Date.now() - t0, message: obs.message, points: obs.points };
}

// A planted run (its clinic records collapse onto the album at a known step): the panel shows the mark there.
async function planted(page, mode) {
  await switchRenderer(page, mode);
  await page.evaluate(async ({ run, type }) => {
    const app = window.app;
    app.graph.clear();
    const node = window.LiteGraph.createNode(type);
    node.pos = [90, 40];
    app.graph.add(node);
    const widget = node.widgets.find((w) => w.name === "run_name");
    widget.value = run;
    widget.callback?.(run);
    app.canvas.ds.scale = 1;
    app.canvas.ds.offset = [0, 0];
    app.graph.setDirtyCanvas(true, true);
  }, { run: config.planted, type: TYPE });
  await page.waitForFunction((sel) => !document.querySelector(`${sel} [data-testid="klein-panel-mark"]`)?.hidden, ROOT, { timeout: 30000 });
  await nextPaint(page);
  const obs = await observe(page);
  await shotPanel(page, `panel-${mode}-sweet-spot`);
  return obs;
}

// The page's cost per event: step events dispatched through the frontend's api as the websocket delivers them,
// each with one new point, on a panel that already holds `n` points; the handler's time and one chart redraw.
async function eventCost(page, n = 2000, events = 300) {
  return page.evaluate(
    async ({ type, n, events }) => {
      const app = window.app;
      const api = window.comfyAPI?.api?.api;
      app.graph.clear();
      const node = window.LiteGraph.createNode(type);
      app.graph.add(node);
      const panel = node.kleinPanel;
      const run = "bench_events";
      node.widgets.find((w) => w.name === "run_name").value = run;
      // The panel's first history read (no such run) starts on a timer after the node is made; let it start,
      // then wait until it is done (at most 60 s).
      await new Promise((r) => setTimeout(r, 0));
      for (const end = performance.now() + 60_000; panel.loading != null && performance.now() < end; ) {
        await new Promise((r) => requestAnimationFrame(r));
      }
      panel.state.run = run;
      const points = Array.from({ length: n }, (_, i) => [i + 1, 1 / (i + 1), null]);
      api.dispatchCustomEvent("klein_lab.train.step", { run, node: String(node.id), step: n, total: n + events, points, rate: 1, eta: 1, peak_vram: null, phase: "training" });
      await new Promise((r) => requestAnimationFrame(r));
      const t0 = performance.now();
      for (let i = 1; i <= events; i++) {
        const step = n + i;
        api.dispatchCustomEvent("klein_lab.train.step", { run, node: String(node.id), step, total: n + events, points: [[step, 1 / step, null]], rate: 1, eta: 1, peak_vram: null, phase: "training" });
      }
      const handlerMs = (performance.now() - t0) / events;
      const d0 = performance.now();
      for (let i = 0; i < 20; i++) panel.draw();
      const drawMs = (performance.now() - d0) / 20;
      return { pointsHeld: panel.state.points.size, handlerMsPerEvent: handlerMs, drawMsPerFrame: drawMs, events };
    },
    { type: TYPE, n, events },
  );
}

// A Sweep node carries the panel too: step events of a sweep's run (the server's payload: `sweep` with the run's
// place, knob and value) show which run of the sweep trains. The first event of a run reads its history (none here),
// the next ones fill the panel.
async function sweepPanel(page) {
  await switchRenderer(page, "classic");
  return page.evaluate(async () => {
    const app = window.app;
    const api = window.comfyAPI.api.api;
    app.graph.clear();
    const node = window.LiteGraph.createNode("KleinLabSweep");
    node.pos = [90, 40];
    app.graph.add(node);
    const panel = node.kleinPanel;
    // A new run's first event makes the panel read that run's history: wait until it is read (at most 60 s).
    const settle = async (run) => {
      await new Promise((r) => setTimeout(r, 0)); // the node's own first read starts on a timer
      const end = performance.now() + 60_000;
      while ((panel?.loading != null || (run && panel?.root.dataset.run !== run)) && performance.now() < end) {
        await new Promise((r) => requestAnimationFrame(r));
      }
    };
    await settle(null);
    const root = panel?.root;
    const sweepLine = () => root?.querySelector('[data-testid="klein-panel-sweep"]');
    const before = { hidden: sweepLine()?.hidden ?? null };
    const send = (index, value, step) =>
      api.dispatchCustomEvent("klein_lab.train.step", {
        run: `lr-learning_rate-${value}`,
        node: String(node.id),
        sweep: { name: "lr", index, total: 3, knob: "learning_rate", value, text: `run ${index + 1} of 3: learning_rate ${value}` },
        step,
        total: 10,
        points: [[step, 0.5, null]],
        rate: 1,
        eta: 9,
        peak_vram: null,
        phase: "training",
      });
    send(1, "5e-05", 1);
    await settle("lr-learning_rate-5e-05");
    send(1, "5e-05", 2);
    await settle("lr-learning_rate-5e-05");
    const second = { text: sweepLine()?.textContent, hidden: sweepLine()?.hidden, run: root?.dataset.run };
    send(2, "0.0002", 1);
    await settle("lr-learning_rate-0.0002");
    send(2, "0.0002", 2);
    await settle("lr-learning_rate-0.0002");
    const third = { text: sweepLine()?.textContent, hidden: sweepLine()?.hidden, run: root?.dataset.run };
    return { hasPanel: !!root, before, second, third };
  });
}

// A new Train node shows the preset's values; switching the preset moves them, an edited value stays.
async function presets(page) {
  return page.evaluate(async (type) => {
    const app = window.app;
    app.graph.clear();
    const node = window.LiteGraph.createNode(type);
    app.graph.add(node);
    // The preset values arrive with the presets table (fetched once): the node then has kleinPresetSync.
    for (const end = performance.now() + 60_000; !node.kleinPresetSync && performance.now() < end; ) {
      await new Promise((r) => requestAnimationFrame(r));
    }
    const values = () => Object.fromEntries(node.widgets.filter((w) => ["rank", "alpha", "learning_rate", "steps"].includes(w.name)).map((w) => [w.name, w.value]));
    const preset = node.widgets.find((w) => w.name === "preset");
    const fresh = values();
    const rank = node.widgets.find((w) => w.name === "rank");
    rank.value = 8; // the artist's own rank
    preset.value = "character";
    preset.callback?.("character");
    const switched = values();
    const tips = Object.fromEntries(
      ["preset", "learning_rate"].map((name) => [name, node.constructor.nodeData?.input?.required?.[name]?.[1]?.tooltip ?? ""]),
    );
    return { fresh, switched, tips };
  }, TYPE);
}

// A failing prompt: the Train node with a hostile run name; the pack's message appears on the node.
async function failing(page, mode) {
  await switchRenderer(page, mode);
  const id = await prepare(page, config.workflow, config.album, "../escape", config.widgets);
  await queuePrompt(page);
  await waitFor(page, () => window.kleinLastError, null, config.timeoutMs);
  // The pack's message on the node and the frontend's toast follow the error event.
  await holdsWithin(
    page,
    (id) => {
      const node = window.app.graph.getNodeById(id) ?? window.app.graph.getNodeById(Number(id));
      return node?.kleinError?.hidden === false && !!document.querySelector(".p-toast-message");
    },
    id,
    30_000,
  );
  const out = await page.evaluate((id) => {
    const node = window.app.graph.getNodeById(id) ?? window.app.graph.getNodeById(Number(id));
    const box = node?.kleinError;
    const toasts = [...document.querySelectorAll(".p-toast-message")].map((t) => t.textContent);
    const last = window.kleinLastError;
    window.kleinLastError = null;
    return { last, onNode: box && !box.hidden ? box.textContent : null, inVue: !!box?.closest("[data-node-id]"), toasts };
  }, id);
  await page.screenshot({ path: path.join(artifactsDir, `panel-${mode}-error-page.png`) });
  return out;
}

async function main() {
  const { context, page, pageErrors } = await openBrowser(profileDir, { width: 1400, height: 1500 });
  const result = { modes: {}, planted: {}, errors: {}, pageErrors };
  try {
    await openFrontend(page, url);
    await page.evaluate(async () => {
      await window.app.extensionManager.setting.set("Comfy.Minimap.Visible", false);
    });
    result.extensions = await page.evaluate(() => window.app.extensions.map((e) => e.name));
    result.presets = await presets(page);
    result.sweepPanel = await sweepPanel(page);
    for (const mode of ["classic", "vue"]) result.modes[mode] = await scenario(page, mode);
    for (const mode of ["classic", "vue"]) result.planted[mode] = await planted(page, mode);
    for (const mode of ["classic", "vue"]) result.errors[mode] = await failing(page, mode);
    result.eventCost = await eventCost(page);
    result.bench = await bench(page);
  } catch (err) {
    await page.screenshot({ path: path.join(artifactsDir, "panel-failure.png") });
    throw err;
  } finally {
    await context.close();
  }
  return result;
}

runDriver(main);
