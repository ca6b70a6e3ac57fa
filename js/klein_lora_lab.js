// Klein LoRA Lab frontend extension. ComfyUI serves this folder (WEB_DIRECTORY = "./js") and loads every .js
// file in it as an ES module. This file registers the extension and puts the pack's templates in the course's
// order; the scrubber, the live training panel, the block-weight editor and the live loss curve hook in from
// their own files.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

export const EXTENSION_NAME = "KleinLoraLab.core";

// The pack's folder name, which is its module name in GET /workflow_templates (this file is served at
// /extensions/<folder>/klein_lora_lab.js).
export const PACK_MODULE = decodeURIComponent(new URL(import.meta.url).pathname.split("/").at(-2) ?? "");

const OUR_TEMPLATE = /^Klein \d+ - /;

/** Template names in the course's order: 'Klein 2 …' before 'Klein 10 …' (numbers compared as numbers). */
export function courseOrder(names) {
  return [...names].sort((a, b) => a.localeCompare(b, "en", { numeric: true, sensitivity: "base" }));
}

// ComfyUI's server lists a pack's workflows in directory order (app/custom_node_manager.py, glob without
// sorting) and the frontend (1.47) keeps that order in the templates dialog, with no index of its own for a
// pack's templates: sort this pack's list (only this pack's) so Klein 01 comes first.
function orderPackTemplates() {
  const original = api.getWorkflowTemplates;
  if (typeof original !== "function" || original.kleinOrdered) return;
  const ordered = async function (...args) {
    const templates = await original.apply(this, args);
    if (!templates || typeof templates !== "object") return templates;
    const out = { ...templates };
    for (const [module, names] of Object.entries(templates)) {
      // This copy of the module may be served under the project name while the server lists the folder name:
      // a list made only of numbered Klein workflows is this pack's too.
      if (!Array.isArray(names)) continue;
      const ours = module === PACK_MODULE || (names.length > 0 && names.every((n) => OUR_TEMPLATE.test(n)));
      if (ours) out[module] = courseOrder(names);
    }
    return out;
  };
  ordered.kleinOrdered = true;
  api.getWorkflowTemplates = ordered;
}

// ComfyUI serves this folder under the pack's folder name (WEB_DIRECTORY) and under the project name
// (pyproject's [tool.comfy] web); when the two differ this module runs twice, so register only once.
const alreadyRegistered = (app.extensions ?? []).some((ext) => ext.name === EXTENSION_NAME);
if (!alreadyRegistered) {
  orderPackTemplates();
  app.registerExtension({
    name: EXTENSION_NAME,
  });
}
