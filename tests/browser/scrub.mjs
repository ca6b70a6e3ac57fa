// Drives the scrubber widget (js/scrubber.js) in the real ComfyUI frontend, in Debian's Chromium.
// Usage: node scrub.mjs <server-url> <profile-dir> <artifacts-dir>; the scenario comes from the JSON file named by
// $KLEIN_LAB_SCRUB_CONFIG: {small: meta, large: meta, workflow?: {workflow, widgets, small, timeoutMs}} (metas as
// the node sends them; `workflow` runs an example workflow from the page on the tiny model).
// Prints one JSON line of observations ({modes: {classic, vue}, ...}); pytest compares them with the metas.
import fs from "node:fs";
import path from "node:path";
import {
  collectExecutionErrors,
  executionErrors,
  holdsWithin,
  loadWithTestClip,
  nextPaint,
  openBrowser,
  openFrontend,
  queuePrompt,
  runDriver,
  switchRenderer,
  waitFor,
  waitReady,
  workflowStored,
} from "./comfy_page.mjs";

const [url, profileDir, artifactsDir] = process.argv.slice(2);
const config = JSON.parse(fs.readFileSync(process.env.KLEIN_LAB_SCRUB_CONFIG, "utf8"));
const NODE_TYPE = "KleinLabScrubRun";
const MIXER_TYPE = "KleinLabMixerGrid";
// The widget of the node under test (addScrubNode marks it; earlier nodes' widgets may still be in the DOM).
const ROOT = '[data-testid="klein-scrub"][data-test-current]';
const SETTLE_TIMEOUT_MS = 30_000; // for the page to reach a state it is heading to (loaded machines are slow)
const RESTORE_TIMEOUT_MS = 60_000; // for the frontend to store the open workflow, or to restore it after a reload
const SCRUB_PROPERTIES = ["klein_scrub_meta", "klein_scrub_frame", "klein_scrub_ab"]; // what the widget restores from

// --- page helpers (run inside the page) ---------------------------------------------------------------------

// The node types the frontend got from the server's /object_info.
async function registeredTypes(page) {
  return page.evaluate(
    (types) => types.filter((type) => !!window.LiteGraph.registered_node_types[type]),
    [NODE_TYPE, MIXER_TYPE],
  );
}

// An empty graph with one scrub (or mixer grid) node at the top left, canvas at scale 1.
async function addScrubNode(page, nodeType = NODE_TYPE) {
  await page.evaluate(() => window.app.graph.clear());
  // Let the Vue renderer unmount the old nodes first: the new node may get the same id as a removed one.
  await waitFor(page, () => !document.querySelector("[data-node-id]"), null, SETTLE_TIMEOUT_MS);
  const id = await page.evaluate((type) => {
    const app = window.app;
    app.canvas.ds.offset = [80, 40]; // clear of the side bar and the top menu
    app.canvas.ds.scale = 1;
    const node = window.LiteGraph.createNode(type);
    node.pos = [40, 60];
    app.graph.add(node);
    node.setSize([560, Math.max(620, node.computeSize()[1])]);
    app.graph.setDirtyCanvas(true, true);
    return String(node.id);
  }, nodeType);
  await markCurrent(page, id);
  return id;
}

async function markCurrent(page, id) {
  await page.evaluate((id) => {
    for (const e of document.querySelectorAll("[data-test-current]")) delete e.dataset.testCurrent;
    window.app.graph.getNodeById(id).kleinScrub.root.dataset.testCurrent = "1";
  }, id);
  await page.waitForSelector(ROOT, { state: "attached", timeout: 15_000 });
  // A node with many widgets can reach below the window: pan the canvas up until the whole widget shows.
  await page.evaluate(() => {
    window.__kleinScrubBottom = (sel) => {
      const root = document.querySelector(sel);
      const thumbs = root.querySelector('[data-testid="klein-scrub-thumbs"]');
      return Math.max(root.getBoundingClientRect().bottom, thumbs.getBoundingClientRect().bottom);
    };
  });
  for (let i = 0; i < 3; i++) {
    const moved = await page.evaluate((sel) => {
      const bottom = window.__kleinScrubBottom(sel);
      const over = bottom - (window.innerHeight - 20);
      if (over <= 0) return null;
      window.app.canvas.ds.offset[1] -= over / window.app.canvas.ds.scale;
      window.app.canvas.setDirty(true, true);
      return bottom;
    }, ROOT);
    if (moved === null) break;
    // The widget follows the canvas on its next draw: wait until it moved up.
    await waitFor(
      page,
      ({ sel, bottom }) => window.__kleinScrubBottom(sel) < bottom - 0.5,
      { sel: ROOT, bottom: moved },
      SETTLE_TIMEOUT_MS,
    );
  }
  await page.waitForSelector(ROOT, { state: "visible", timeout: 15_000 });
}

// Deliver a result the way the server does: an `executed` message through the frontend's api, so the app
// routes it to node.onExecuted (the node's own handler is the fallback when the api object is not exposed).
async function deliver(page, nodeId, meta) {
  return page.evaluate(
    ({ nodeId, meta }) => {
      const output = { klein_scrub: [meta] };
      const api = window.comfyAPI?.api?.api;
      const t0 = performance.now();
      let how = "onExecuted";
      if (api?.dispatchCustomEvent) {
        api.dispatchCustomEvent("executed", { node: nodeId, display_node: nodeId, output, prompt_id: "scrub-test" });
        how = "api";
      } else {
        window.app.graph.getNodeById(nodeId).onExecuted(output);
      }
      // The handlers run synchronously: this is the main-thread time the result took to show up in the widget.
      return { how, ms: performance.now() - t0 };
    },
    { nodeId, meta },
  );
}

// What the widget shows now, once its main image(s) finished loading.
async function observe(page) {
  return page.evaluate(async (rootSel) => {
    const root = document.querySelector(rootSel);
    const q = (id) => root.querySelector(`[data-testid="${id}"]`);
    const imgs = [q("klein-scrub-image"), q("klein-scrub-image-b")];
    // Until the shown images finished loading (or failed: `complete` either way); at most 30 s on a loaded machine.
    for (const end = performance.now() + 30_000; performance.now() < end; ) {
      const pending = imgs.filter((img) => img.offsetParent && img.getAttribute("src") && !img.complete);
      if (!pending.length) break;
      await new Promise((r) => setTimeout(r, 50));
    }
    const node = window.app.graph.nodes.find((n) => n.kleinScrub?.root === root);
    const vis = (e) => !!e && e.offsetParent !== null && !e.hidden;
    return {
      frame: root.dataset.frame === "" ? null : Number(root.dataset.frame),
      label: q("klein-scrub-label").textContent,
      count: q("klein-scrub-count").textContent,
      src: q("klein-scrub-image").getAttribute("src"),
      loaded: q("klein-scrub-image").naturalWidth > 0,
      srcB: vis(q("klein-scrub-image-b")) ? q("klein-scrub-image-b").getAttribute("src") : null,
      aLabel: vis(q("klein-scrub-a-label")) ? q("klein-scrub-a-label").textContent : null,
      bLabel: vis(q("klein-scrub-b-label")) ? q("klein-scrub-b-label").textContent : null,
      mode: q("klein-scrub-stage").dataset.mode ?? "off",
      axisValues: [...root.querySelectorAll('[data-testid="klein-scrub-axis-value"]')].map((e) => e.textContent),
      imgCount: root.querySelectorAll("img").length,
      thumbImgs: root.querySelectorAll('[data-testid="klein-scrub-thumb"] img').length,
      thumbCells: root.querySelectorAll('[data-testid="klein-scrub-thumb"]').length,
      props: node
        ? {
            frame: node.properties.klein_scrub_frame,
            ab: node.properties.klein_scrub_ab,
            frames: node.properties.klein_scrub_meta?.frames?.length ?? 0,
          }
        : null,
      focused: root.contains(document.activeElement),
      widgetsInDom: document.querySelectorAll('[data-testid="klein-scrub"]').length,
      scrubNodes: window.app.graph.nodes.filter((n) => n.kleinScrub).length,
    };
  }, ROOT);
}

// Drag a range input's thumb with the mouse from its current value to `fraction` of its track.
async function dragSlider(page, selector, fraction) {
  const slider = page.locator(`${ROOT} ${selector}`).first();
  const box = await slider.boundingBox();
  const { value, max } = await slider.evaluate((e) => ({ value: Number(e.value), max: Number(e.max) }));
  const thumb = 8; // half of Chromium's default thumb width: the track's usable span is box.width - 16
  const xOf = (f) => box.x + thumb + f * (box.width - 2 * thumb);
  const y = box.y + box.height / 2;
  await page.mouse.move(xOf(max ? value / max : 0), y);
  await page.mouse.down();
  await page.mouse.move(xOf(fraction), y, { steps: 8 });
  await page.mouse.up();
}

async function shot(page, name) {
  await nextPaint(page); // the last change drawn (observe already waited for the images)
  await page.screenshot({ path: path.join(artifactsDir, `${name}.png`) });
  await page.locator(ROOT).first().screenshot({ path: path.join(artifactsDir, `${name}-widget.png`) });
}

// Time from a slider input event until the new frame's image has loaded (first visit and cached revisit).
async function timeFrameShow(page, frames) {
  return page.evaluate(
    async ({ rootSel, frames }) => {
      const root = document.querySelector(rootSel);
      const slider = root.querySelector('[data-testid="klein-scrub-slider"]');
      const img = root.querySelector('[data-testid="klein-scrub-image"]');
      const one = async (i) => {
        const t0 = performance.now();
        slider.value = String(i);
        slider.dispatchEvent(new Event("input", { bubbles: true }));
        while (!(img.complete && img.naturalWidth > 0)) await new Promise((r) => requestAnimationFrame(r));
        await img.decode();
        return performance.now() - t0;
      };
      const first = [];
      for (const i of frames) first.push(await one(i));
      const cached = [];
      for (const i of frames) cached.push(await one(i));
      return { first, cached };
    },
    { rootSel: ROOT, frames },
  );
}

// Load a large result, then scroll its thumbnail strip end to end; report how long the main thread was blocked
// (long tasks, the worst gap between animation frames) and how many <img> elements ever existed at once.
async function largeBatch(page, nodeId, meta) {
  await page.evaluate(() => {
    window.__kleinLong = [];
    window.__kleinObs?.disconnect();
    window.__kleinObs = new PerformanceObserver((list) => {
      for (const e of list.getEntries()) window.__kleinLong.push(e.duration);
    });
    window.__kleinObs.observe({ type: "longtask" });
  });
  const { how, ms: deliverMs } = await deliver(page, nodeId, meta);
  return page.evaluate(
    async ({ rootSel, how, deliverMs }) => {
      const root = document.querySelector(rootSel);
      const strip = root.querySelector('[data-testid="klein-scrub-thumbs"]');
      let maxImgs = 0;
      let maxGap = 0;
      let last = performance.now();
      const tick = () => {
        const now = performance.now();
        maxGap = Math.max(maxGap, now - last);
        last = now;
        maxImgs = Math.max(maxImgs, root.querySelectorAll("img").length);
      };
      const frames = async (n) => {
        for (let i = 0; i < n; i++) {
          await new Promise((r) => requestAnimationFrame(r));
          tick();
        }
      };
      await frames(20);
      const steps = 40;
      for (let i = 1; i <= steps; i++) {
        strip.scrollLeft = ((strip.scrollWidth - strip.clientWidth) * i) / steps;
        await frames(3);
      }
      // Jump across the whole batch with the keyboard while the strip follows.
      root.focus();
      for (let i = 0; i < 30; i++) {
        root.dispatchEvent(new KeyboardEvent("keydown", { key: "ArrowUp", bubbles: true }));
        await frames(1);
      }
      await frames(20);
      window.__kleinObs.disconnect();
      return {
        how,
        deliverMs,
        frames: Number(root.querySelector('[data-testid="klein-scrub-slider"]').max) + 1,
        thumbCells: root.querySelectorAll('[data-testid="klein-scrub-thumb"]').length,
        maxImgs,
        imgsAtEnd: root.querySelectorAll("img").length,
        maxFrameGapMs: maxGap,
        longTasksMs: window.__kleinLong.slice(),
        frame: Number(root.dataset.frame),
      };
    },
    { rootSel: ROOT, how, deliverMs },
  );
}

// --- the scenario, once per renderer ------------------------------------------------------------------------

async function scenario(page, mode, { small, large, mixer }) {
  const r = { mode };
  await switchRenderer(page, mode);
  r.vueNodesSetting = await page.evaluate(() => window.app.extensionManager.setting.get("Comfy.VueNodes.Enabled"));
  const nodeId = await addScrubNode(page);
  r.inVueNode = await page.evaluate(
    ({ id, sel }) => !!document.querySelector(`[data-node-id="${id}"] ${sel}`),
    { id: nodeId, sel: ROOT },
  );
  r.empty = await observe(page);
  r.delivered = await deliver(page, nodeId, small);
  r.initial = await observe(page);
  await shot(page, `scrub-${mode}`);

  // Mouse: drag the frame slider to the end, back to the start, then to the middle.
  await dragSlider(page, '[data-testid="klein-scrub-slider"]', 1);
  r.dragEnd = await observe(page);
  await dragSlider(page, '[data-testid="klein-scrub-slider"]', 0);
  r.dragStart = await observe(page);
  await dragSlider(page, '[data-testid="klein-scrub-slider"]', 0.5);
  r.dragMid = await observe(page);
  // Mouse on an axis slider: the slowest axis to its end keeps the other coordinates.
  r.axisSliders = await page.locator(`${ROOT} [data-testid="klein-scrub-axis-slider"]`).evaluateAll((s) =>
    s.map((e) => e.dataset.axis),
  );
  await dragSlider(page, '[data-testid="klein-scrub-axis-slider"] >> nth=-1', 1);
  r.axisDrag = await observe(page);

  // Keyboard: focus the widget by clicking the image, then walk.
  await page.locator(`${ROOT} [data-testid="klein-scrub-stage"]`).click();
  r.keys = {};
  for (const key of ["Home", "ArrowRight", "ArrowRight", "ArrowUp", "ArrowLeft", "ArrowDown", "End", "ArrowDown"]) {
    await page.keyboard.press(key);
    r.keys[`${Object.keys(r.keys).length}:${key}`] = await observe(page);
  }
  await shot(page, `scrub-${mode}-keys`);
  // The thumbnail strip: a click on a thumb shows its frame.
  await page.locator(`${ROOT} [data-testid="klein-scrub-thumb"] >> nth=3`).click();
  r.thumbClick = await observe(page);

  // A/B: A = frame 1, B = frame 7, side by side, then wipe; then B follows the slider.
  await page.keyboard.press("Home");
  await page.keyboard.press("ArrowRight");
  await page.locator(`${ROOT} [data-testid="klein-scrub-set-a"]`).click();
  await page.locator(ROOT).focus();
  for (let i = 0; i < 6; i++) await page.keyboard.press("ArrowRight");
  await page.locator(`${ROOT} [data-testid="klein-scrub-set-b"]`).click();
  await page.locator(`${ROOT} [data-testid="klein-scrub-mode-side"]`).click();
  r.abSide = await observe(page);
  await shot(page, `scrub-${mode}-ab-side`);
  await page.locator(`${ROOT} [data-testid="klein-scrub-mode-wipe"]`).click();
  await dragSlider(page, '[data-testid="klein-scrub-wipe"]', 0.3);
  r.abWipe = await observe(page);
  r.abWipe.clip = await page.locator(`${ROOT} .klein-scrub-pane-b`).evaluate((e) => e.style.clipPath);
  await shot(page, `scrub-${mode}-ab-wipe`);
  await page.locator(ROOT).focus();
  await page.keyboard.press("ArrowLeft");
  r.abFollow = await observe(page);

  // Save the workflow, load it back into a fresh graph: the position, A/B and frames come back without a run.
  await page.locator(`${ROOT} [data-testid="klein-scrub-mode-side"]`).click();
  r.beforeSave = await observe(page);
  const saved = await page.evaluate(() => JSON.stringify(window.app.graph.serialize()));
  const savedNode = JSON.parse(saved).nodes.find((n) => n.type === NODE_TYPE);
  r.savedProps = savedNode?.properties ?? null;
  r.savedWidgetValues = savedNode?.widgets_values ?? [];
  r.widgetNames = await page.evaluate(
    (type) => window.app.graph.nodes.find((n) => n.type === type).widgets.map((w) => w.name),
    NODE_TYPE,
  );
  await page.evaluate(async (saved) => {
    window.app.graph.clear();
    await window.app.loadGraphData(JSON.parse(saved));
  }, saved);
  await markCurrent(page, await page.evaluate(() => String(window.app.graph.nodes.find((n) => n.kleinScrub).id)));
  r.reloaded = await observe(page);
  await shot(page, `scrub-${mode}-reloaded`);

  // The mixer grid node gets the same widget; Up/Down walk scale_a, Left/Right scale_b.
  const mixerId = await addScrubNode(page, MIXER_TYPE);
  await deliver(page, mixerId, mixer);
  r.mixer = { start: await observe(page), keys: [] };
  await page.locator(`${ROOT} [data-testid="klein-scrub-stage"]`).click();
  for (const key of ["ArrowRight", "ArrowUp", "ArrowUp", "ArrowDown"]) {
    await page.keyboard.press(key);
    r.mixer.keys.push({ key, ...(await observe(page)) });
  }
  await shot(page, `scrub-${mode}-mixer`);

  // Large batch.
  const largeId = await addScrubNode(page);
  r.large = await largeBatch(page, largeId, large);
  r.large.observed = await observe(page);
  await shot(page, `scrub-${mode}-large`);

  // Time to show a frame after a slider move: frames never shown before (in either renderer: the browser caches
  // images across the two runs), then the same ones again (cached).
  const shift = mode === "vue" ? 2 : 0;
  r.showMs = await timeFrameShow(
    page,
    [21, 77, 150, 233, 311, 42, 99, 187, 256, 333].map((i) => i + shift),
  );
  r.afterTiming = await observe(page);
  return r;
}

// --- stage 2: the example workflow, run from the page on the tiny model ------------------------------------

// Load the workflow, put the tiny test model, VAE and the fake CLIP loader in place of the real loaders, set the
// widgets given per node type (and any width/height/steps to the small values), and return the scrub node id.
async function prepareWorkflow(page, workflow, widgets, small) {
  const swapped = await loadWithTestClip(page, workflow);
  return page.evaluate(
    async ({ widgets, small, type, swapped }) => {
      const app = window.app;
      const set = (node, name, value) => {
        const widget = node.widgets?.find((w) => w.name === name);
        if (!widget) return false;
        widget.value = value;
        widget.callback?.(value);
        return true;
      };
      const changed = [...swapped];
      for (const node of app.graph.nodes) {
        for (const [name, value] of Object.entries(widgets[node.type] ?? {})) {
          if (set(node, name, value)) changed.push(`${node.type}.${name} = ${JSON.stringify(value)}`);
        }
        for (const [name, value] of Object.entries(small)) {
          const widget = node.widgets?.find((w) => w.name === name);
          if (widget && typeof widget.value === "number" && widget.value > value) {
            set(node, name, value);
            changed.push(`${node.type}.${name} = ${value}`);
          }
        }
      }
      const scrub = app.graph.nodes.find((n) => n.type === type);
      // The scrub node at the top left of the window, at scale 1, so its widget is on screen.
      app.canvas.ds.scale = 1;
      app.canvas.ds.offset = [120 - scrub.pos[0], 80 - scrub.pos[1]];
      app.graph.setDirtyCanvas(true, true);
      return { scrubId: String(scrub.id), changed, types: app.graph.nodes.map((n) => n.type) };
    },
    { widgets, small, type: NODE_TYPE, swapped },
  );
}

// Queue the graph as the Run button does and wait until the scrub node's widget got its result (or an error).
async function queueAndWait(page, scrubId, timeoutMs) {
  await collectExecutionErrors(page);
  const t0 = Date.now();
  await queuePrompt(page);
  await waitFor(
    page,
    (id) => window.app.graph.getNodeById(id)?.kleinScrub?.meta || window.__kleinErrors.length,
    scrubId,
    timeoutMs,
  );
  const errors = await executionErrors(page);
  const meta = await page.evaluate((id) => window.app.graph.getNodeById(id).kleinScrub.meta, scrubId);
  return { runMs: Date.now() - t0, errors, meta };
}

async function workflowScenario(page, spec) {
  const w = {};
  await switchRenderer(page, "classic");
  const prepared = await prepareWorkflow(page, spec.workflow, spec.widgets, spec.small);
  Object.assign(w, prepared);
  const run = await queueAndWait(page, prepared.scrubId, spec.timeoutMs);
  Object.assign(w, run);
  if (!run.meta) return w;
  w.modes = {};
  for (const mode of ["classic", "vue"]) {
    const m = {};
    await switchRenderer(page, mode, [prepared.scrubId]);
    await markCurrent(page, prepared.scrubId);
    m.inVueNode = await page.evaluate(
      ({ id, sel }) => !!document.querySelector(`[data-node-id="${id}"] ${sel}`),
      { id: prepared.scrubId, sel: ROOT },
    );
    m.start = await observe(page);
    await shot(page, `scrub-workflow-${mode}`);
    await dragSlider(page, '[data-testid="klein-scrub-slider"]', 1);
    m.dragEnd = await observe(page);
    await dragSlider(page, '[data-testid="klein-scrub-slider"]', 0);
    m.dragStart = await observe(page);
    await page.locator(`${ROOT} [data-testid="klein-scrub-stage"]`).click();
    m.keys = [];
    for (const key of ["ArrowRight", "ArrowUp", "ArrowUp", "ArrowLeft"]) {
      await page.keyboard.press(key);
      m.keys.push({ key, ...(await observe(page)) });
    }
    await shot(page, `scrub-workflow-${mode}-moved`);
    w.modes[mode] = m;
  }
  // A real page reload: the frontend restores the open workflow, the widget its frame from the node properties.
  w.beforeReload = await observe(page);
  // Reload only once the frontend stored the workflow with the node as it is now (its result, frame and A/B).
  let t0 = Date.now();
  w.persisted = await workflowStored(page, prepared.scrubId, SCRUB_PROPERTIES, RESTORE_TIMEOUT_MS);
  w.persistMs = Date.now() - t0;
  t0 = Date.now();
  await page.reload({ waitUntil: "domcontentloaded" });
  await waitReady(page);
  // The app is ready before it has restored the stored workflow; the widget restores its result in onConfigure.
  w.reloadedFound = await holdsWithin(
    page,
    (type) => !!window.app.graph.nodes.find((n) => n.type === type)?.kleinScrub?.meta,
    NODE_TYPE,
    RESTORE_TIMEOUT_MS,
  );
  w.reloadRestoreMs = Date.now() - t0;
  if (w.reloadedFound) {
    const reloadedId = await page.evaluate(
      (type) => String(window.app.graph.nodes.find((n) => n.type === type).id),
      NODE_TYPE,
    );
    await markCurrent(page, reloadedId);
    w.afterReload = await observe(page);
    await shot(page, "scrub-workflow-reloaded");
  }
  return w;
}

async function main() {
  const { context, page, pageErrors } = await openBrowser(profileDir, { width: 1280, height: 960 });
  const result = { modes: {}, pageErrors };
  try {
    await openFrontend(page, url);
    result.extensions = await page.evaluate(() => window.app.extensions.map((e) => e.name));
    result.nodeTypes = await registeredTypes(page);
    if (result.nodeTypes.length < 2) throw new Error(`the server lacks a node type: has only ${result.nodeTypes}`);
    for (const mode of ["classic", "vue"]) {
      result.modes[mode] = await scenario(page, mode, config);
    }
    if (config.workflow) result.workflow = await workflowScenario(page, config.workflow);
  } catch (err) {
    // The page as it was when a step failed, for the report.
    await page.screenshot({ path: path.join(artifactsDir, "scrub-failure.png") });
    throw err;
  } finally {
    await context.close();
  }
  return result;
}

runDriver(main);
