// Opens every template of this pack the way an artist does, in a 1920x1080 window at the frontend's default
// settings (low-detail rendering on). Two passes (KLEIN_LAB_TEMPLATES_PASS):
// - "open" (default): in the classic canvas each template is opened from the templates dialog (Comfy.BrowseTemplates,
//   a "Klein" search, a click on its card); with Vue nodes through the call the card makes. Per template and mode:
//   the zoom it opened at and whether the canvas drew in low detail, the zoom of its saved view (the file loaded as
//   a dragged-in workflow), the nodes drawn red and what they hold, the error notice, and screenshots.
// - "dialog": the dialog's cards for the search (title, description, thumbnail loaded) and a screenshot.
// Usage: node templates.mjs <server-url> <profile-dir> <artifacts-dir>
// Prints one JSON line: {pack, cards, templates, modes: {classic: {<name>: report}, vue: {...}}, pageErrors}.
import path from "node:path";
import { nextPaint, openBrowser, openFrontend, runDriver, switchRenderer, waitFor } from "./comfy_page.mjs";

const [url, profileDir, artifactsDir] = process.argv.slice(2);
const PACK = process.env.KLEIN_LAB_PACK_DIR || "klein_lora_lab";
const SEARCH = "Klein";
// After a template opened (its nodes in the graph), the frontend checks its models against the server and marks
// nodes red and shows a notice, with nothing on the page saying the check is over: the test looks for red nodes
// that should not be, so this much time passes before the page is read (an absence is checked by waiting).
const CHECKS_MS = 2500;
const SETTLE_TIMEOUT_MS = 60_000; // for the page to reach a state it is heading to (loaded machines are slow)
const SHOT = { timeout: 180_000 };

// Opens the templates dialog, searches SEARCH and waits until the cards of the pack's `names` are shown.
async function openDialogAndSearch(page, names) {
  await page.evaluate(() => window.app.extensionManager.command.execute("Comfy.BrowseTemplates"));
  const search = page.getByPlaceholder("Search ...").first();
  await search.waitFor({ timeout: 120_000 });
  await search.fill(SEARCH);
  await waitFor(
    page,
    (names) => names.every((name) => document.querySelector(`[data-testid="template-workflow-${CSS.escape(name)}"]`)),
    names,
    SETTLE_TIMEOUT_MS,
  );
}

// The cards the dialog shows for the search, with their title, description and whether the thumbnail loaded.
async function readCards(page, names) {
  return page.evaluate(async ({ names, pack }) => {
    const out = {};
    for (const name of names) {
      const card = document.querySelector(`[data-testid="template-workflow-${CSS.escape(name)}"]`);
      if (!card) continue;
      card.scrollIntoView();
      const img = card.querySelector("img");
      // Until the thumbnail loaded (at most 30 s on a loaded machine).
      for (const end = performance.now() + 30_000; img && !(img.complete && img.naturalWidth) && performance.now() < end; ) {
        await new Promise((r) => setTimeout(r, 100));
      }
      // What the card asks for (the frontend builds <pack>/<name>.jpg for a pack's template).
      const thumb = await fetch(`/api/workflow_templates/${pack}/${encodeURIComponent(name)}.jpg`);
      out[name] = {
        text: card.innerText,
        thumbnailStatus: thumb.status,
        thumbnailType: thumb.headers.get("content-type"),
        thumbnail: img ? img.currentSrc || img.src : null,
        thumbnailLoaded: Boolean(img && img.complete && img.naturalWidth > 0),
      };
    }
    return out;
  }, { names, pack: PACK });
}

// What the artist sees after opening: zoom, low detail, red nodes (with their file choices), the error notice.
async function inspect(page) {
  return page.evaluate(() => {
    const app = window.app;
    const red = app.graph.nodes
      .filter((n) => n.has_errors)
      .map((n) => ({
        id: String(n.id),
        type: n.type,
        values: (n.widgets || []).map((w) => w.value),
        models: n.properties?.models || [],
      }));
    const notices = [...document.querySelectorAll(".p-toast-message, [role=alert]")].map((e) => e.innerText.trim());
    return {
      scale: app.canvas.ds.scale,
      lowQuality: Boolean(app.canvas.low_quality),
      red,
      notices: notices.filter(Boolean),
      workflow: app.extensionManager.workflow.activeWorkflow?.filename ?? null,
      nodeCount: app.graph.nodes.length,
    };
  });
}

// Opens a template the way the dialog does: a click on its card after the search (classic canvas), or the
// same frontend call the card makes (app.loadGraphData with openSource "template") where `viaDialog` is false.
async function openTemplate(page, name, viaDialog, nodes) {
  // Mark the nodes shown now: the opened template's nodes are new ones.
  await page.evaluate(() => {
    for (const node of window.app.graph.nodes) node.kleinTestStale = true;
  });
  if (viaDialog) {
    await openDialogAndSearch(page, [name]);
    const card = page.locator(`[data-testid="template-workflow-${name}"]`);
    // The result grid re-renders while the search settles: a card can be replaced between finding and clicking.
    for (let attempt = 1; ; attempt++) {
      try {
        await card.waitFor({ timeout: 60_000 });
        await card.click({ timeout: 60_000, force: true });
        break;
      } catch (err) {
        if (attempt === 5) throw err;
        await page.waitForTimeout(1000); // a pause before trying again: the grid is re-rendering, nothing to wait on
      }
    }
  } else {
    await page.evaluate(async ({ pack, name }) => {
      const res = await fetch(`/api/workflow_templates/${pack}/${encodeURIComponent(name)}.json`);
      await window.app.loadGraphData(await res.json(), true, true, name, { openSource: "template" });
    }, { pack: PACK, name });
  }
  // The graph holds the template's nodes (new ones, its ids and types), drawn; then the model checks get their time.
  await waitFor(
    page,
    (nodes) => {
      const now = window.app.graph.nodes;
      return !now.some((n) => n.kleinTestStale) && JSON.stringify(now.map((n) => [String(n.id), n.type]).sort()) === nodes;
    },
    nodes,
    SETTLE_TIMEOUT_MS,
  );
  await nextPaint(page);
  await page.waitForTimeout(CHECKS_MS);
}

async function dialogPass(page, result) {
  await openDialogAndSearch(page, result.templates);
  result.cards = await readCards(page, result.templates);
  // The dialog as the guide shows it: the search's first rows, where this pack's cards rank.
  await page.evaluate((first) => {
    let box = document.querySelector(`[data-testid="template-workflow-${CSS.escape(first)}"]`);
    while (box && !(box.scrollHeight > box.clientHeight && getComputedStyle(box).overflowY !== "visible")) {
      box = box.parentElement;
    }
    if (box) box.scrollTop = 0;
  }, [...result.templates].sort()[0]);
  // The first rows drawn with their thumbnails loaded.
  await waitFor(
    page,
    () =>
      [...document.querySelectorAll('[data-testid^="template-workflow-"] img')]
        .filter((img) => {
          const box = img.getBoundingClientRect();
          return box.bottom > 0 && box.top < window.innerHeight;
        })
        .every((img) => img.complete && img.naturalWidth > 0),
    null,
    SETTLE_TIMEOUT_MS,
  );
  await nextPaint(page);
  result.dialogShot = path.join(artifactsDir, "templates-dialog.png");
  await page.screenshot({ path: result.dialogShot, ...SHOT });
}

async function openPass(page, result) {
  for (const mode of ["classic", "vue"]) {
    await switchRenderer(page, mode);
    result.modes[mode] = {};
    for (const name of result.templates) {
      // What the graph holds once the template opened: its nodes' ids and types.
      const nodes = await page.evaluate(async ({ pack, name }) => {
        const res = await fetch(`/api/workflow_templates/${pack}/${encodeURIComponent(name)}.json`);
        const { nodes } = await res.json();
        return JSON.stringify(nodes.map((n) => [String(n.id), n.type]).sort());
      }, { pack: PACK, name });
      await openTemplate(page, name, mode === "classic", nodes);
      const opened = await inspect(page);
      opened.screenshot = path.join(artifactsDir, `template-${name}-${mode}.png`);
      await page.screenshot({ path: opened.screenshot, ...SHOT });
      // The same file as a dragged-in workflow opens at its saved view (extra.ds).
      const saved = await page.evaluate(async ({ pack, name }) => {
        const res = await fetch(`/api/workflow_templates/${pack}/${encodeURIComponent(name)}.json`);
        await window.app.loadGraphData(await res.json(), true, true, name);
        // The canvas decides low detail when it draws: read it after a drawn frame.
        for (let i = 0; i < 2; i++) await new Promise((r) => requestAnimationFrame(r));
        return { scale: window.app.canvas.ds.scale, lowQuality: Boolean(window.app.canvas.low_quality) };
      }, { pack: PACK, name });
      saved.screenshot = path.join(artifactsDir, `template-${name}-${mode}-saved.png`);
      await page.screenshot({ path: saved.screenshot, ...SHOT });
      result.modes[mode][name] = { opened, saved };
    }
  }
}

async function main() {
  const { context, page, pageErrors } = await openBrowser(profileDir, { width: 1920, height: 1080 });
  const result = { pack: PACK, cards: {}, templates: [], modes: {}, pageErrors };
  try {
    await openFrontend(page, url);
    await page.evaluate(() => window.app.extensionManager.setting.set("Comfy.Minimap.Visible", false));
    const listed = await page.evaluate(async () => (await fetch("/api/workflow_templates")).json());
    result.templates = listed[PACK] || [];
    if (process.env.KLEIN_LAB_TEMPLATES_PASS === "dialog") await dialogPass(page, result);
    else await openPass(page, result);
  } finally {
    await context.close();
  }
  return result;
}

runDriver(main);
