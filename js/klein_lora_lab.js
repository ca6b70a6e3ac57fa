// Klein LoRA Lab frontend extension. ComfyUI serves this folder (WEB_DIRECTORY = "./js") and loads every .js
// file in it as an ES module. This file only registers the extension; the scrubber, the live training panel
// and the block-weight editor hook in here as they are built.
import { app } from "../../scripts/app.js";

export const EXTENSION_NAME = "KleinLoraLab.core";

// ComfyUI serves this folder under the pack's folder name (WEB_DIRECTORY) and under the project name
// (pyproject's [tool.comfy] web); when the two differ this module runs twice, so register only once.
const alreadyRegistered = (app.extensions ?? []).some((ext) => ext.name === EXTENSION_NAME);
if (!alreadyRegistered) {
  app.registerExtension({
    name: EXTENSION_NAME,
  });
}
