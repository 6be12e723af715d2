// ct-factory web page: builds the same JSON body as the API docs show and posts it to
// /v1/volumes: the NIfTI is shown in the 3D viewer (/viewer/viewer.js) and is what Download
// saves. Without WebGL2 the page posts it to /v1/previews for the PNG picture instead.
"use strict";

const $ = (id) => document.getElementById(id);
let lastBody = null;
let lastNifti = null; // {blob, name}: the volume in the viewer
let viewer = null;

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("apikey").value.trim();
  if (key) h["X-API-Key"] = key;
  return h;
}

function body() {
  const b = {};
  if (document.querySelector("input[name=mode]:checked").value === "prompt") {
    b.prompt = $("prompt").value;
  } else {
    b.findings = [...document.querySelectorAll("#findings input:checked")].map((c) => c.value);
    if ($("age").value) b.age = Number($("age").value);
    if ($("sex").value) b.sex = $("sex").value;
  }
  if ($("seed").value !== "") b.seed = Number($("seed").value);
  if ($("steps").value !== "") b.steps = Number($("steps").value);
  if ($("guidance").value !== "") b.guidance = Number($("guidance").value);
  if ($("negative").value.trim()) b.negative_prompt = $("negative").value.trim();
  if ($("model").value) b.model = $("model").value;
  return b;
}

function status(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function showProvenance(response) {
  const rows = [
    ["Seed", response.headers.get("X-Seed")],
    ["Prompt", decodeURIComponent(response.headers.get("X-Prompt") || "")],
    ["Steered away from", decodeURIComponent(response.headers.get("X-Negative-Prompt") || "nothing")],
    ["Model", `${response.headers.get("X-Model")} (${(response.headers.get("X-Model-Hash") || "").slice(0, 12)})`],
    ["Volume id", response.headers.get("X-Volume-Id")],
    ["Grid", `${response.headers.get("X-Shape")} voxels of ${response.headers.get("X-Spacing-Mm")} mm`],
  ];
  const dl = $("provenance");
  dl.replaceChildren();
  for (const [k, v] of rows) {
    const dt = document.createElement("dt");
    dt.textContent = k;
    const dd = document.createElement("dd");
    dd.textContent = v;
    dl.append(dt, dd);
  }
}

async function post(path, b) {
  return fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(b) });
}

/** A loader of the anatomy of the volume ``b`` asks for (its seed fixed): the server keeps no
 * volumes, so the same request is sampled again, as format anatomy, when the overlay is first
 * switched on. */
function anatomyOf(b) {
  return async () => {
    const response = await post("/v1/volumes", { ...b, format: "anatomy" });
    if (!response.ok) throw new Error(await CtViewer.failure(response));
    const legend = JSON.parse(response.headers.get("X-Anatomy-Legend") || "{}");
    return { buffer: await response.arrayBuffer(), legend };
  };
}

/** The volume as NIfTI, shown in the viewer; its response, or null after an error. */
async function showVolume(b) {
  const response = await post("/v1/volumes", { ...b, format: "nifti" });
  if (!response.ok) {
    status(await CtViewer.failure(response), true);
    return null;
  }
  const blob = await response.blob();
  const name = `${response.headers.get("X-Volume-Id")}.nii.gz`;
  $("viewer").hidden = false; // laid out before NiiVue sizes its canvas
  viewer = viewer || new CtViewer.Viewer($("viewer"));
  const seed = Number(response.headers.get("X-Seed"));
  const masks = response.headers.get("X-Anatomy") ? anatomyOf({ ...b, seed }) : null;
  await viewer.show(await blob.arrayBuffer(), name, masks);
  lastNifti = { blob, name };
  return response;
}

/** The PNG preview, where the viewer cannot run; its response, or null after an error. */
async function showPreview(b) {
  const response = await post("/v1/previews", b);
  if (!response.ok) {
    status(await CtViewer.failure(response), true);
    return null;
  }
  const img = $("preview");
  if (img.src) URL.revokeObjectURL(img.src);
  img.src = URL.createObjectURL(await response.blob());
  img.hidden = false;
  return response;
}

async function generate(event) {
  event.preventDefault();
  const b = body();
  $("generate").disabled = true;
  status("Generating…", false);
  const started = performance.now();
  try {
    const response = CtViewer.supported() ? await showVolume(b) : await showPreview(b);
    if (!response) return;
    b.seed = Number(response.headers.get("X-Seed")); // the download is the same volume
    lastBody = b;
    $("download").disabled = false;
    showProvenance(response);
    status(`Done in ${((performance.now() - started) / 1000).toFixed(1)} s`, false);
  } catch (err) {
    status(`Request failed: ${err}`, true);
  } finally {
    $("generate").disabled = false;
  }
}

async function download() {
  if (!lastBody) return;
  let file = lastNifti; // null where the page showed the PNG preview
  if (!file) {
    status("Generating the NIfTI…", false);
    const response = await post("/v1/volumes", { ...lastBody, format: "nifti" });
    if (!response.ok) {
      status(await CtViewer.failure(response), true);
      return;
    }
    file = { blob: await response.blob(), name: `${response.headers.get("X-Volume-Id")}.nii.gz` };
  }
  const url = URL.createObjectURL(file.blob);
  const a = document.createElement("a");
  a.href = url;
  a.download = file.name;
  a.click();
  URL.revokeObjectURL(url);
  status("NIfTI downloaded", false);
}

async function init() {
  const findings = await fetch("/v1/findings").then((r) => r.json());
  for (const f of findings.findings) {
    const label = document.createElement("label");
    const box = document.createElement("input");
    box.type = "checkbox";
    box.value = f.id;
    label.append(box, ` ${f.name}`);
    $("findings").append(label);
  }
  for (const radio of document.querySelectorAll("input[name=mode]")) {
    radio.addEventListener("change", () => {
      const useFindings = radio.value === "findings" && radio.checked;
      $("prompt").hidden = useFindings;
      $("findings").hidden = !useFindings;
      $("demographics").hidden = !useFindings;
    });
  }
  const models = await fetch("/v1/models", { headers: headers() });
  if (models.ok) {
    for (const m of (await models.json()).models) {
      const option = new Option(m.id, m.id, m.default, m.default);
      $("model").append(option);
    }
  }
  $("form").addEventListener("submit", generate);
  $("download").addEventListener("click", download);
}

init();
