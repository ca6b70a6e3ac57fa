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
