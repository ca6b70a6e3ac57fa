// How every browser driver opens the real ComfyUI frontend: Debian's Chromium through playwright-core (never a
// downloaded browser), the flags of DESIGN.md §8, a fresh persistent profile, page and console errors collected.
import { chromium } from "playwright-core";

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

// Switches between the classic canvas and Vue nodes, then lets the DOM settle.
export async function setRenderer(page, mode, settleMs = 500) {
  await page.evaluate(async (vue) => {
    await window.app.extensionManager.setting.set("Comfy.VueNodes.Enabled", vue);
  }, mode === "vue");
  await page.waitForTimeout(settleMs);
}

// Queues the open workflow as the Run button does.
export async function queuePrompt(page) {
  await page.evaluate(() => window.app.extensionManager.command.execute("Comfy.QueuePrompt"));
}

// Waits until `predicate(arg)` holds in the page (polled every 250 ms).
export async function waitFor(page, predicate, arg, timeout) {
  await page.waitForFunction(predicate, arg, { timeout, polling: 250 });
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
