// Drives the real ComfyUI frontend in Debian's Chromium (playwright-core, no downloaded browsers).
// Usage: node drive.mjs <server-url> <profile-dir> <artifacts-dir>
// Prints one JSON line: {modes: {classic: {...}, vue: {...}}, pageErrors: [...]}; pytest asserts on it.
import path from "node:path";
import { openBrowser, openFrontend, runDriver, switchRenderer } from "./comfy_page.mjs";

const [url, profileDir, artifactsDir] = process.argv.slice(2);

// Adds one KleinLabModelInfo node through LiteGraph and reports what the graph and the DOM show for it.
async function addModelInfoNode(page, mode) {
  return page.evaluate(async (mode) => {
    const app = window.app;
    app.graph.clear(); // an empty canvas: the screenshot shows our node alone
    const before = app.graph.nodes.length;
    const node = window.LiteGraph.createNode("KleinLabModelInfo");
    if (!node) return { created: false };
    node.pos = [120, 120];
    app.graph.add(node);
    app.graph.setDirtyCanvas(true, true);
    // Vue nodes render asynchronously: wait for the node's DOM element (at most 30 s on a loaded machine).
    let domNode = null;
    for (const end = performance.now() + 30_000; mode === "vue" && !domNode && performance.now() < end; ) {
      await new Promise((r) => setTimeout(r, 100));
      domNode = document.querySelector(`[data-node-id="${node.id}"]`);
    }
    return {
      created: true,
      type: node.type,
      title: node.title,
      inputs: (node.inputs || []).map((i) => i.type),
      outputs: (node.outputs || []).map((o) => o.type),
      added: app.graph.nodes.length - before,
      vueNodesSetting: app.extensionManager.setting.get("Comfy.VueNodes.Enabled"),
      domNodeText: domNode ? domNode.textContent : null,
    };
  }, mode);
}

async function main() {
  const { context, page, pageErrors } = await openBrowser(profileDir, { width: 1280, height: 800 });
  const result = { modes: {}, pageErrors };
  try {
    await openFrontend(page, url);
    result.extensions = await page.evaluate(() => window.app.extensions.map((e) => e.name));
    for (const mode of ["classic", "vue"]) {
      await switchRenderer(page, mode);
      result.modes[mode] = await addModelInfoNode(page, mode);
      await page.screenshot({ path: path.join(artifactsDir, `frontend-${mode}.png`) });
    }
  } finally {
    await context.close();
  }
  return result;
}

runDriver(main);
