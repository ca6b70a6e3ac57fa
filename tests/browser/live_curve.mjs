// Drives the live pieces of a training run in the real ComfyUI frontend, classic canvas and Vue nodes:
// - the Loss Curve node (js/loss_curve_live.js) follows a run while it trains: the style workflow with the tiny
//   model, the random VAE and the fake CLIP loader is queued from the page with a Loss Curve node set to the
//   run's name (muted, as in the "watch a run" workflow); its live chart's point count grows during the run and
//   it ends with the run's status after Stop & keep;
// - the Encode Dataset node's phase events: the training panel's status shows 'encoding i/N' while the album
//   encodes (every status text the panel shows is recorded by a MutationObserver).
// Usage: node live_curve.mjs <server-url> <profile-dir> <artifacts-dir>; $KLEIN_LAB_LIVE_CONFIG names a JSON file
// {workflow, albums: {classic, vue}, runs: {classic, vue}, widgets, timeoutMs}. Prints one JSON line.
import fs from "node:fs";
import path from "node:path";
import {
  openBrowser,
  openFrontend,
  prepareStyleWorkflow,
  runDriver,
  switchRenderer,
  waitFor,
} from "./comfy_page.mjs";

const [url, profileDir, artifactsDir] = process.argv.slice(2);
const config = JSON.parse(fs.readFileSync(process.env.KLEIN_LAB_LIVE_CONFIG, "utf8"));
const CURVE = '[data-testid="klein-curve"]';
const PANEL = '[data-testid="klein-panel"]';

// The style workflow with the test loaders, small sizes and a muted Loss Curve node on the run; returns ids.
async function prepare(page, album, run) {
  const remove = ["MarkdownNote", "PreviewAny", "PreviewImage"];
  const { workflow, widgets } = config;
  const layout = { shiftRight: 1400, scale: 0.8, corner: [60, 40] };
  const ids = await prepareStyleWorkflow(page, { workflow, album, run, widgets, remove, ...layout });
  const curve = await page.evaluate(
    ({ train, run }) => {
      const app = window.app;
      const node = app.graph.getNodeById(Number(train));
      const curve = window.LiteGraph.createNode("KleinLabLossCurve");
      curve.pos = [node.pos[0] + (node.size?.[0] ?? 560) + 30, node.pos[1]];
      app.graph.add(curve);
      const widget = curve.widgets.find((w) => w.name === "run");
      widget.value = run;
      widget.callback?.(run);
      curve.mode = 2; // muted: the Train node's own chart is the picture of this prompt; the curve follows live
      app.graph.setDirtyCanvas(true, true);
      return String(curve.id);
    },
    { train: ids.train, run },
  );
  return { ...ids, curve };
}

// Records the encoding phase events and every status text the panel shows, from now on.
async function record(page) {
  await page.evaluate(
    async ([panelSel]) => {
      window.__kleinEncoding = [];
      window.__kleinStatuses = [];
      if (!window.__kleinEncodingHooked) {
        window.__kleinEncodingHooked = true;
        const { api } = await import("/scripts/api.js");
        api.addEventListener("klein_lab.train.phase", ({ detail }) => {
          if (detail.phase === "encoding") window.__kleinEncoding.push({ ...detail, t: performance.now() });
        });
      }
      const status = document.querySelector(`${panelSel} [data-testid="klein-panel-status"]`);
      window.__kleinObserver?.disconnect();
      window.__kleinObserver = new MutationObserver(() => {
        const text = status.textContent;
        if (window.__kleinStatuses.at(-1) !== text) window.__kleinStatuses.push(text);
      });
      window.__kleinObserver.observe(status, { childList: true, subtree: true, characterData: true });
    },
    [PANEL],
  );
}

async function curveState(page) {
  return page.evaluate((sel) => {
    const root = document.querySelector(sel);
    if (!root) return null;
    return {
      visible: !root.hidden && root.getBoundingClientRect().height > 50,
      points: Number(root.dataset.points ?? 0),
      chartPoints: Number(root.querySelector("canvas").dataset.points ?? 0),
      status: root.dataset.status,
      step: Number(root.dataset.step ?? 0),
      run: root.dataset.run,
      text: root.querySelector('[data-testid="klein-curve-status"]').textContent,
      inVueNode: !!root.closest("[data-node-id]"),
    };
  }, CURVE);
}

async function scenario(page, mode) {
  const r = {};
  await switchRenderer(page, mode);
  const ids = await prepare(page, config.albums[mode], config.runs[mode]);
  r.ids = ids;
  // The new nodes' widgets in the page (with Vue nodes inside their node): the curve and the panel's status line.
  await waitFor(
    page,
    ({ sels, vue }) =>
      sels.every((sel) => {
        const e = document.querySelector(sel);
        return !!e && (!vue || !!e.closest("[data-node-id]"));
      }),
    { sels: [CURVE, `${PANEL} [data-testid="klein-panel-status"]`], vue: mode === "vue" },
    30_000,
  );
  await record(page);
  r.before = await curveState(page);
  await page.evaluate(() => window.app.extensionManager.command.execute("Comfy.QueuePrompt"));
  const pointsAtLeast = ([sel, n]) => Number(document.querySelector(sel)?.dataset.points ?? 0) >= n;
  await page.waitForFunction(pointsAtLeast, [CURVE, 3], { timeout: config.timeoutMs, polling: 200 });
  r.early = await curveState(page);
  await page.screenshot({ path: path.join(artifactsDir, `live-curve-${mode}-page.png`) });
  await page.waitForFunction(pointsAtLeast, [CURVE, r.early.points + 5], { timeout: config.timeoutMs, polling: 200 });
  r.later = await curveState(page);
  await page.locator('[data-testid="klein-panel-stop"]').click();
  await page.waitForFunction((sel) => document.querySelector(sel)?.dataset.status === "stopped", CURVE, {
    timeout: config.timeoutMs,
    polling: 200,
  });
  r.stopped = await curveState(page);
  await page.locator(CURVE).screenshot({ path: path.join(artifactsDir, `live-curve-${mode}.png`) });
  r.encoding = await page.evaluate(() => window.__kleinEncoding);
  r.statuses = await page.evaluate(() => window.__kleinStatuses);
  return r;
}

async function main() {
  const { context, page, pageErrors } = await openBrowser(profileDir, { width: 1500, height: 950 });
  const result = { modes: {}, pageErrors };
  try {
    await openFrontend(page, url);
    result.extensions = await page.evaluate(() => window.app.extensions.map((e) => e.name));
    for (const mode of ["classic", "vue"]) result.modes[mode] = await scenario(page, mode);
  } finally {
    await context.close();
  }
  return result;
}

runDriver(main);
