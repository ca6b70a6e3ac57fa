// The pack's templates in the course's order in ComfyUI's templates dialog (js/klein_lora_lab.js sorts the pack's
// list of GET /workflow_templates, which the server gives in directory order). Opens the dialog, picks the pack's
// entry under Extensions, and reads the cards in page order; then the same for a "Klein" search.
// Usage: node template_order.mjs <server-url> <profile-dir> <artifacts-dir>. Prints one JSON line.
import path from "node:path";
import { holdsWithin, openBrowser, openFrontend, runDriver, waitFor } from "./comfy_page.mjs";

const [url, profileDir, artifactsDir] = process.argv.slice(2);
const PACK = process.env.KLEIN_LAB_PACK_DIR || "klein_lora_lab";
const SETTLE_TIMEOUT_MS = 30_000; // for the dialog to show what was asked (loaded machines are slow)
// The search applies after the frontend's debounce and changes only the cards' order: wait for that up to here.
const SEARCH_TIMEOUT_MS = 10_000;

// The template names of the cards shown now, in page order (top to bottom, left to right).
async function cardOrder(page) {
  return page.evaluate(() =>
    [...document.querySelectorAll('[data-testid^="template-workflow-"]')]
      .map((card) => ({ name: card.dataset.testid.replace("template-workflow-", ""), box: card.getBoundingClientRect() }))
      .sort((a, b) => a.box.top - b.box.top || a.box.left - b.box.left)
      .map((c) => c.name),
  );
}

async function main() {
  const { context, page, pageErrors } = await openBrowser(profileDir, { width: 1920, height: 1080 });
  const result = { pageErrors };
  try {
    await openFrontend(page, url);
    result.server = await page.evaluate(async () => (await (await fetch("/api/workflow_templates")).json()));
    result.api = await page.evaluate(async () => {
      const { api } = await import("/scripts/api.js");
      return api.getWorkflowTemplates();
    });
    await page.evaluate(() => window.app.extensionManager.command.execute("Comfy.BrowseTemplates"));
    const search = page.getByPlaceholder("Search ...").first();
    await search.waitFor({ timeout: 120_000 });
    await page.getByText(PACK, { exact: true }).first().click();
    // The category shows exactly the pack's templates (the cards of the previous view gone).
    await waitFor(
      page,
      (names) => {
        const cards = [...document.querySelectorAll('[data-testid^="template-workflow-"]')];
        const shown = cards.map((card) => card.dataset.testid.replace("template-workflow-", ""));
        return shown.length === names.length && names.every((n) => shown.includes(n));
      },
      result.server[PACK] ?? [],
      SETTLE_TIMEOUT_MS,
    );
    result.category = await cardOrder(page);
    await page.screenshot({ path: path.join(artifactsDir, "template-order-category.png") });
    await search.fill("Klein");
    // Nothing on the page marks the search as applied (the pack's cards stay, "15 of 15 templates" stays); the
    // ranked order replacing the category's is the sign. Where the two orders happen to agree it never comes:
    // then the wait ends at SEARCH_TIMEOUT_MS and the test reads the cards as they are.
    result.searchReordered = await holdsWithin(
      page,
      (category) =>
        [...document.querySelectorAll('[data-testid^="template-workflow-"]')]
          .map((card) => ({ name: card.dataset.testid.replace("template-workflow-", ""), box: card.getBoundingClientRect() }))
          .sort((a, b) => a.box.top - b.box.top || a.box.left - b.box.left)
          .map((c) => c.name)
          .join("\n") !== category.join("\n"),
      result.category,
      SEARCH_TIMEOUT_MS,
    );
    result.search = await cardOrder(page);
    await page.screenshot({ path: path.join(artifactsDir, "template-order-search.png") });
  } finally {
    await context.close();
  }
  return result;
}

runDriver(main);
