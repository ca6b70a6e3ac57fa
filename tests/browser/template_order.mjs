// The pack's templates in the course's order in ComfyUI's templates dialog (js/klein_lora_lab.js sorts the pack's
// list of GET /workflow_templates, which the server gives in directory order). Opens the dialog, picks the pack's
// entry under Extensions, and reads the cards in page order; then the same for a "Klein" search.
// Usage: node template_order.mjs <server-url> <profile-dir> <artifacts-dir>. Prints one JSON line.
import path from "node:path";
import { openBrowser, openFrontend, runDriver } from "./comfy_page.mjs";

const [url, profileDir, artifactsDir] = process.argv.slice(2);
const PACK = process.env.KLEIN_LAB_PACK_DIR || "klein_lora_lab";

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
    await page.waitForTimeout(1500);
    result.category = await cardOrder(page);
    await page.screenshot({ path: path.join(artifactsDir, "template-order-category.png") });
    await search.fill("Klein");
    await page.waitForTimeout(1500);
    result.search = await cardOrder(page);
    await page.screenshot({ path: path.join(artifactsDir, "template-order-search.png") });
  } finally {
    await context.close();
  }
  return result;
}

runDriver(main);
