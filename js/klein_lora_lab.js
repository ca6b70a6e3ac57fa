// Klein LoRA Lab frontend extension. ComfyUI serves this folder (WEB_DIRECTORY = "./js") and loads every .js
// file in it as an ES module. This file only registers the extension; the scrubber, the live training panel
// and the block-weight editor hook in here as they are built.
import { app } from "../../scripts/app.js";

export const EXTENSION_NAME = "KleinLoraLab.core";

app.registerExtension({
  name: EXTENSION_NAME,
});
