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
import { openBrowser, openFrontend } from "./comfy_page.mjs";

const [url, profileDir, artifactsDir] = process.argv.slice(2);
const config = JSON.parse(fs.readFileSync(process.env.KLEIN_LAB_LIVE_CONFIG, "utf8"));
const CURVE = '[data-testid="klein-curve"]';
const PANEL = '[data-testid="klein-panel"]';

async function setRenderer(page, mode) {
  await page.evaluate(async (vue) => {
    await window.app.extensionManager.setting.set("Comfy.VueNodes.Enabled", vue);
  }, mode === "vue");
  await page.waitForTimeout(400);
}

// The style workflow with the test loaders, small sizes and a muted Loss Curve node on the run; returns ids.
async function prepare(page, album, run) {
  return page.evaluate(
    async ({ workflow, album, run, widgets }) => {
      const app = window.app;
      await app.loadGraphData(structuredClone(workflow));
      const set = (node, name, value) => {
        const widget = node.widgets?.find((w) => w.name === name);
        if (!widget) throw new Error(`${node.type} has no widget ${name}`);
        widget.value = value;
        widget.callback?.(value);
      };
      for (const node of [...app.graph.nodes]) {
        if (node.type === "CLIPLoader") {
          const fake = window.LiteGraph.createNode("KleinLabTestCLIPLoader");
          fake.pos = [...node.pos];
          app.graph.add(fake);
          const targets = (node.outputs[0].links ?? []).map((id) => {
            const link = app.graph.links instanceof Map ? app.graph.links.get(id) : app.graph.links[id];
            return [app.graph.getNodeById(link.target_id), link.target_slot];
          });
          app.graph.remove(node);
          for (const [target, slot] of targets) fake.connect(0, target, slot);
        } else if (node.type === "MarkdownNote" || node.type === "PreviewAny" || node.type === "PreviewImage") {
          app.graph.remove(node);
        }
      }
      for (const node of app.graph.nodes) {
        for (const [name, value] of Object.entries(widgets[node.type] ?? {})) set(node, name, value);
        if (node.type === "KleinLabDatasetFolder") set(node, "folder", album);
        if (node.type === "KleinLabTrainLora") set(node, "run_name", run);
      }
      const train = app.graph.nodes.find((n) => n.type === "KleinLabTrainLora");
      const encode = app.graph.nodes.find((n) => n.type === "KleinLabEncodeDataset");
      for (const node of app.graph.nodes) {
        if (node !== train && node.pos[0] >= train.pos[0]) node.pos = [train.pos[0] + 1400, node.pos[1]];
      }
      const curve = window.LiteGraph.createNode("KleinLabLossCurve");
      curve.pos = [train.pos[0] + (train.size?.[0] ?? 560) + 30, train.pos[1]];
      app.graph.add(curve);
      set(curve, "run", run);
      curve.mode = 2; // muted: the Train node's own chart is the picture of this prompt; the curve follows live
      app.canvas.ds.scale = 0.8;
      app.canvas.ds.offset = [60 - train.pos[0], 40 - train.pos[1]];
      app.graph.setDirtyCanvas(true, true);
      return { train: String(train.id), encode: String(encode.id), curve: String(curve.id) };
    },
    { workflow: config.workflow, album, run, widgets: config.widgets },
  );
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
  await setRenderer(page, mode);
  const ids = await prepare(page, config.albums[mode], config.runs[mode]);
  r.ids = ids;
  await page.waitForTimeout(500);
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
  console.log(JSON.stringify(result));
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
