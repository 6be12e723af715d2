// The 3D viewer of `ctfactory view` and of the serve page: NiiVue (niivue.umd.js beside this
// file; nothing loads from a CDN) with the axial, coronal and sagittal views sharing one
// crosshair, slices scrolled by the wheel and the keys, window presets, and the anatomy masks
// as a label overlay that can be shown and hidden.
"use strict";

const CtViewer = (() => {
  // Level and width in HU; lung and mediastinal are factory/viz.py's WINDOWS.
  const WINDOWS = {
    lung: [-600, 1500],
    mediastinal: [40, 400],
    parenchyma: [-700, 1000],
    bone: [400, 1800],
  };
  // factory/store/layout.py's CHANNEL_COLOURS: anatomy channel k (lungs, airway, vessels, heart).
  const CHANNEL_COLOURS = [[70, 130, 255], [255, 215, 0], [220, 20, 60], [255, 105, 180]];
  const OVERLAY_OPACITY = 0.45;
  // A key's step in voxels (x, y, z): up and down move the axial slice, page up and down the
  // coronal one, left and right the sagittal one (NiiVue's own h j k l and Ctrl+u/d work too).
  const KEYS = {
    ArrowUp: [0, 0, 1],
    ArrowDown: [0, 0, -1],
    PageUp: [0, 1, 0],
    PageDown: [0, -1, 0],
    ArrowRight: [1, 0, 0],
    ArrowLeft: [-1, 0, 0],
  };

  /** The message of a failed response: "status: error" from the JSON error body. */
  async function failure(response) {
    try {
      const body = await response.json();
      return `${response.status}: ${body.error}`;
    } catch (_) {
      return `${response.status} ${response.statusText}`;
    }
  }

  /** Whether this browser can run the viewer (NiiVue needs WebGL2). */
  function supported() {
    try {
      return Boolean(window.niivue && document.createElement("canvas").getContext("webgl2"));
    } catch (_) {
      return false;
    }
  }

  /** A NiiVue label colormap from a legend {value: "lungs" | "lungs+vessels" | ...}: a single
   * channel has its colour, a set of channels the mean of theirs. */
  function labelColormap(legend) {
    const entries = Object.entries(legend)
      .map(([value, name]) => [Number(value), String(name)])
      .sort((a, b) => a[0] - b[0]);
    const singles = entries.filter(([, name]) => !name.includes("+")).map(([, name]) => name);
    const cm = { R: [0], G: [0], B: [0], A: [0], I: [0], labels: [""] };
    for (const [value, name] of entries) {
      const colours = name.split("+").map((part) => {
        const k = Math.max(0, singles.indexOf(part));
        return CHANNEL_COLOURS[k % CHANNEL_COLOURS.length];
      });
      const mean = (c) => Math.round(colours.reduce((sum, rgb) => sum + rgb[c], 0) / colours.length);
      cm.R.push(mean(0));
      cm.G.push(mean(1));
      cm.B.push(mean(2));
      cm.A.push(255);
      cm.I.push(value);
      cm.labels.push(name);
    }
    return cm;
  }

  function element(tag, props, ...children) {
    const node = Object.assign(document.createElement(tag), props || {});
    node.append(...children);
    return node;
  }

  class Viewer {
    /** Fills ``container``: window buttons, the anatomy switch and its legend, the canvas, the
     * crosshair's position and value, and a status line. */
    constructor(container) {
      this.container = container;
      this.windowName = "lung";
      this.anatomy = null; // {load, image, legend}: the current volume's overlay
      container.classList.add("ct-viewer");
      this.buttons = Object.keys(WINDOWS).map((name) => {
        const [level, width] = WINDOWS[name];
        const button = element("button", {
          type: "button",
          textContent: name,
          title: `level ${level} HU, width ${width} HU`,
        });
        button.dataset.window = name;
        button.addEventListener("click", () => this.setWindow(name));
        return button;
      });
      this.toggle = element("input", { type: "checkbox", className: "ct-anatomy", disabled: true });
      this.toggle.addEventListener("change", () => this.showAnatomy(this.toggle.checked));
      this.legend = element("span", { className: "ct-legend" });
      this.anatomyLabel = element("label", { hidden: true }, this.toggle, " Anatomy");
      const tools = element(
        "div",
        { className: "ct-tools" },
        element("span", { textContent: "Window " }),
        ...this.buttons,
        this.anatomyLabel,
        this.legend,
      );
      this.canvas = element("canvas", { tabIndex: 0 });
      this.canvas.setAttribute("aria-label", "axial, coronal and sagittal views of the volume");
      this.location = element("p", { className: "ct-location" });
      this.location.setAttribute("aria-live", "polite");
      this.status = element("p", { className: "ct-status", role: "status" });
      container.replaceChildren(
        tools,
        element("div", { className: "ct-canvas" }, this.canvas),
        this.location,
        this.status,
      );
      this.nv = new niivue.Niivue({
        backColor: [0, 0, 0, 1],
        crosshairColor: [1, 0.8, 0, 1],
        isRadiologicalConvention: true, // the patient's left on the right, as CT is read
        multiplanarShowRender: niivue.SHOW_RENDER.NEVER,
        sliceType: niivue.SLICE_TYPE.MULTIPLANAR,
        dragAndDropEnabled: false,
        logLevel: "warn",
      });
      this.nv.onLocationChange = (where) => this.showLocation(where);
      this.attached = this.nv.attachToCanvas(this.canvas);
      container.addEventListener("keydown", (event) => this.key(event));
    }

    say(text, isError) {
      this.status.textContent = text;
      this.status.classList.toggle("error", Boolean(isError));
    }

    /** Show a volume: ``buffer`` a NIfTI file (int16 HU), ``name`` its file name, and
     * ``loadAnatomy`` (optional) an async function giving {buffer, legend} of its label map,
     * called the first time the overlay is switched on; without it there is no switch. */
    async show(buffer, name, loadAnatomy) {
      await this.attached;
      for (const volume of [...this.nv.volumes]) this.nv.removeVolume(volume);
      const image = await niivue.NVImage.loadFromUrl({ url: buffer, name, colormap: "gray" });
      this.nv.addVolume(image);
      this.anatomy = loadAnatomy ? { load: loadAnatomy, image: null, legend: null } : null;
      this.toggle.checked = false;
      this.toggle.disabled = !loadAnatomy;
      this.anatomyLabel.hidden = !loadAnatomy; // a volume without masks, or a server without them
      this.legend.replaceChildren();
      this.setWindow(this.windowName);
      const [x, y, z] = image.dims.slice(1, 4);
      this.say(`${name}: ${x} × ${y} × ${z} voxels; wheel or ↑ ↓ PgUp PgDn ← → move the slices`);
      this.nv.createOnLocationChange();
    }

    setWindow(name) {
      this.windowName = name;
      for (const button of this.buttons) {
        button.setAttribute("aria-pressed", String(button.dataset.window === name));
      }
      const volume = this.nv.volumes[0];
      if (!volume) return;
      const [level, width] = WINDOWS[name];
      volume.cal_min = level - width / 2;
      volume.cal_max = level + width / 2;
      this.nv.updateGLVolume();
    }

    async showAnatomy(visible) {
      const overlay = this.anatomy;
      if (!overlay) return;
      try {
        if (visible && !overlay.image) {
          this.say("Reading the anatomy masks…");
          const { buffer, legend } = await overlay.load();
          if (overlay !== this.anatomy) return; // another volume was opened meanwhile
          const image = await niivue.NVImage.loadFromUrl({
            url: buffer,
            name: "anatomy.nii.gz",
            opacity: OVERLAY_OPACITY,
          });
          image.setColormapLabel(labelColormap(legend));
          this.nv.addVolume(image);
          overlay.image = image;
          overlay.legend = legend;
          this.showLegend(legend);
          this.legend.hidden = false;
          this.say("Anatomy masks shown");
        } else if (overlay.image) {
          this.nv.setOpacity(this.nv.volumes.indexOf(overlay.image), visible ? OVERLAY_OPACITY : 0);
          this.legend.hidden = !visible;
          this.say(visible ? "Anatomy masks shown" : "Anatomy masks hidden");
        }
      } catch (err) {
        this.toggle.checked = false;
        this.say(`Anatomy masks: ${err.message || err}`, true);
      }
      this.nv.createOnLocationChange();
    }

    showLegend(legend) {
      const cm = labelColormap(legend);
      const swatches = [];
      for (let i = 1; i < cm.I.length; i++) {
        if (cm.labels[i].includes("+")) continue; // overlaps blend their channels' colours
        const swatch = element("span", { className: "ct-swatch" });
        swatch.style.background = `rgb(${cm.R[i]}, ${cm.G[i]}, ${cm.B[i]})`;
        swatches.push(element("span", {}, swatch, ` ${cm.labels[i]} `));
      }
      this.legend.replaceChildren(...swatches);
    }

    showLocation(where) {
      const [x, y, z] = where.vox.map((v) => Math.round(v));
      const mm = where.mm.slice(0, 3).map((v) => v.toFixed(1)).join(", ");
      const hu = where.values.length ? `${Math.round(where.values[0].value)} HU` : "";
      let text = `voxel ${x}, ${y}, ${z} (axial slice ${z}) · ${mm} mm · ${hu}`;
      const overlay = this.anatomy;
      if (overlay && overlay.image && this.toggle.checked) {
        const i = this.nv.volumes.indexOf(overlay.image);
        const label = i >= 0 ? Math.round(where.values[i].value) : 0;
        text += ` · ${overlay.legend[String(label)] || "no anatomy"}`;
      }
      this.location.textContent = text;
    }

    key(event) {
      const step = KEYS[event.key];
      if (!step || !this.nv.volumes.length) return;
      event.preventDefault();
      this.nv.moveCrosshairInVox(...step);
    }
  }

  return { Viewer, supported, failure, labelColormap, WINDOWS, CHANNEL_COLOURS };
})();
