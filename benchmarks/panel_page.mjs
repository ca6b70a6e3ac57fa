// A headless page on the style workflow, its Train node's run name set to the run the benchmark queues: the training
// panel follows that run as an artist's open tab would. Used by benchmarks/panel_cost.py (never a test).
// Usage: node benchmarks/panel_page.mjs <server-url> <profile-dir> <run-name> <workflow.json>
// Prints {"ready": true, "clientId": ...} once the panel is on screen, then waits for a line on stdin (the run has
// ended) and prints {"frames": {type: [count, bytes]}, "panel": {...}}: every websocket frame the page received.
import fs from "node:fs";
import readline from "node:readline";
import { openBrowser, openFrontend } from "../tests/browser/comfy_page.mjs";

const [url, profileDir, run, workflowPath] = process.argv.slice(2);
const ROOT = '[data-testid="klein-panel"]';

async function main() {
  const { context, page, pageErrors } = await openBrowser(profileDir, { width: 1400, height: 1000 });
  const frames = {};
  const count = (type, bytes) => {
    const entry = (frames[type] ??= [0, 0]);
    entry[0] += 1;
    entry[1] += bytes;
  };
  page.on("websocket", (ws) => {
    ws.on("framereceived", ({ payload }) => {
      if (typeof payload !== "string") return count("(binary: node text or preview)", payload.length);
      let type = "(unparsed)";
      try {
        type = JSON.parse(payload).type ?? type;
      } catch {
        // not JSON: counted under (unparsed)
      }
      count(type, Buffer.byteLength(payload));
    });
  });
  try {
    await openFrontend(page, url);
    const workflow = JSON.parse(fs.readFileSync(workflowPath, "utf8"));
    const clientId = await page.evaluate(
      async ({ workflow, run }) => {
        const app = window.app;
        await app.loadGraphData(structuredClone(workflow));
        const train = app.graph.nodes.find((n) => n.type === "KleinLabTrainLora");
        const widget = train.widgets.find((w) => w.name === "run_name");
        widget.value = run;
        widget.callback?.(run);
        app.canvas.ds.scale = 1;
        app.canvas.ds.offset = [90 - train.pos[0], 20 - train.pos[1]];
        app.graph.setDirtyCanvas(true, true);
        const api = window.comfyAPI.api.api;
        for (let i = 0; i < 100 && !api.clientId; i++) await new Promise((r) => setTimeout(r, 100));
        return api.clientId;
      },
      { workflow, run },
    );
    await page.waitForSelector(ROOT, { timeout: 60_000 });
    console.log(JSON.stringify({ ready: true, clientId }));
    const input = readline.createInterface({ input: process.stdin });
    await new Promise((resolve) => input.once("line", resolve));
    input.close();
    await page.waitForTimeout(500); // the last events of the run
    const panel = await page.evaluate((sel) => {
      const root = document.querySelector(sel);
      return { status: root?.dataset.status, points: Number(root?.dataset.points ?? 0), run: root?.dataset.run };
    }, ROOT);
    console.log(JSON.stringify({ frames, panel, pageErrors }));
  } finally {
    await context.close();
  }
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
