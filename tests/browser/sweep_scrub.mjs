// Drives the scrubber widget (js/scrubber.js) on a sweep result (a run axis before step and scale), in the classic
// canvas and with Vue nodes, in Debian's Chromium.
// Usage: node sweep_scrub.mjs <server-url> <profile-dir> <artifacts-dir>; the meta comes from the JSON file named by
// $KLEIN_LAB_SWEEP_SCRUB_CONFIG ({meta}). Prints one JSON line of observations per renderer.
import fs from "node:fs";
import path from "node:path";
import { openBrowser, openFrontend, runDriver, switchRenderer, waitFor } from "./comfy_page.mjs";

const [url, profileDir, artifactsDir] = process.argv.slice(2);
const { meta } = JSON.parse(fs.readFileSync(process.env.KLEIN_LAB_SWEEP_SCRUB_CONFIG, "utf8"));
const NODE_TYPE = "KleinLabScrubRun";
const ROOT = '[data-testid="klein-scrub"][data-test-current]';
const SETTLE_TIMEOUT_MS = 30_000; // for the page to reach a state it is heading to (loaded machines are slow)

// An empty graph with one scrub node, its widget marked as the one under test and fully on screen.
async function addScrubNode(page) {
  await page.evaluate(() => window.app.graph.clear());
  // Let the Vue renderer unmount the old nodes first: the new node may get the same id as a removed one.
  await waitFor(page, () => !document.querySelector("[data-node-id]"), null, SETTLE_TIMEOUT_MS);
  const id = await page.evaluate((type) => {
    const app = window.app;
    app.canvas.ds.offset = [80, 40];
    app.canvas.ds.scale = 1;
    const node = window.LiteGraph.createNode(type);
    node.pos = [40, 60];
    app.graph.add(node);
    node.setSize([560, Math.max(620, node.computeSize()[1])]);
    app.graph.setDirtyCanvas(true, true);
    return String(node.id);
  }, NODE_TYPE);
  await page.evaluate((id) => {
    for (const e of document.querySelectorAll("[data-test-current]")) delete e.dataset.testCurrent;
    window.app.graph.getNodeById(id).kleinScrub.root.dataset.testCurrent = "1";
  }, id);
  await page.waitForSelector(ROOT, { state: "attached", timeout: 15_000 });
  // Pan the canvas up until the thumbnail strip (the widget's bottom) is on screen.
  await page.evaluate(() => {
    window.__kleinThumbsBottom = (sel) =>
      document.querySelector(sel).querySelector('[data-testid="klein-scrub-thumbs"]').getBoundingClientRect().bottom;
  });
  for (let i = 0; i < 3; i++) {
    const moved = await page.evaluate((sel) => {
      const bottom = window.__kleinThumbsBottom(sel);
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
      ({ sel, bottom }) => window.__kleinThumbsBottom(sel) < bottom - 0.5,
      { sel: ROOT, bottom: moved },
      SETTLE_TIMEOUT_MS,
    );
  }
  await page.waitForSelector(ROOT, { state: "visible", timeout: 15_000 });
  return id;
}

// The result as the server sends it: an `executed` message through the frontend's api.
async function deliver(page, nodeId) {
  return page.evaluate(
    ({ nodeId, meta }) => {
      const output = { klein_scrub: [meta] };
      const api = window.comfyAPI?.api?.api;
      if (api?.dispatchCustomEvent) {
        api.dispatchCustomEvent("executed", { node: nodeId, display_node: nodeId, output, prompt_id: "sweep-test" });
        return "api";
      }
      window.app.graph.getNodeById(nodeId).onExecuted(output);
      return "onExecuted";
    },
    { nodeId, meta },
  );
}

async function observe(page) {
  return page.evaluate(async (rootSel) => {
    const root = document.querySelector(rootSel);
    const q = (id) => root.querySelector(`[data-testid="${id}"]`);
    // Until the image finished loading (or failed: `complete` either way); at most 30 s on a loaded machine.
    for (const end = performance.now() + 30_000; performance.now() < end; ) {
      const img = q("klein-scrub-image");
      if (!img.getAttribute("src") || img.complete) break;
      await new Promise((r) => setTimeout(r, 50));
    }
    const vis = (e) => !!e && e.offsetParent !== null && !e.hidden;
    return {
      frame: root.dataset.frame === "" ? null : Number(root.dataset.frame),
      label: q("klein-scrub-label").textContent,
      src: q("klein-scrub-image").getAttribute("src"),
      loaded: q("klein-scrub-image").naturalWidth > 0,
      srcB: vis(q("klein-scrub-image-b")) ? q("klein-scrub-image-b").getAttribute("src") : null,
      aLabel: vis(q("klein-scrub-a-label")) ? q("klein-scrub-a-label").textContent : null,
      bLabel: vis(q("klein-scrub-b-label")) ? q("klein-scrub-b-label").textContent : null,
      axisValues: [...root.querySelectorAll('[data-testid="klein-scrub-axis-value"]')].map((e) => e.textContent),
      axisSliders: [...root.querySelectorAll('[data-testid="klein-scrub-axis-slider"]')].map((e) => e.dataset.axis),
    };
  }, ROOT);
}

// Drag a range input's thumb with the mouse from its current value to `fraction` of its track.
async function dragSlider(page, selector, fraction) {
  const slider = page.locator(`${ROOT} ${selector}`).first();
  const box = await slider.boundingBox();
  const { value, max } = await slider.evaluate((e) => ({ value: Number(e.value), max: Number(e.max) }));
  const thumb = 8;
  const xOf = (f) => box.x + thumb + f * (box.width - 2 * thumb);
  const y = box.y + box.height / 2;
  await page.mouse.move(xOf(max ? value / max : 0), y);
  await page.mouse.down();
  await page.mouse.move(xOf(fraction), y, { steps: 8 });
  await page.mouse.up();
}

const RUN_SLIDER = '[data-testid="klein-scrub-axis-slider"][data-axis="run"]';
const STEP_SLIDER = '[data-testid="klein-scrub-axis-slider"][data-axis="step"]';

async function scenario(page, mode) {
  const r = { mode };
  await switchRenderer(page, mode);
  const nodeId = await addScrubNode(page);
  r.inVueNode = await page.evaluate(
    ({ id, sel }) => !!document.querySelector(`[data-node-id="${id}"] ${sel}`),
    { id: nodeId, sel: ROOT },
  );
  r.delivered = await deliver(page, nodeId);
  r.initial = await observe(page);
  // The run axis with the mouse: to the last run, then the middle one; the step slider keeps the run.
  await dragSlider(page, RUN_SLIDER, 1);
  r.runEnd = await observe(page);
  await dragSlider(page, RUN_SLIDER, 0.5);
  r.runMid = await observe(page);
  await dragSlider(page, STEP_SLIDER, 1);
  r.stepEnd = await observe(page);
  await page.screenshot({ path: path.join(artifactsDir, `sweep-scrub-${mode}.png`) });
  // A/B across runs: A on the first run, B on the last run, side by side.
  await dragSlider(page, RUN_SLIDER, 0);
  await page.locator(`${ROOT} [data-testid="klein-scrub-set-a"]`).click();
  await dragSlider(page, RUN_SLIDER, 1);
  await page.locator(`${ROOT} [data-testid="klein-scrub-set-b"]`).click();
  await page.locator(`${ROOT} [data-testid="klein-scrub-mode-side"]`).click();
  r.abRuns = await observe(page);
  await page.screenshot({ path: path.join(artifactsDir, `sweep-scrub-${mode}-ab.png`) });
  return r;
}

async function main() {
  const { context, page, pageErrors } = await openBrowser(profileDir, { width: 1280, height: 960 });
  const result = { modes: {}, pageErrors };
  try {
    await openFrontend(page, url);
    for (const mode of ["classic", "vue"]) result.modes[mode] = await scenario(page, mode);
  } catch (err) {
    await page.screenshot({ path: path.join(artifactsDir, "sweep-scrub-failure.png") });
    throw err;
  } finally {
    await context.close();
  }
  return result;
}

runDriver(main);
