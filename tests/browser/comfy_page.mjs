// How every browser driver opens the real ComfyUI frontend: Debian's Chromium through playwright-core (never a
// downloaded browser), the flags of DESIGN.md §8, a fresh persistent profile, page and console errors collected.
import { chromium, errors } from "playwright-core";

const CHROMIUM = process.env.KLEIN_LAB_CHROMIUM || "/usr/bin/chromium";
const FLAGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];
const READY_TIMEOUT_MS = 120_000;

// Launches Chromium on `profileDir` with one page whose errors (and console errors) go into `pageErrors`.
export async function openBrowser(profileDir, viewport) {
  const context = await chromium.launchPersistentContext(profileDir, {
    executablePath: CHROMIUM,
    headless: true,
    args: FLAGS,
    viewport,
  });
  const pageErrors = [];
  const page = context.pages()[0] || (await context.newPage());
  page.on("pageerror", (err) => pageErrors.push(String(err)));
  page.on("console", (msg) => {
    if (msg.type() === "error") pageErrors.push(`console: ${msg.text()}`);
  });
  return { context, page, pageErrors };
}

// Waits until the frontend has its app, graph and active workflow (widgets of a loaded workflow come later).
export async function waitReady(page) {
  await page.waitForFunction(
    () => window.app?.vueAppReady && window.app.graph && window.app.extensionManager?.workflow?.activeWorkflow,
    null,
    { timeout: READY_TIMEOUT_MS },
  );
}

// Opens the frontend at `url` and waits until it is ready.
export async function openFrontend(page, url) {
  await page.goto(url, { waitUntil: "domcontentloaded" });
  await waitReady(page);
}

// Switches between the classic canvas and Vue nodes and waits until the new renderer draws the graph: with Vue
// nodes the nodes `ids` (all the graph's by default) have their DOM element ([data-node-id]), on the classic canvas
// no node of the graph has one.
export async function switchRenderer(page, mode, ids = null, timeout = 30_000) {
  const vue = mode === "vue";
  await page.evaluate(async (vue) => {
    await window.app.extensionManager.setting.set("Comfy.VueNodes.Enabled", vue);
  }, vue);
  await waitFor(
    page,
    ({ vue, ids }) => {
      const drawn = (id) => !!document.querySelector(`[data-node-id="${id}"]`);
      const all = window.app.graph.nodes.map((n) => String(n.id));
      if (window.app.extensionManager.setting.get("Comfy.VueNodes.Enabled") !== vue) return false;
      return vue ? (ids ?? all).every(drawn) : !all.some(drawn);
    },
    { vue, ids },
    timeout,
  );
}

// Queues the open workflow as the Run button does.
export async function queuePrompt(page) {
  await page.evaluate(() => window.app.extensionManager.command.execute("Comfy.QueuePrompt"));
}

// Waits until `predicate(arg)` holds in the page (polled every 250 ms).
export async function waitFor(page, predicate, arg, timeout) {
  await page.waitForFunction(predicate, arg, { timeout, polling: 250 });
}

// Like waitFor, but a timeout is an answer, not an error: true once `predicate(arg)` holds, false if it did not
// within `timeout` ms (the driver reports it and the test names what did not happen).
export async function holdsWithin(page, predicate, arg, timeout) {
  try {
    await waitFor(page, predicate, arg, timeout);
    return true;
  } catch (err) {
    if (err instanceof errors.TimeoutError) return false;
    throw err;
  }
}

// The frontend stores the open workflow (a draft in localStorage) a moment after the graph changed, and a page
// reload restores that draft: reloading before it is stored restores an older state. True once a stored graph holds
// node `nodeId` as it is now (its type, its widgets' values and the `properties` named), false if none did within
// `timeout` ms. Earlier graphs of the page may be stored too, with a node of the same id.
export async function workflowStored(page, nodeId, properties = [], timeout = 60_000) {
  return holdsWithin(
    page,
    ({ nodeId, properties }) => {
      const key = (n) => JSON.stringify([n.type, n.widgets_values ?? [], properties.map((p) => n.properties?.[p])]);
      const graph = window.app.graph;
      const want = key((graph.getNodeById(nodeId) ?? graph.getNodeById(Number(nodeId))).serialize());
      for (let i = 0; i < localStorage.length; i++) {
        const raw = localStorage.getItem(localStorage.key(i));
        if (!raw?.startsWith("{")) continue;
        const value = JSON.parse(raw);
        const graph = typeof value.data === "string" && value.data.startsWith("{") ? JSON.parse(value.data) : value;
        if (graph.nodes?.some?.((n) => String(n.id) === String(nodeId) && key(n) === want)) return true;
      }
      return false;
    },
    { nodeId, properties },
    timeout,
  );
}

// Resolves after the page painted a frame (two animation frames: the DOM changes made before it are on screen).
export async function nextPaint(page) {
  await page.evaluate(() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r))));
}

// From now on the page keeps the execution_error events of its prompts in window.__kleinErrors (a predicate of
// waitFor can stop on them); executionErrors reads them back as JSON text.
export async function collectExecutionErrors(page) {
  await page.evaluate(() => {
    window.__kleinErrors = [];
    const api = window.comfyAPI?.api?.api;
    api?.addEventListener("execution_error", (e) => window.__kleinErrors.push(e.detail));
  });
}

export async function executionErrors(page) {
  return page.evaluate(() => (window.__kleinErrors ?? []).map((e) => JSON.stringify(e).slice(0, 2000)));
}

// Loads `workflow` with ComfyUI's CLIPLoader nodes swapped for the pack's test CLIP loader (no tiny text encoder
// exists: KleinLabTestCLIPLoader returns ComfyUI's CLIP interface), wired to the same inputs. Returns one line per
// swap, e.g. "CLIPLoader 3 -> KleinLabTestCLIPLoader 12 (2 links)".
export async function loadWithTestClip(page, workflow) {
  return page.evaluate(async (workflow) => {
    const app = window.app;
    await app.loadGraphData(structuredClone(workflow));
    const swapped = [];
    for (const node of app.graph.nodes.filter((n) => n.type === "CLIPLoader")) {
      const fake = window.LiteGraph.createNode("KleinLabTestCLIPLoader");
      fake.pos = [...node.pos];
      app.graph.add(fake);
      const targets = (node.outputs[0].links ?? []).map((id) => {
        const link = app.graph.links instanceof Map ? app.graph.links.get(id) : app.graph.links[id];
        return [app.graph.getNodeById(link.target_id), link.target_slot];
      });
      app.graph.remove(node);
      for (const [target, slot] of targets) fake.connect(0, target, slot);
      swapped.push(`CLIPLoader ${node.id} -> KleinLabTestCLIPLoader ${fake.id} (${targets.length} links)`);
    }
    return swapped;
  }, workflow);
}

// Loads `workflow` (the style workflow, "Klein 01 - Train a style LoRA") ready for a test server: the test CLIP
// loader in place of ComfyUI's (loadWithTestClip), the node types in `remove` taken out, the
// `widgets` ({node type: {widget: value}}) set with the album folder and the Train node's run name; the nodes to the
// right of the Train node moved `shiftRight` further right (room for its panel), and the canvas at `scale` with the
// Train node's corner at `corner` in the window. Returns the ids of the Train and Encode Dataset nodes as strings.
export async function prepareStyleWorkflow(page, { workflow, album, run, widgets, remove, shiftRight, scale, corner }) {
  await loadWithTestClip(page, workflow);
  return page.evaluate(
    async ({ album, run, widgets, remove, shiftRight, scale, corner }) => {
      const app = window.app;
      const set = (node, name, value) => {
        const widget = node.widgets?.find((w) => w.name === name);
        if (!widget) throw new Error(`${node.type} has no widget ${name}`);
        widget.value = value;
        widget.callback?.(value);
      };
      for (const node of app.graph.nodes.filter((n) => remove.includes(n.type))) app.graph.remove(node);
      for (const node of app.graph.nodes) {
        for (const [name, value] of Object.entries(widgets[node.type] ?? {})) set(node, name, value);
        if (node.type === "KleinLabDatasetFolder") set(node, "folder", album);
        if (node.type === "KleinLabTrainLora") set(node, "run_name", run);
      }
      const train = app.graph.nodes.find((n) => n.type === "KleinLabTrainLora");
      const encode = app.graph.nodes.find((n) => n.type === "KleinLabEncodeDataset");
      for (const node of app.graph.nodes) {
        if (node !== train && node.pos[0] >= train.pos[0]) node.pos = [train.pos[0] + shiftRight, node.pos[1]];
      }
      app.canvas.ds.scale = scale;
      app.canvas.ds.offset = [corner[0] - train.pos[0], corner[1] - train.pos[1]];
      app.graph.setDirtyCanvas(true, true);
      return { train: String(train.id), encode: encode ? String(encode.id) : null };
    },
    { album, run, widgets, remove, shiftRight, scale, corner },
  );
}

// Runs a driver's `main()`, which resolves to its result: prints the result as one JSON line (what
// tests/harness/browser.py reads); an error is printed and ends the process with exit code 1.
export function runDriver(main) {
  main()
    .then((result) => console.log(JSON.stringify(result)))
    .catch((err) => {
      console.error(err);
      process.exit(1);
    });
}
