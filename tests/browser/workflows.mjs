// Loads every workflow the server serves as this pack's templates into the real ComfyUI frontend (Debian's
// Chromium through playwright-core), in the classic canvas and with Vue nodes, and reports per workflow:
// node types the frontend does not know, links that do not match their slots, the API prompt the frontend
// itself builds (app.graphToPrompt) and a screenshot.
// Usage: node workflows.mjs <server-url> <profile-dir> <artifacts-dir>
// Prints one JSON line: {pack, modes: {classic: {<name>: report}, vue: {...}}, pageErrors}.
import path from "node:path";
import { nextPaint, openBrowser, openFrontend, runDriver, switchRenderer } from "./comfy_page.mjs";

const [url, profileDir, artifactsDir] = process.argv.slice(2);
const PACK = process.env.KLEIN_LAB_PACK_DIR || "klein_lora_lab";

// Loads one workflow and inspects the graph the frontend built from it.
async function inspectWorkflow(page, workflow, mode) {
  return page.evaluate(
    async ({ workflow, mode }) => {
      const app = window.app;
      const LG = window.LiteGraph;
      await app.loadGraphData(structuredClone(workflow), true, false);
      await app.extensionManager.command.execute("Comfy.Canvas.FitView");
      app.graph.setDirtyCanvas(true, true);
      const nodes = app.graph.nodes;
      const byId = new Map(nodes.map((n) => [String(n.id), n]));
      const missing = nodes.filter((n) => !LG.registered_node_types[n.type]).map((n) => n.type);
      const links = app.graph.links instanceof Map ? [...app.graph.links.values()] : Object.values(app.graph.links);
      const badLinks = [];
      for (const link of links) {
        if (!link) continue;
        const src = byId.get(String(link.origin_id));
        const dst = byId.get(String(link.target_id));
        const out = src?.outputs?.[link.origin_slot];
        const inp = dst?.inputs?.[link.target_slot];
        const problems = [];
        if (!out) problems.push("no origin slot");
        if (!inp) problems.push("no target slot");
        if (out && !(out.links || []).includes(link.id)) problems.push("origin slot does not list the link");
        if (inp && inp.link !== link.id) problems.push("target slot holds another link");
        if (out && inp && !LG.isValidConnection(out.type, inp.type)) problems.push(`type ${out.type} -> ${inp.type}`);
        if (problems.length) badLinks.push({ id: link.id, problems });
      }
      let domNodes = null;
      if (mode === "vue") {
        // Vue nodes render asynchronously; wait until every graph node has its DOM node (or give up after 30 s,
        // long enough for a loaded machine: the count then tells the test which nodes never showed).
        for (const end = performance.now() + 30_000; ; ) {
          domNodes = nodes.filter((n) => document.querySelector(`[data-node-id="${n.id}"]`)).length;
          if (domNodes === nodes.length || performance.now() > end) break;
          await new Promise((r) => requestAnimationFrame(r));
        }
      }
      const { output } = await app.graphToPrompt();
      return {
        nodeCount: nodes.length,
        linkCount: links.filter(Boolean).length,
        missingTypes: missing,
        badLinks,
        domNodes,
        prompt: output,
      };
    },
    { workflow, mode },
  );
}

async function main() {
  const { context, page, pageErrors } = await openBrowser(profileDir, { width: 1920, height: 1080 });
  const result = { pack: PACK, templates: [], modes: {}, pageErrors };
  try {
    await openFrontend(page, url);
    // The workflows exactly as ComfyUI serves them to users (the pack's templates).
    const templates = await page.evaluate(async (pack) => {
      const list = await (await fetch("/api/workflow_templates")).json();
      const names = list[pack] || [];
      const out = {};
      for (const name of names) {
        out[name] = await (await fetch(`/api/workflow_templates/${pack}/${encodeURIComponent(name)}.json`)).json();
      }
      return out;
    }, PACK);
    result.templates = Object.keys(templates);
    // Full-detail drawing at any zoom, so the screenshots of a fitted workflow show titles and widgets.
    // and no minimap over the corner of the graph.
    await page.evaluate(async () => {
      await window.app.extensionManager.setting.set("LiteGraph.Canvas.MinFontSizeForLOD", 0);
      await window.app.extensionManager.setting.set("Comfy.Minimap.Visible", false);
    });
    for (const mode of ["classic", "vue"]) {
      await switchRenderer(page, mode);
      result.modes[mode] = {};
      for (const [name, workflow] of Object.entries(templates)) {
        const report = await inspectWorkflow(page, workflow, mode);
        await nextPaint(page); // the fitted view drawn
        report.screenshot = path.join(artifactsDir, `workflow-${name}-${mode}.png`);
        await page.screenshot({ path: report.screenshot });
        result.modes[mode][name] = report;
      }
    }
  } finally {
    await context.close();
  }
  return result;
}

runDriver(main);
